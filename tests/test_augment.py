"""Augment section: RandAugment ops and policy, Mixup/CutMix, normalisation, against timm
(test-only reference, timm==1.0.x) and torchvision. Pixel-equal means exact uint8 equality."""
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from timm.data import Mixup
from timm.data.auto_augment import AugmentOp, rand_augment_transform
from timm.data.loader import PrefetchLoader
from timm.data.mixup import cutmix_bbox_and_lam

import common

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean
ALL_OPS = sorted(set(common.RAND_OPS) | set(common.RAND_INCREASING_OPS))


def make_image(h=40, w=56, seed=0):
    """Seeded noise over a gradient in [15, 215] plus a coloured block: autocontrast,
    equalize, solarize and posterize all change it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 40 + 120 * xx / (w - 1) + 30 * yy / (h - 1)
    arr = base[..., None] + rng.integers(-25, 26, (h, w, 3))
    arr[h // 4:h // 2, w // 3:w // 2] = (200, 60, 90)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def timm_hparams(**extra):
    return dict(img_mean=FILL, interpolation=Image.BICUBIC, **extra)


def legacy_posterize(img, bits, **_):
    """timm's posterize with the ImageOps.posterize of Pillow < 13: 0 bits kept is a black
    image. Pillow 13 raises ValueError for bits 0, which PosterizeIncreasing reaches at
    magnitude >= 7.5 and Posterize below 2.5: the behaviour RSB was trained with is the old one."""
    if bits >= 8:
        return img
    return img.point([i & ~(2 ** (8 - bits) - 1) for i in range(256)] * len(img.getbands()))


def timm_op(name, **kwargs):
    op = AugmentOp(name, **kwargs)
    if "Posterize" in name:
        op.aug_fn = legacy_posterize
    return op


def timm_rand_augment(spec):
    ra = rand_augment_transform(spec, timm_hparams())  # fresh hparams: timm setdefaults into it
    for op in ra.ops:
        if "Posterize" in op.name:
            op.aug_fn = legacy_posterize
    return ra


def test_legacy_posterize_is_pillows_for_bits_1_to_8():
    """The reference above equals Pillow's ImageOps.posterize wherever that accepts bits."""
    img = make_image()
    for bits in range(1, 9):
        assert np.array_equal(np.asarray(legacy_posterize(img, bits)),
                              np.asarray(ImageOps.posterize(img, bits)))
    assert not np.asarray(legacy_posterize(img, 0)).any()


# --------------------------------------------------------------------------------------------
# RandAugment
# --------------------------------------------------------------------------------------------

def test_op_tables_are_timms():
    """RAND_OPS / RAND_INCREASING_OPS equal timm's _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS
    (the op lists of rand_augment_transform with inc0 / inc1), same order."""
    assert [op.name for op in rand_augment_transform("rand-m9-inc0", timm_hparams()).ops] == \
        list(common.RAND_OPS)
    assert [op.name for op in rand_augment_transform("rand-m9-inc1", timm_hparams()).ops] == \
        list(common.RAND_INCREASING_OPS)


@pytest.mark.parametrize("name", ALL_OPS)
def test_augment_op_pixel_equal_to_timm(name):
    """common.augment_op(img, name, m, fill, BICUBIC) vs timm AugmentOp(name, prob=1.0,
    magnitude=m, hparams=img_mean+interpolation), same python `random` seed (the sign flip),
    m in {0, 3, 6, 9.5, 10}, 4 seeds, 2 image shapes: pixel-equal. Posterize with 0 bits kept
    is taken as black (legacy_posterize), as timm did before Pillow 13."""
    changed, failures = False, []
    for shape in ((40, 56), (37, 29)):
        img = make_image(*shape, seed=len(name))
        for m in (0, 3, 6, 9.5, 10):
            ref_op = timm_op(name, prob=1.0, magnitude=m, hparams=timm_hparams())
            for s in range(4):
                case = f"{name} m={m} seed={s} size={img.size}"
                random.seed(s)
                ref = np.asarray(ref_op(img))
                after_ref = random.random()
                random.seed(s)
                try:
                    ours = np.asarray(common.augment_op(img, name, m, FILL, Image.BICUBIC))
                except ValueError as e:
                    failures.append(f"{case}: raised ValueError({e})")
                    continue
                if random.random() != after_ref:
                    failures.append(f"{case}: uses the random module differently")
                elif ours.shape != ref.shape or not np.array_equal(ours, ref):
                    failures.append(f"{case}: {np.count_nonzero(ours != ref)} values differ")
                changed |= not np.array_equal(ours, np.asarray(img))
    assert not failures, "\n".join(failures)
    assert changed, f"{name} never changed the test image: the comparison would be vacuous"


