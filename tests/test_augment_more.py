"""Augment section, second part: random erasing (timm's and tv's), TrivialAugmentWide, RandAugment
with timm's op-choice stream, TrainTransform with "ta_wide", against timm and torchvision
(test-only references). Pixel-equal means exact equality (uint8 images, float32 batches)."""
import random
from collections import deque

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.auto_augment import AugmentOp, rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import TrivialAugmentWide, _apply_op

import common
from test_augment import legacy_posterize, make_image
from common import (TRIVIAL_AUGMENT_WIDE, TrainTransform, rand_augment, random_erasing,
                         trivial_augment, trivial_augment_op, trivial_augment_space,
                         tv_random_erasing)

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean


def normalised_batch(n=8, h=20, w=24, seed=0):
    """A batch as normalize() gives it: uint8 noise, then (x - mean) / std."""
    g = torch.Generator().manual_seed(seed)
    return common.normalize(torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g))


def boxes_in(mask):
    """Connected regions (4-neighbour) of a 2-D bool mask: overlapping boxes count as one, so
    more than one region proves more than one box."""
    mask = mask.tolist()
    h, w = len(mask), len(mask[0])
    seen, regions = set(), 0
    for y in range(h):
        for x in range(w):
            if mask[y][x] and (y, x) not in seen:
                regions += 1
                todo = deque([(y, x)])
                seen.add((y, x))
                while todo:
                    cy, cx = todo.popleft()
                    for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                        if 0 <= ny < h and 0 <= nx < w and mask[ny][nx] and (ny, nx) not in seen:
                            seen.add((ny, nx))
                            todo.append((ny, nx))
    return regions


# --------------------------------------------------------------------------------------------
# Random erasing, timm's (RSB procedures B, C, D)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
@pytest.mark.parametrize("prob,count", [(0.35, 1), (0.35, 3), (1.0, 3), (0.4, 1), (1.0, 1)])
@pytest.mark.parametrize("shape", [(8, 3, 20, 24), (5, 3, 7, 9)])
def test_random_erasing_equals_timm(shape, prob, count, mode):
    """random_erasing(x, prob, count, mode) vs timm RandomErasing(prob, mode, max_count=count,
    device='cpu') on the same normalised batch, python `random` and torch seeded alike, 12
    seeds: pixel-equal, and both RNG streams left in the same state. Some seed erases."""
    x = normalised_batch(*shape)
    changed = 0
    for s in range(12):
        random.seed(s)
        torch.manual_seed(s)
        ref = RandomErasing(prob, mode=mode, max_count=count, device="cpu")(x.clone())
        after = (random.random(), torch.rand(1).item())
        random.seed(s)
        torch.manual_seed(s)
        ours = random_erasing(x.clone(), prob, count, mode=mode)
        assert (random.random(), torch.rand(1).item()) == after, f"seed={s}: RNG use differs"
        assert torch.equal(ours, ref), f"seed={s}"
        changed += not torch.equal(ours, x)
    assert changed > 0


def test_random_erasing_is_in_place_and_counts_boxes():
    """In place on the batch; mode 'const' on a batch of ones zeroes whole boxes: count 1 never
    leaves more than one region, count 3 (timm's randint(1, 3) boxes of 1/boxes of the area)
    leaves more than one in some images; prob 0 draws nothing and changes nothing; the erased
    fraction with count 3 is below count 1's (boxes shrink with their number)."""
    x = torch.ones(64, 3, 32, 32)
    random.seed(0)
    assert random_erasing(x, 1.0, 1, mode="const") is x
    regions = [boxes_in(x[i, 0] == 0) for i in range(64)]
    assert max(regions) == 1 and min(regions) == 1
    one_box = (x == 0).float().mean().item()
    x = torch.ones(64, 3, 32, 32)
    random_erasing(x, 1.0, 3, mode="const")
    regions = [boxes_in(x[i, 0] == 0) for i in range(64)]
    assert max(regions) > 1 and min(regions) >= 1
    assert (x == 0).float().mean().item() < one_box
    state = random.getstate()
    y = torch.ones(4, 3, 8, 8)
    random_erasing(y, 0.0, 3)
    assert random.getstate() == state and bool((y == 1).all())
    with pytest.raises(ValueError):
        random_erasing(y, 0.5, mode="zero")


