"""--device-aug: RandAugment / TrivialAugment primitives applied to the batch by
common.device_augment equal Pillow's output (common.apply_op, itself pixel-equal to timm and
torchvision in test_augment*.py) bit for bit, and a TrainTransform that defers its ops makes the
same random draws as one that applies them. Tolerance everywhere: 0 grey levels."""
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import common
from test_train import rows, train

FILL = (124, 116, 104)  # timm's fill: the ImageNet mean in 0-255


def photo(w, h, seed=0):
    """Smooth waves, noise and a flat band: gradients for the interpolation, outliers for the
    histogram ops, a plateau for the blends."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([128 + 100 * np.sin(xx / 7.0 + c) * np.cos(yy / 5.0 - c) for c in range(3)], -1)
    arr = arr + rng.normal(0, 20, arr.shape)
    arr[h // 3:h // 2] = rng.integers(0, 256, 3)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


IMAGES = [photo(37, 29, 0), photo(48, 48, 1), photo(2, 5, 2),
          Image.new("RGB", (9, 7), (30, 200, 90))]  # constant: autocontrast / equalize keep it


def batch_of(imgs):
    return torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2)


def on_device(img, op, resample, fill=FILL, device="cpu"):
    ops = torch.from_numpy(common.encode_ops([op], 1))[None]
    out = common.device_augment(batch_of([img]).to(device), ops, resample, fill)
    return out[0].permute(1, 2, 0).cpu().numpy()


def affine_args(size):
    w, h = size
    shear = math.degrees(math.atan(0.7))
    return ([common.rotate_matrix(a, size) for a in (0, 90, 180, 270, 13.7, -29.1, 135, -100)]
            + [(1, s, 0, 0, 1, 0) for s in (0.3, -0.21)] + [(1, 0, 0, -0.17, 1, 0)]
            + [(1, 0, 0.45 * w, 0, 1, 0), (1, 0, 0, 0, 1, -0.3 * h)]
            + [common._tv_affine_matrix([0, 0], 0.0, [0, 0], [shear, 0.0]),
               common._tv_affine_matrix([w * 0.5, h * 0.5], 0.0, [-7, 0], [0.0, 0.0])])


ARGS = {"posterize": [0, 1, 4, 7, 8], "solarize": [0, 26, 128.0, 200.5, 256],
        "solarize_add": [0, 33, 110], "brightness": [0.1, 0.55, 1.0, 1.9],
        "color": [0.1, 0.55, 1.3, 1.9], "contrast": [0.1, 0.55, 1.3, 1.9],
        "sharpness": [0.1, 0.55, 1.3, 1.99]}


@pytest.mark.parametrize("name", common.PRIMITIVES)
def test_primitive_equals_pillow(name):
    """Each primitive over its range (every RandAugment / TrivialAugment argument kind, the
    rotations Pillow shortcuts to transposes, a 2x5 image below the smoothing kernel, a
    constant image) on bicubic and bilinear: the same uint8 pixels as Pillow."""
    for img in IMAGES:
        if name == "affine":
            cases = [(("affine", *a), r) for a in affine_args(img.size)
                     for r in (Image.BICUBIC, Image.BILINEAR)]
        else:
            cases = [((name,) if a is None else (name, a), Image.BICUBIC)
                     for a in ARGS.get(name, [None])]
        for op, resample in cases:
            ref = np.asarray(common.apply_op(img, op, resample, FILL))
            np.testing.assert_array_equal(on_device(img, op, resample), ref, err_msg=str(op))


def random_args(name, size, rng):
    w, h = size
    if name == "affine":
        kind = rng.integers(3)
        if kind == 0:
            return common.rotate_matrix(rng.uniform(-135, 135), size)
        s = rng.uniform(-0.99, 0.99)
        return (1, s, rng.uniform(-0.45, 0.45) * w, 0, 1, 0) if kind == 1 else (1, 0, 0, s, 1, 0)
    if name in ("posterize",):
        return (int(rng.integers(0, 9)),)
    if name in ("solarize", "solarize_add"):
        return (float(rng.uniform(0, 256)) if name == "solarize" else int(rng.integers(0, 129)),)
    if name in ("brightness", "color", "contrast", "sharpness"):
        return (float(rng.uniform(0.0, 2.0)),)
    return ()


@pytest.mark.parametrize("name", [p for p in common.PRIMITIVES if p != "identity"])
def test_primitive_sweep_equals_pillow(name):
    """300 small images with random value ranges and random arguments in one batch, each
    image against Pillow: catches the rare argument where a last float bit flips a pixel."""
    rng = np.random.default_rng(7)
    imgs, ops = [], []
    for _ in range(300):
        lo = int(rng.integers(0, 250))
        hi = int(rng.integers(lo, 256))
        imgs.append(Image.fromarray(rng.integers(lo, hi + 1, (7, 9, 3)).astype(np.uint8)))
        ops.append((name, *random_args(name, imgs[-1].size, rng)))
    encoded = torch.from_numpy(np.stack([common.encode_ops([op], 1) for op in ops]))
    for resample in (Image.BICUBIC, Image.BILINEAR) if name == "affine" else (Image.BICUBIC,):
        out = common.device_augment(batch_of(imgs), encoded, resample, FILL)
        for img, op, got in zip(imgs, ops, out):
            ref = np.asarray(common.apply_op(img, op, resample, FILL))
            np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), ref, err_msg=str(op))


def test_mixed_batch_two_slots():
    """A batch where images draw different ops in each slot (identity included) equals each
    image run through its own ops in order."""
    rng = random.Random(0)
    imgs = [photo(40, 32, s) for s in range(12)]
    names = [p for p in common.PRIMITIVES]
    ops = []
    for img in imgs:
        pair = []
        for _ in range(2):
            name = rng.choice(names)
            if name == "affine":
                pair.append(("affine", *common.rotate_matrix(rng.uniform(-30, 30), img.size)))
            else:
                pair.append((name, rng.choice(ARGS[name])) if name in ARGS else (name,))
        ops.append(pair)
    encoded = torch.from_numpy(np.stack([common.encode_ops(p, 2) for p in ops]))
    out = common.device_augment(batch_of(imgs), encoded, Image.BICUBIC, FILL)
    for img, pair, got in zip(imgs, ops, out):
        for op in pair:
            img = common.apply_op(img, op, Image.BICUBIC, FILL)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), np.asarray(img),
                                      err_msg=str(pair))


def test_nearest_is_refused():
    op = ("affine", *common.rotate_matrix(10.0, (8, 8)))
    with pytest.raises(common.UserError, match="bilinear or bicubic"):
        on_device(photo(8, 8), op, Image.NEAREST)


def draw(transform, img, seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    out = transform(img)
    return out, (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())


@pytest.mark.parametrize("spec,interpolation", [
    ("rand-m7-mstd0.5-inc1", "bicubic"),  # A1 / A2
    ("rand-m7-n3-mstd1.0", "bicubic"),    # C / D
    ("rand-m15-n2-mmax15", "bicubic"),    # RS, the larger models
    ("ta_wide", "bilinear"),              # tv
])
def test_train_transform_defers_the_same_ops(spec, interpolation):
    """TrainTransform(device_aug=True) + collate + to_device(augment=on_device) gives the
    batch the worker path gives, and leaves random, numpy and torch in the same states."""
    imgs = [photo(90, 70, s) for s in range(16)]
    plain = common.TrainTransform(48, interpolation, spec)
    deferred = common.TrainTransform(48, interpolation, spec, device_aug=True)
    expect, got = [], []
    for seed, img in enumerate(imgs):
        a, state_a = draw(plain, img, seed)
        b, state_b = draw(deferred, img, seed)
        assert isinstance(b, tuple) and b[1].shape == (1 if spec == "ta_wide" else
                                                       plain.rand_augment["n"], 7)
        assert state_a[0] == state_b[0]
        np.testing.assert_array_equal(state_a[1], state_b[1])
        assert torch.equal(state_a[2], state_b[2])
        expect.append((a, seed % 3))
        got.append((b, seed % 3))
    (x, y), = common.to_device([common.collate(expect)], torch.device("cpu"))
    (x2, y2), = common.to_device([common.collate(got)], torch.device("cpu"),
                                 deferred.on_device)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, common.normalize(common.collate(
        [(g[0][0], 0) for g in got])[0]))  # the ops did change the images


def test_train_run_with_device_aug_equals_run_without(tiny_data, tmp_path):
    """train_a3.py, 1 epoch on CPU with 0 workers: --device-aug gives the same losses and
    accuracy to the last digit, as the pixels and draws are the same."""
    runs = []
    for name, extra in (("plain", ()), ("device", ("--device-aug",))):
        res = train(tiny_data, tmp_path / name, "--epochs", "1", *extra)
        assert res.returncode == 0, res.stderr
        runs.append(rows(tmp_path / name))
    keys = ("train_loss", "val_loss", "top1")
    assert [[r[k] for k in keys] for r in runs[0]] == [[r[k] for k in keys] for r in runs[1]]
    assert json.loads((tmp_path / "device" / "recipe.json").read_text())["auto_augment"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_primitives_on_cuda_equal_pillow():
    img = photo(64, 48, 3)
    for name in common.PRIMITIVES:
        cases = ([("affine", *a) for a in affine_args(img.size)] if name == "affine" else
                 [(name,) if a is None else (name, a) for a in ARGS.get(name, [None])])
        for op in cases:
            ref = np.asarray(common.apply_op(img, op, Image.BICUBIC, FILL))
            np.testing.assert_array_equal(on_device(img, op, Image.BICUBIC, device="cuda"), ref,
                                          err_msg=str(op))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_augment_on_cuda_never_syncs():
    """device_augment runs on the prefetch side stream while the step trains: it must not block
    the host (set_sync_debug_mode("error") raises on a synchronising call), and its result
    must equal the same call on the CPU."""
    rng = np.random.default_rng(1)
    names = [p for p in common.PRIMITIVES]
    imgs = [photo(64, 48, s) for s in range(48)]
    ops = [[(n, *random_args(n, (64, 48), rng)) for n in (names[i % len(names)],
                                                         names[(5 * i) % len(names)])]
           for i in range(len(imgs))]
    encoded = torch.from_numpy(np.stack([common.encode_ops(p, 2) for p in ops]))
    expect = common.device_augment(batch_of(imgs), encoded, Image.BICUBIC, FILL)
    x = batch_of(imgs).cuda()
    common.device_augment(x.clone(), encoded, Image.BICUBIC, FILL)  # warm-up (cached tensors)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = common.device_augment(x, encoded, Image.BICUBIC, FILL)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out.cpu(), expect)