def test_augment_op_unknown_name_raises():
    """An op name outside the tables is an error, not a silent identity."""
    with pytest.raises(ValueError):
        common.augment_op(make_image(), "Cutout", 5)


RA_CONFIGS = ["rand-m6-mstd0.5-inc1", "rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd1.0",
              "rand-m9-n1-p1.0", "rand-m8-p0.8-mstd101-inc1", "rand-m9-n2-mstd2-mmax12-inc1"]


@pytest.mark.parametrize("spec", ["rand-m6-mstd0.5-inc1", "rand-m8-n2-mstd1.0",
                                  "rand-m7-n3-mstd1.0", "rand-m9-n1-p0.8-mstd101-mmax12",
                                  "rand-m10-inc0", "rand-m5"])
def test_parse_rand_augment_matches_timm(spec):
    """parse_rand_augment(spec) vs timm rand_augment_transform(spec): same op list, num_layers,
    per-op prob, magnitude, magnitude_std (inf for > 100) and magnitude_max (10 when unset)."""
    ra = rand_augment_transform(spec, timm_hparams())
    cfg = common.parse_rand_augment(spec)
    assert list(cfg["ops"]) == [op.name for op in ra.ops]
    assert cfg["n"] == ra.num_layers
    op = ra.ops[0]
    assert cfg["p"] == op.prob
    assert cfg["m"] == op.magnitude
    assert cfg["mstd"] == op.magnitude_std
    assert cfg["mmax"] == (op.magnitude_max or 10)


def test_parse_rand_augment_values():
    """The values the RSB recipes use, spelled out."""
    a2 = common.parse_rand_augment("rand-m6-mstd0.5-inc1")  # RSB A3
    assert (a2["m"], a2["n"], a2["p"], a2["mstd"]) == (6, 2, 0.5, 0.5)
    assert a2["ops"] == common.RAND_INCREASING_OPS
    b = common.parse_rand_augment("rand-m8-n2-mstd1.0")
    assert (b["m"], b["n"], b["mstd"]) == (8, 2, 1.0) and b["ops"] == common.RAND_OPS
    c = common.parse_rand_augment("rand-m7-n3-mstd1.0")
    assert (c["m"], c["n"], c["mstd"]) == (7, 3, 1.0)
    assert common.parse_rand_augment("rand-mstd101")["mstd"] == math.inf


@pytest.mark.parametrize("spec", ["augmix-m5", "rand-m9-x3", "rand-m9.5", "rand-nX", "rand-foo",
                                  "", "m9-rand"])
def test_parse_rand_augment_bad_string(spec):
    """A string that is not a RandAugment spec is a UserError naming it."""
    with pytest.raises(common.UserError) as e:
        common.parse_rand_augment(spec)
    assert repr(spec) in str(e.value)