def test_random_erasing_pixel_noise_is_per_pixel_normal():
    """'pixel' fills N(0, 1) per pixel and channel: over 200 erased 32 px images the erased
    values have mean 0 +- 0.03 and sd 1 +- 0.03 and the three channels differ."""
    x = torch.full((200, 3, 32, 32), 100.0)
    random.seed(1)
    torch.manual_seed(1)
    random_erasing(x, 1.0, 1)
    noise = x[x != 100.0]
    assert noise.numel() > 10000
    assert abs(noise.mean().item()) < 0.03 and abs(noise.std().item() - 1) < 0.03
    erased = (x[:, 0] != 100.0)
    assert not torch.equal(x[:, 0][erased], x[:, 1][erased])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_random_erasing_on_cuda_equals_timm():
    """On a CUDA batch: the noise comes from the CUDA generator as in timm's PrefetchLoader
    (device='cuda'); same seeds, pixel-equal to timm's, count 3, fp32 and fp16."""
    for dtype in (torch.float32, torch.float16):
        x = normalised_batch(16, 3, 40, 48).to("cuda", dtype)
        for s in range(5):
            random.seed(s)
            torch.manual_seed(s)
            ref = RandomErasing(0.5, mode="pixel", max_count=3, device="cuda")(x.clone())
            random.seed(s)
            torch.manual_seed(s)
            ours = random_erasing(x.clone(), 0.5, 3)
            assert torch.equal(ours, ref), f"{dtype} seed={s}"


# --------------------------------------------------------------------------------------------
# Random erasing, tv's (recipe "tv": p 0.1, value 0, after Normalize)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prob", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(8, 3, 20, 24), (6, 3, 5, 4), (4, 3, 3, 40)])
def test_tv_random_erasing_equals_torchvision(shape, prob):
    """tv_random_erasing(batch, p) vs torchvision RandomErasing(p) (value 0) applied image by
    image in batch order after the same torch.manual_seed, 15 seeds: pixel-equal and the torch
    RNG left in the same state. Small images include ones where no sampled box fits in 10 tries
    (tv leaves those alone). Some seed erases."""
    x = normalised_batch(*shape)
    erase = T.RandomErasing(p=prob)
    changed = 0
    for s in range(15):
        torch.manual_seed(s)
        ref = torch.stack([erase(img) for img in x.clone()])
        after = torch.rand(1).item()
        torch.manual_seed(s)
        ours = tv_random_erasing(x.clone(), prob)
        assert torch.rand(1).item() == after, f"seed={s}: torch RNG use differs"
        assert torch.equal(ours, ref), f"seed={s}"
        changed += not torch.equal(ours, x)
    assert changed > 0


def test_tv_random_erasing_values_and_box():
    """Erased pixels are exactly `value` (0 by default, or one per channel) in one rectangle of
    at most a third of the image; prob 0 draws nothing."""
    x = torch.ones(32, 3, 24, 24)
    torch.manual_seed(0)
    tv_random_erasing(x, 1.0)
    for img in x:
        ys, xs = torch.nonzero(img[0] == 0, as_tuple=True)
        if len(ys):
            box = img[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            assert bool((box == 0).all()) and len(ys) <= 0.33 * 24 * 24 + 24
    assert (x == 0).any()
    y = torch.ones(8, 3, 16, 16)
    torch.manual_seed(0)
    tv_random_erasing(y, 1.0, value=(0.5, -1.0, 2.0))
    erased = y[:, 0] != 1
    assert erased.any() and bool((y[:, 0][erased] == 0.5).all())
    assert bool((y[:, 1][erased] == -1).all()) and bool((y[:, 2][erased] == 2).all())
    state = torch.get_rng_state()
    tv_random_erasing(y, 0.0)
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------------------------
# TrivialAugment Wide (recipe "tv")
# --------------------------------------------------------------------------------------------

def test_trivial_augment_table_is_torchvisions():
    """TRIVIAL_AUGMENT_WIDE equals tv TrivialAugmentWide()._augmentation_space(31): same op names
    in the same order (the op index is drawn over it), same signedness, same magnitudes (exact
    float32 values; Posterize's bits 8..2 and Solarize's 255..0 included); 0-dim tv entries are
    our empty tuples. Other bin counts too."""
    for bins in (31, 5):
        ref = TrivialAugmentWide(num_magnitude_bins=bins)._augmentation_space(bins)
        ours = TRIVIAL_AUGMENT_WIDE if bins == 31 else trivial_augment_space(bins)
        assert list(ours) == list(ref)
        for name, (mags, signed) in ref.items():
            assert ours[name][1] == signed, name
            expected = [float(v) for v in mags.tolist()] if mags.ndim else []
            assert list(ours[name][0]) == expected, name
    bits = TRIVIAL_AUGMENT_WIDE["Posterize"][0]
    assert (bits[0], bits[-1]) == (8, 2)
    assert TRIVIAL_AUGMENT_WIDE["Rotate"][0][-1] == 135.0


def ta_magnitudes(name):
    """Bins 0, 1, 7, 15, 30 of the op, each also negated when signed, plus off-grid values
    (a translation of 12.6 px is truncated to 12 by tv's int())."""
    mags, signed = TRIVIAL_AUGMENT_WIDE[name]
    if not mags:
        return [0.0]
    values = [mags[i] for i in (0, 1, 7, 15, 30)]
    extra = {"TranslateX": [12.6, -12.6], "TranslateY": [-0.7, 31.9], "Rotate": [-90.0, 33.3],
             "ShearX": [0.5], "ShearY": [-0.5], "Solarize": [127.5, 128.0], "Brightness": [-0.5]}
    values += extra.get(name, [])
    return values + ([-v for v in values] if signed else [])


@pytest.mark.parametrize("name", list(TRIVIAL_AUGMENT_WIDE))
def test_trivial_augment_op_equals_torchvision(name):
    """trivial_augment_op(img, name, m, resample, fill) vs torchvision's _apply_op (the function
    TrivialAugmentWide calls, through transforms.functional on PIL) at the magnitudes above, for
    bilinear and nearest, fill None (black, the recipe's) and FILL, on 40x32 and 31x37 structured
    RGB images: pixel-equal. Every op but Identity changes the image at some magnitude."""
    changed = False
    for h, w in ((32, 40), (37, 31)):
        img = make_image(h, w, seed=h)
        for m in ta_magnitudes(name):
            for resample, mode in ((Image.BILINEAR, InterpolationMode.BILINEAR),
                                   (Image.NEAREST, InterpolationMode.NEAREST)):
                for fill in (None, list(FILL)):
                    ref = np.asarray(_apply_op(img, name, m, interpolation=mode, fill=fill))
                    ours = np.asarray(trivial_augment_op(img, name, m, resample, fill))
                    case = f"{name} m={m} {mode.value} fill={fill} {w}x{h}"
                    assert ours.shape == ref.shape and np.array_equal(ours, ref), case
                    changed |= not np.array_equal(ours, np.asarray(img))
    assert changed or name == "Identity"


def test_trivial_augment_op_unknown_name_raises():
    with pytest.raises(ValueError):
        trivial_augment_op(make_image(), "Invert", 0.0)


def test_trivial_augment_equals_torchvision():
    """trivial_augment(img, BILINEAR) vs tv TrivialAugmentWide(interpolation=BILINEAR) (as tv's
    classification preset builds it: fill None) after the same torch.manual_seed, 400 seeds on a
    40x32 structured image: pixel-equal and the torch RNG left in the same state; all 14 ops
    drawn, and most images changed."""
    img = make_image(32, 40, seed=3)
    ref_t = TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)
    names, changed = set(), 0
    for s in range(400):
        torch.manual_seed(s)
        names.add(list(TRIVIAL_AUGMENT_WIDE)[int(torch.randint(14, (1,)))])
        torch.manual_seed(s)
        ref = np.asarray(ref_t(img))
        after = torch.rand(1).item()
        torch.manual_seed(s)
        ours = np.asarray(trivial_augment(img))
        assert torch.rand(1).item() == after, f"seed={s}: torch RNG use differs"
        assert np.array_equal(ours, ref), f"seed={s}"
        changed += not np.array_equal(ours, np.asarray(img))
    assert names == set(TRIVIAL_AUGMENT_WIDE)
    assert changed > 300