def test_rand_augment_op_choice_and_probability(monkeypatch):
    """Over 6000 images (n=2, p=0.5, m=6, mstd=0.5, increasing ops) every one of the 15 ops is
    chosen uniformly (chi-square, 14 dof, < 40; p~3e-4), about half the drawn ops are applied
    (|frac - 0.5| < 0.02, 4 sd) and magnitudes have mean 6 +- 0.05 and sd 0.5 +- 0.05."""
    calls = []
    monkeypatch.setattr(common, "augment_op",
                        lambda img, name, m, fill, resample: calls.append((name, m)) or img)
    cfg = common.parse_rand_augment("rand-m6-mstd0.5-inc1")
    random.seed(0)
    np.random.seed(0)  # the op choice, as timm's
    img = make_image(4, 4)
    draws = 6000
    for _ in range(draws):
        common.rand_augment(img, cfg, FILL, Image.BICUBIC)
    names = [c[0] for c in calls]
    assert set(names) == set(cfg["ops"])
    expected = len(names) / len(cfg["ops"])
    chi2 = sum((names.count(op) - expected) ** 2 / expected for op in cfg["ops"])
    assert chi2 < 40, chi2
    assert abs(len(calls) / (draws * cfg["n"]) - cfg["p"]) < 0.02
    mags = np.array([c[1] for c in calls])
    assert abs(mags.mean() - 6) < 0.05 and abs(mags.std() - 0.5) < 0.05


def test_rand_augment_uniform_magnitude_and_clamp(monkeypatch):
    """mstd > 100: magnitude ~ U(0, m) (mean m/2 +- 0.15); mstd 2 at m 9: clamped to [0, 10]
    with some draws at exactly 10 (timm's upper bound without mmax), none above."""
    calls = []
    monkeypatch.setattr(common, "augment_op",
                        lambda img, name, m, fill, resample: calls.append(m) or img)
    random.seed(1)
    img = make_image(4, 4)
    for _ in range(3000):
        common.rand_augment(img, common.parse_rand_augment("rand-m8-p1.0-mstd101"), FILL, 3)
    mags = np.array(calls)
    assert abs(mags.mean() - 4) < 0.15 and mags.min() >= 0 and mags.max() <= 8
    calls.clear()
    for _ in range(3000):
        common.rand_augment(img, common.parse_rand_augment("rand-m9-p1.0-mstd2"), FILL, 3)
    mags = np.array(calls)
    assert mags.max() == 10.0 and (mags == 10.0).mean() > 0.2 and mags.min() >= 0


# --------------------------------------------------------------------------------------------
# Mixup / CutMix
# --------------------------------------------------------------------------------------------

def batch(n=4, h=16, w=20, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g), torch.randint(0, classes, (n,), generator=g)


def timm_mixup(lam, use_cutmix, smoothing, classes):
    m = Mixup(mixup_alpha=0.1, cutmix_alpha=1.0, label_smoothing=smoothing, num_classes=classes)
    m._params_per_batch = lambda: (lam, use_cutmix)
    return m


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("lam", [0.3, 0.5, 0.9, 0.999, 1.0])
def test_mixup_matches_timm(lam, smoothing):
    """mix_batch(x, t, C, lam, None, s) vs timm Mixup (mode 'batch', _params_per_batch fixed to
    (lam, mixup)): mixed images atol 1e-6, soft targets atol 1e-6."""
    x, t = batch()
    ref_x, ref_y = timm_mixup(lam, False, smoothing, 5)(x.clone(), t)
    ours_x, ours_y = common.mix_batch(x.clone(), t, 5, lam, None, smoothing)
    torch.testing.assert_close(ours_x, ref_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_y, ref_y, atol=1e-6, rtol=0)


# (H, W, lam): even and odd cut sides, boxes clipped at the borders for most centres
CUTMIX_CASES = [(16, 20, 0.75), (16, 20, 0.5), (16, 20, 0.1), (15, 21, 0.3), (32, 32, 0.36),
                (16, 20, 0.999), (7, 9, 0.6)]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("h,w,lam", CUTMIX_CASES)