# --------------------------------------------------------------------------------------------
# RandAugment: procedures B/C/D ("rand-mM-nN-mstd1.0", timm's plain op set) and ResNet-RS
# --------------------------------------------------------------------------------------------

RSB_RS_SPECS = ["rand-m7-n3-mstd1.0", "rand-m8-n2-mstd1.0", "rand-m10-n2", "rand-m15-n2-mmax15",
                "rand-m15-n2", "rand-m6-mstd0.5-inc1", "rand-m7-mstd0.5-inc1"]


def timm_aa_hparams(size, interpolation="bicubic"):
    """The hparams timm's transforms_imagenet_train hands rand_augment_transform."""
    return dict(translate_const=int(size * 0.45),
                img_mean=tuple(min(255, round(255 * m)) for m in common.IMAGENET_MEAN),
                interpolation=str_to_pil_interp(interpolation))


def legacy(ra):
    """Pillow 13 refuses posterize to 0 bits (and below); timm trained with the old Pillow, which
    gave black: see test_augment.legacy_posterize."""
    for op in ra.ops:
        if "Posterize" in op.name:
            op.aug_fn = legacy_posterize
    return ra


def test_timm_aa_hparams_are_create_transforms():
    """The hparams above are those create_transform(is_training, auto_augment, 'bicubic') gives
    its RandAugment ops (fill (124, 116, 104), bicubic, translate_const 0.45 x size)."""
    for size in (32, 160, 224):
        ra = create_transform(size, is_training=True, auto_augment="rand-m7-n3-mstd1.0",
                              interpolation="bicubic").transforms[2]
        hp = ra.ops[0].hparams
        expected = timm_aa_hparams(size)
        assert {k: hp[k] for k in expected} == expected
        assert expected["img_mean"] == FILL and expected["interpolation"] == Image.BICUBIC
        assert ra.ops[0].kwargs == dict(fillcolor=FILL, resample=Image.BICUBIC)


@pytest.mark.parametrize("spec", RSB_RS_SPECS)
def test_rand_augment_equals_timm(spec):
    """rand_augment(img, parse_rand_augment(spec), FILL, BICUBIC) vs timm
    rand_augment_transform(spec, hparams as create_transform builds them for bicubic), python
    `random` and numpy's global RNG seeded alike before each call, nothing patched but the
    legacy posterize, 80 seeds: pixel-equal, both RNGs left in the same state. 'rand-m15-n2'
    without mmax is clamped to 10 by timm (and here): it equals 'rand-m10-n2'."""
    img = make_image(40, 32, seed=5)
    ra = legacy(rand_augment_transform(spec, timm_aa_hparams(32)))
    cfg = common.parse_rand_augment(spec)
    changed = 0
    for s in range(80):
        random.seed(s)
        np.random.seed(s)
        ref = np.asarray(ra(img))
        after = (random.random(), np.random.random())
        random.seed(s)
        np.random.seed(s)
        ours = np.asarray(rand_augment(img, cfg, FILL, Image.BICUBIC))
        assert (random.random(), np.random.random()) == after, f"{spec} seed={s}: RNG use"
        assert np.array_equal(ours, ref), f"{spec} seed={s}"
        changed += not np.array_equal(ours, np.asarray(img))
    assert changed > 20


def test_rand_augment_m15_needs_mmax():
    """timm clamps the magnitude to 10 unless mmax is given: 'rand-m15-n2' is 'rand-m10-n2'
    image for image, 'rand-m15-n2-mmax15' (ResNet-RS's M 15) is stronger and differs."""
    img = make_image(40, 32, seed=7)
    m10, m15, m15max = (common.parse_rand_augment(s) for s in
                        ("rand-m10-n2", "rand-m15-n2", "rand-m15-n2-mmax15"))
    differ = 0
    for s in range(40):
        out = []
        for cfg in (m10, m15, m15max):
            random.seed(s)
            np.random.seed(s)
            out.append(np.asarray(rand_augment(img, cfg, FILL, Image.BICUBIC)))
        assert np.array_equal(out[0], out[1]), f"seed={s}"
        differ += not np.array_equal(out[0], out[2])
    assert differ > 10


@pytest.mark.parametrize("spec", RSB_RS_SPECS)
def test_common_rand_augment_equals_timm_given_the_ops(spec, monkeypatch):
    """common.rand_augment vs timm for the same specs with the op choice patched to the same
    names in both (np.random.choice, and random.choices where the pre-merge common draws it):
    40 seeds, pixel-equal. Everything in common's RandAugment but where the op choice is drawn
    from already matched timm."""
    ra = legacy(rand_augment_transform(spec, timm_aa_hparams(32)))
    cfg = common.parse_rand_augment(spec)
    by_name = {op.name: op for op in ra.ops}
    img = make_image(40, 32, seed=6)
    picker = random.Random(spec)
    for s in range(40):
        names = picker.choices(cfg["ops"], k=cfg["n"])
        with monkeypatch.context() as mp:
            mp.setattr(np.random, "choice", lambda ops, size, **kw: [by_name[n] for n in names])
            random.seed(s)
            ref = np.asarray(ra(img))
        with monkeypatch.context() as mp:
            # either source, so the test holds with either op-choice stream
            mp.setattr(common.random, "choices", lambda population, k: list(names))
            mp.setattr(np.random, "choice", lambda a, size, **kw: [cfg["ops"].index(n)
                                                                   for n in names])
            random.seed(s)
            ours = np.asarray(common.rand_augment(img, cfg, FILL, Image.BICUBIC))
        assert np.array_equal(ours, ref), f"{spec} seed={s} ops={names}"


@pytest.mark.parametrize("name", sorted(set(common.RAND_OPS) | set(common.RAND_INCREASING_OPS)))
def test_augment_op_above_10_equals_timm(name):
    """common.augment_op at magnitudes above 10 (reached with mmax, ResNet-RS's M 15) vs timm
    AugmentOp(name, prob 1, m, magnitude_max 15): m in {10.5, 12.5, 15}, 4 seeds, pixel-equal
    (PosterizeIncreasing goes below 0 bits there: black, as the legacy posterize)."""
    img = make_image(40, 32, seed=len(name))
    for m in (10.5, 12.5, 15):
        op = AugmentOp(name, prob=1.0, magnitude=m,
                       hparams=dict(timm_aa_hparams(32), magnitude_max=15))
        if "Posterize" in name:
            op.aug_fn = legacy_posterize
        for s in range(4):
            random.seed(s)
            ref = np.asarray(op(img))
            random.seed(s)
            ours = np.asarray(common.augment_op(img, name, m, FILL, Image.BICUBIC))
            assert np.array_equal(ours, ref), f"{name} m={m} seed={s}"


def test_rand_augment_op_choice_is_uniform_with_replacement():
    """Over 3000 draws of n=3 from numpy: every op chosen (chi-square 14 dof < 40) and repeats
    within an image happen (replacement), as timm's np.random.choice(ops, n)."""
    cfg = common.parse_rand_augment("rand-m7-n3-mstd1.0")
    np.random.seed(0)
    draws = [np.random.choice(len(cfg["ops"]), cfg["n"]) for _ in range(3000)]
    counts = np.bincount(np.concatenate(draws), minlength=len(cfg["ops"]))
    expected = counts.sum() / len(cfg["ops"])
    assert ((counts - expected) ** 2 / expected).sum() < 40
    assert any(len(set(d.tolist())) < 3 for d in draws)