def test_cutmix_matches_timm(h, w, lam, smoothing):
    """cutmix_box(H, W, lam, cy, cx) + mix_batch vs timm Mixup (_params_per_batch fixed to
    (lam, cutmix)), box centre drawn as timm's rand_bbox does (np.random.randint(0, H) then
    (0, W)) from the same np.random seed, 20 seeds: box and corrected lam equal to timm's
    cutmix_bbox_and_lam exactly, mixed images exact, soft targets atol 1e-6."""
    x, t = batch(h=h, w=w)
    clipped = 0
    for seed in range(20):
        np.random.seed(seed)
        ref_x, ref_y = timm_mixup(lam, True, smoothing, 5)(x.clone(), t)
        np.random.seed(seed)
        ref_box, ref_lam = cutmix_bbox_and_lam(x.shape, lam)
        np.random.seed(seed)
        cy, cx = np.random.randint(0, h), np.random.randint(0, w)
        box, lam_c = common.cutmix_box(h, w, lam, cy, cx)
        ctx = f"H={h} W={w} lam={lam} seed={seed} centre=({cy},{cx})"
        assert tuple(int(v) for v in ref_box) == box, f"{ctx}: box {box} vs timm {ref_box}"
        assert lam_c == ref_lam, ctx
        ours_x, ours_y = common.mix_batch(x.clone(), t, 5, lam_c, box, smoothing)
        assert torch.equal(ours_x, ref_x), ctx
        torch.testing.assert_close(ours_y, ref_y, atol=1e-6, rtol=0)
        clipped += box[0] == 0 or box[1] == h or box[2] == 0 or box[3] == w
    assert clipped > 0 or lam > 0.99


def test_soft_targets_values():
    """smooth_one_hot: off s/C, on 1-s+s/C (timm one_hot in mixup_target); rows sum to 1; the
    mixed target of a pair puts lam on its own class and 1-lam on the partner's."""
    t = torch.tensor([0, 3, 1, 3])
    y = common.smooth_one_hot(t, 4, 0.1)
    assert torch.allclose(y.sum(1), torch.ones(4))
    assert y[0, 0].item() == pytest.approx(0.925) and y[0, 1].item() == pytest.approx(0.025)
    x = torch.zeros(4, 3, 2, 2)
    _, mixed = common.mix_batch(x, t, 4, 0.7, None, 0.0)
    assert torch.allclose(mixed[0], torch.tensor([0.7, 0.0, 0.0, 0.3]))  # pairs with t[3]=3
    assert torch.allclose(mixed[1], torch.tensor([0.0, 0.3, 0.0, 0.7]))  # pairs with t[2]=1


def test_mix_params_distribution():
    """mix_params with numpy default_rng(0), 4000 draws each:
    both alphas on: cutmix chosen 50% +- 3%; cutmix lam vs an independent Beta(1, 1) sample and
    mixup lam vs Beta(0.1, 0.1): two-sample KS statistic < 0.07 (a swapped alpha gives > 0.3);
    only mixup on: never cutmix; only cutmix on: always; switch_prob 0.2 gives 20% +- 3%."""
    n = 4000
    rng = np.random.default_rng(0)
    draws = [common.mix_params(rng, 0.1, 1.0) for _ in range(n)]
    cut = np.array([lam for lam, c in draws if c])
    mix = np.array([lam for lam, c in draws if not c])
    assert abs(len(cut) / n - 0.5) < 0.03
    assert all(isinstance(lam, float) and 0 <= lam <= 1 for lam, _ in draws)

    from test_streams import ks  # (statistic, critical value)
    ref = np.random.default_rng(123)
    assert ks(cut, ref.beta(1.0, 1.0, n))[0] < 0.07
    assert ks(mix, ref.beta(0.1, 0.1, n))[0] < 0.07
    assert ks(mix, ref.beta(1.0, 1.0, n))[0] > 0.3  # the bound can tell the two apart
    assert abs(cut.mean() - 0.5) < 0.03
    assert not any(common.mix_params(rng, 0.8, 0.0)[1] for _ in range(500))
    assert all(common.mix_params(rng, 0.0, 1.0)[1] for _ in range(500))
    frac = np.mean([common.mix_params(rng, 0.1, 1.0, switch_prob=0.2)[1] for _ in range(n)])
    assert abs(frac - 0.2) < 0.03


@pytest.mark.parametrize("mixup,cutmix", [(0.1, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_odd_batch(mixup, cutmix):
    """mixup_cutmix on a batch of 5 (timm refuses odd batches): targets rows sum to 1, the middle
    sample is mixed with itself, so its image is unchanged (atol 1e-6) and its target is its own
    class with weight 1 (smoothing 0) or the smoothed one-hot (smoothing 0.1)."""
    rng = np.random.default_rng(0)
    for seed in range(10):
        x, t = batch(n=5, seed=seed)
        for smoothing in (0.0, 0.1):
            mx, y = common.mixup_cutmix(x.clone(), t, 5, mixup, cutmix, smoothing, rng)
            assert mx.shape == x.shape and y.shape == (5, 5)
            torch.testing.assert_close(y.sum(1), torch.ones(5), atol=1e-6, rtol=0)
            torch.testing.assert_close(mx[2], x[2], atol=1e-6, rtol=0)
            torch.testing.assert_close(y[2], common.smooth_one_hot(t[2:3], 5, smoothing)[0],
                                       atol=1e-6, rtol=0)
            if smoothing == 0.0:
                assert y[2, t[2]].item() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Normalisation on the device
# --------------------------------------------------------------------------------------------

def test_normalize_matches_prefetch_loader_and_torchvision():
    """normalize(uint8 NCHW) vs timm PrefetchLoader (CPU) on the same batch: exact; vs
    torchvision ToTensor + Normalize(IMAGENET mean, std) per image: atol 1e-5."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 9, 11), dtype=torch.uint8, generator=g)
    target = torch.arange(3)
    ref, _ = next(iter(PrefetchLoader([(images, target)], device=torch.device("cpu"))))
    ours = common.normalize(images)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    tv = T.Compose([T.ToTensor(), T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])
    for i in range(3):
        hwc = images[i].permute(1, 2, 0).numpy()
        torch.testing.assert_close(ours[i], tv(Image.fromarray(hwc)), atol=1e-5, rtol=0)
    # channels_last input (what collate gives) normalises to the same values
    assert torch.equal(common.normalize(images.contiguous(memory_format=torch.channels_last)),
                       ref)


class _FixedBeta:
    """Stands in for the Beta distribution of torchvision's MixUp / CutMix: a given lambda."""

    def __init__(self, lam):
        self.lam = lam

    def sample(self, shape):
        return torch.tensor(self.lam)


@pytest.mark.parametrize("h,w,lam", [(32, 32, 0.3), (31, 17, 0.7), (9, 40, 0.05), (24, 24, 0.97)])
def test_tv_style_cutmix_and_mixup_match_torchvision_v2(h, w, lam):
    """mixup_style "tv": partner = the batch rolled by one, tv's CutMix box (half-sides
    int(0.5 sqrt(1 - lam) * side) around a centre drawn with torch.randint(W), then (H)), against
    torchvision.transforms.v2.CutMix / MixUp with their Beta draw fixed to `lam`; 6 centres
    each. Images exact, targets 1e-6."""
    from torchvision.transforms import v2
    x = torch.randn(5, 3, h, w)
    target = torch.tensor([0, 3, 1, 2, 3])
    for seed in range(6):
        cut = v2.CutMix(alpha=1.0, num_classes=4)
        cut._dist = _FixedBeta(lam)
        torch.manual_seed(seed)
        cx, cy = int(torch.randint(w, (1,))), int(torch.randint(h, (1,)))
        torch.manual_seed(seed)
        ref_x, ref_y = cut(x.clone(), target.clone())
        box, lam_box = common.cutmix_box_tv(h, w, lam, cy, cx)
        ours_x, ours_y = common.mix_batch(x.clone(), target, 4, lam_box, box, partner="roll")
        assert torch.equal(ours_x, ref_x), (seed, box)
        torch.testing.assert_close(ours_y, ref_y, atol=1e-6, rtol=0)
    mix = v2.MixUp(alpha=1.0, num_classes=4)
    mix._dist = _FixedBeta(lam)
    ref_x, ref_y = mix(x.clone(), target.clone())
    ours_x, ours_y = common.mix_batch(x.clone(), target, 4, lam, partner="roll")
    torch.testing.assert_close(ours_x, ref_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_y, ref_y, atol=1e-6, rtol=0)
    assert not torch.equal(ours_x, x)  # the mix did something