# --------------------------------------------------------------------------------------------
# TrainTransform: "rand-..." (timm pipeline) and "ta_wide" (crop + flip + TrivialAugment)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["rand-m7-n3-mstd1.0", "rand-m6-mstd0.5-inc1", None])
def test_train_transform_equals_timm_pipeline(spec):
    """TrainTransform(32, 'bicubic', spec) (hflip 0.5) vs timm create_transform(32, is_training,
    auto_augment=spec, interpolation='bicubic', use_prefetcher=True) — crop from `random`, flip
    from torch, op choice from numpy, the rest from `random` — with the three seeded alike,
    50 seeds, nothing patched: pixel-equal to timm's uint8 CHW output. Both flips happen.
    (common.TrainTransform draws the flip from `random`, which shifts timm's RandAugment draws.)"""
    # without RandAugment timm's default color_jitter 0.4 switches on: no RSB recipe has that
    timm_t = create_transform(32, is_training=True, auto_augment=spec, interpolation="bicubic",
                              use_prefetcher=True, color_jitter=None)
    if spec:
        legacy(timm_t.transforms[2])
    ours_t = TrainTransform(32, "bicubic", spec)
    img = make_image(48, 64)
    flipped = 0
    for s in range(50):
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        ref = timm_t(img).permute(1, 2, 0).numpy()
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        ours = ours_t(img)
        assert ours.dtype == np.uint8 and np.array_equal(ours, ref), f"{spec} seed={s}"
        torch.manual_seed(s)
        flipped += bool(torch.rand(1) < 0.5)  # the flip is the first torch draw of both
    assert 10 < flipped < 40


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_train_transform_ta_wide(interpolation):
    """TrainTransform(24, interp, 'ta_wide') vs timm RandomResizedCropAndInterpolation (our crop,
    same `random` draws) + tv RandomHorizontalFlip(0.5) + tv TrivialAugmentWide(interp) (tv's
    preset: fill None), seeds alike, 60 seeds: pixel-equal. No RandAugment config is kept."""
    mode = InterpolationMode(interpolation)
    ref_t = T.Compose([RandomResizedCropAndInterpolation(24, interpolation=interpolation),
                       T.RandomHorizontalFlip(0.5), TrivialAugmentWide(interpolation=mode)])
    ours_t = TrainTransform(24, interpolation, "ta_wide")
    assert ours_t.rand_augment is None and ours_t.trivial_augment
    img = make_image(40, 56, seed=2)
    for s in range(60):
        random.seed(s)
        torch.manual_seed(s)
        ref = np.asarray(ref_t(img))
        random.seed(s)
        torch.manual_seed(s)
        ours = ours_t(img)
        assert ours.shape == (24, 24, 3) and np.array_equal(ours, ref), f"seed={s}"


def test_train_transform_constructor_is_commons():
    """Same constructor and attributes as common.TrainTransform; a bad string is still a
    UserError naming it; hflip 0 makes no torch draw."""
    for spec in ("rand-m9-mstd0.5", None):
        a, b = TrainTransform(32, "bicubic", spec), common.TrainTransform(32, "bicubic", spec)
        assert (a.size, a.interpolation, a.hflip, a.scale, a.ratio, a.fill, a.rand_augment) == \
            (b.size, b.interpolation, b.hflip, b.scale, b.ratio, b.fill, b.rand_augment)
    with pytest.raises(common.UserError) as e:
        TrainTransform(32, auto_augment="ta-wide")
    assert "'ta-wide'" in str(e.value)
    state = torch.get_rng_state()
    TrainTransform(16, hflip=0.0)(make_image())
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("style", ["timm", "tv"])
def test_batch_augmentation_order(style):
    """The engine's order: timm mixes (collate function) and then erases (its prefetcher), so an
    erased box holds pure noise; tv erases each image (transforms) and then mixes. Replayed by
    hand with the same seeds: equal to one order and not to the other."""
    recipe = dict(reprob=1.0, remode="pixel" if style == "timm" else "tv", recount=1,
                  mixup=0.5, cutmix=0.0, label_smoothing=0.1, mixup_style=style)
    x0 = normalised_batch(6, 20, 24, seed=3)
    y0 = torch.arange(6) % 4

    def erase(x):
        if style == "timm":
            common.random_erasing(x, 1.0, 1)
        else:
            common.tv_random_erasing(x, 1.0)

    def mix(x, y, rng):
        return common.mixup_cutmix(x, y, 4, 0.5, 0.0, 0.1, rng, style)

    def seeded():
        random.seed(1)
        torch.manual_seed(1)
        return np.random.default_rng(2)

    rng = seeded()
    got, got_y = common.augment_batch(x0.clone(), y0, recipe, 4, rng)
    rng = seeded()
    mixed_first, y_mf = mix(x0.clone(), y0, rng)
    erase(mixed_first)
    rng = seeded()
    erased_first = x0.clone()
    erase(erased_first)
    erased_first, y_ef = mix(erased_first, y0, rng)
    want, other = (mixed_first, erased_first) if style == "timm" else (erased_first, mixed_first)
    assert torch.equal(got, want) and not torch.equal(got, other)
    assert torch.equal(got_y, y_mf) and torch.equal(got_y, y_ef)
