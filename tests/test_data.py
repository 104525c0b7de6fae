"""Data section: ImageFolder, train and eval transforms, collate, demo data, against timm and
torchvision (test-only references). Pixel-equal means exact uint8 equality."""
import math
import os
import random

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from timm.data import create_transform
from timm.data.loader import fast_collate
from timm.data.transforms import RandomResizedCropAndInterpolation, ToNumpy

import common

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def make_image(h=40, w=56, seed=0):
    """Seeded noise over a gradient plus a coloured block, so crops and resizes show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 40 + 120 * xx / max(w - 1, 1) + 30 * yy / max(h - 1, 1)
    arr = base[..., None] + rng.integers(-25, 26, (h, w, 3))
    arr[h // 4:h // 2 + 1, w // 3:w // 2 + 1] = (200, 60, 90)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Train transform: RandomResizedCrop (+ flip, + RandAugment)
# --------------------------------------------------------------------------------------------

# (height, width): ordinary, odd, very wide / very tall (the fallback branch some or all of the
# time), tiny
SHAPES = [(40, 56), (31, 33), (20, 200), (200, 20), (10, 400), (5, 3)]


@pytest.mark.parametrize("h,w", SHAPES)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_random_resized_crop_pixel_equal_to_timm(h, w, interpolation):
    """TrainTransform(24, interp, no RandAugment, hflip 0) vs timm
    RandomResizedCropAndInterpolation(24, interpolation=interp), same python `random` seed,
    40 seeds per shape: crop params equal to timm's get_params, output pixel-equal."""
    img = make_image(h, w, seed=h + w)
    ours_t = common.TrainTransform(24, interpolation, auto_augment=None, hflip=0.0)
    ref_t = RandomResizedCropAndInterpolation(24, interpolation=interpolation)
    fallbacks = 0
    for s in range(40):
        random.seed(s)
        ref_params = ref_t.get_params(img, SCALE, RATIO)
        random.seed(s)
        params = common.random_resized_crop_params(w, h, SCALE, RATIO)
        assert params == ref_params, f"{w}x{h} seed={s}"
        random.seed(s)
        ref = np.asarray(ref_t(img))
        random.seed(s)
        ours = ours_t(img)
        assert ours.dtype == np.uint8 and ours.shape == (24, 24, 3)
        assert np.array_equal(ours, ref), f"{w}x{h} seed={s}"
        fallbacks += params[0] == (h - params[2]) // 2 and params[1] == (w - params[3]) // 2
    if (h, w) == (10, 400):
        assert fallbacks == 40  # no crop of 8%..100% area and ratio 3/4..4/3 fits


@pytest.mark.parametrize("w,h,scale", [(400, 10, SCALE), (10, 400, SCALE), (1000, 20, SCALE),
                                       (7, 333, SCALE), (50, 40, (1.5, 2.0)), (7, 7, (1.2, 1.3))])
def test_fallback_is_torchvisions(w, h, scale):
    """When no sampled crop can fit (h or w of every 8%..100% crop exceeds the image, or
    scale > 1), the crop is
    torchvision's RandomResizedCrop.get_params fallback: the central crop with the aspect
    clamped to `ratio` (whole image when in range). Equal (top, left, h, w)."""
    img = Image.new("RGB", (w, h))
    ref = T.RandomResizedCrop.get_params(img, list(scale), list(RATIO))
    random.seed(0)
    assert common.random_resized_crop_params(w, h, scale, RATIO) == tuple(ref)


def test_random_resized_crop_params_uses_rng_argument():
    """A random.Random passed as rng gives the same params as the module seeded alike, and
    leaves the module's state alone."""
    random.seed(3)
    expected = common.random_resized_crop_params(56, 40, SCALE, RATIO)
    random.seed(99)
    before = random.getstate()
    assert common.random_resized_crop_params(56, 40, SCALE, RATIO, rng=random.Random(3)) == expected
    assert random.getstate() == before


def test_hflip():
    """hflip=1.0 gives timm's RandomResizedCropAndInterpolation output mirrored left-right
    (same seed; the flip draws from torch, as timm's and tv's RandomHorizontalFlip), pixel-equal; hflip 0.5 flips
    about half of 400 draws (+-0.1)."""
    img = make_image()
    ref_t = RandomResizedCropAndInterpolation(24, interpolation="bicubic")
    for s in range(10):
        random.seed(s)
        plain = np.asarray(ref_t(img))
        random.seed(s)
        flipped = common.TrainTransform(24, hflip=1.0)(img)
        assert np.array_equal(flipped, plain[:, ::-1])
    t, t0 = common.TrainTransform(8, hflip=0.5), common.TrainTransform(8, hflip=0.0)
    flips = 0
    for s in range(400):
        random.seed(s)
        a = t(img)
        random.seed(s)
        flips += not np.array_equal(a, t0(img))
    assert abs(flips / 400 - 0.5) < 0.1


# --------------------------------------------------------------------------------------------
# Eval transform: resize short side, center crop
# --------------------------------------------------------------------------------------------

EVAL_SHAPES = [(40, 56), (56, 40), (67, 67), (70, 300), (97, 41), (100, 80), (33, 35)]


@pytest.mark.parametrize("h,w", EVAL_SHAPES)
@pytest.mark.parametrize("size,crop_pct", [(64, 0.95), (48, 0.875), (32, 1.0)])
def test_eval_transform_pixel_equal_to_timm(h, w, size, crop_pct):
    """EvalTransform(size, floor(size / crop_pct), 'bicubic') vs timm create_transform(size,
    is_training=False, interpolation='bicubic', crop_pct) without its ToTensor + Normalize:
    the resize equals timm's scale size, output pixel-equal."""
    timm_t = create_transform(size, is_training=False, interpolation="bicubic", crop_pct=crop_pct)
    steps = list(timm_t.transforms)
    assert [type(t).__name__ for t in steps] == ["Resize", "CenterCrop", "MaybeToTensor",
                                                 "Normalize"]
    resize = math.floor(size / crop_pct)
    assert steps[0].size == resize
    assert common.resolve(dict(eval_size=size, crop_pct=crop_pct))["eval_resize"] == resize
    img = make_image(h, w, seed=h * w)
    ref = np.asarray(T.Compose(steps[:2])(img))
    ours = common.EvalTransform(size, resize, "bicubic")(img)
    assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
    assert np.array_equal(ours, ref), f"{w}x{h} size={size} crop_pct={crop_pct}"


@pytest.mark.parametrize("h,w", EVAL_SHAPES)
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_eval_transform_pixel_equal_to_torchvision(h, w, interpolation):
    """EvalTransform(56, 64, interp) vs torchvision Resize(64, interp) + CenterCrop(56) (the tv
    reference's eval preset): pixel-equal."""
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "nearest": T.InterpolationMode.NEAREST}
    img = make_image(h, w, seed=h + 7 * w)
    ref = np.asarray(T.Compose([T.Resize(64, mode[interpolation]), T.CenterCrop(56)])(img))
    assert np.array_equal(common.EvalTransform(56, 64, interpolation)(img), ref)


# --------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------

def test_collate():
    """collate(list of (HWC uint8, int)) -> uint8 N,3,H,W equal to np.transpose of the stack,
    int64 targets; the same tensor as timm's fast_collate of ToNumpy (CHW) images."""
    imgs = [make_image(12, 10, seed=i) for i in range(3)]
    batch = [(common.to_uint8(im), t) for im, t in zip(imgs, (2, 0, 7))]
    x, y = common.collate(batch)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 3, 12, 10)
    assert np.array_equal(x.numpy(), np.transpose(np.stack([b[0] for b in batch]), (0, 3, 1, 2)))
    assert y.dtype == torch.int64 and y.tolist() == [2, 0, 7]
    ref_x, ref_y = fast_collate([(ToNumpy()(im), t) for im, t in zip(imgs, (2, 0, 7))])
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------

def save(path, seed=0, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(size[1], size[0], seed=seed).save(path)
    return path


def test_find_images_matches_torchvision_image_folder(tmp_path):
    """find_images(root) vs torchvision.datasets.ImageFolder(root): same classes (sorted by
    name, capitals first) and the same (path, index) list, with nested folders, upper-case
    extensions and non-image files."""
    save(tmp_path / "b" / "2.png")
    save(tmp_path / "b" / "1.JPG", 1)
    save(tmp_path / "a" / "sub" / "z.jpeg", 2)
    save(tmp_path / "a" / "y.bmp", 3)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    save(tmp_path / "C" / "0.webp", 4)
    ref = torchvision.datasets.ImageFolder(str(tmp_path))
    samples, classes = common.find_images(tmp_path)
    assert classes == ["C", "a", "b"] == ref.classes
    assert samples == ref.samples
    ds = common.ImageFolder(tmp_path, common.to_uint8)
    assert len(ds) == 5 and ds.classes == classes
    arr, target = ds[1]
    assert target == 1 and arr.dtype == np.uint8 and arr.shape == (6, 8, 3)


def test_missing_folder(tmp_path):
    """A data folder that is not there: UserError saying 'does not exist'."""
    with pytest.raises(common.UserError, match="does not exist"):
        common.find_images(tmp_path / "nope")
    with pytest.raises(common.UserError, match="does not exist"):
        common.ImageFolder(tmp_path / "nope", common.to_uint8)


def test_no_class_folders(tmp_path):
    """Images directly in the root and no sub-folder: UserError 'no class folders'."""
    save(tmp_path / "img.png")
    with pytest.raises(common.UserError, match="no class folders"):
        common.find_images(tmp_path)


def test_empty_class_folder(tmp_path):
    """A class folder with no image (only a text file): UserError naming that folder."""
    save(tmp_path / "cat" / "0.png")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("x")
    with pytest.raises(common.UserError, match="has no images") as e:
        common.find_images(tmp_path)
    assert str(tmp_path / "dog") in str(e.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_unreadable_image(tmp_path, capsys, kind):
    """A corrupt a/0.jpg (garbage bytes, or a JPEG cut in half): skip_bad=False raises
    UserError 'cannot read image <path>'; skip_bad=True returns the next sample (a/1.jpg, its
    pixels and class) and notes the path and reason in .skipped. A bad last sample wraps to the first."""
    bad = tmp_path / "a" / "0.jpg"
    bad.parent.mkdir(parents=True)
    if kind == "garbage":
        bad.write_bytes(os.urandom(300))
    else:
        save(tmp_path / "full.jpg", 9, (40, 30))
        data = (tmp_path / "full.jpg").read_bytes()
        (tmp_path / "full.jpg").unlink()
        bad.write_bytes(data[:len(data) // 2])
    good = save(tmp_path / "a" / "1.jpg", 1)
    save(tmp_path / "b" / "0.jpg", 2)
    strict = common.ImageFolder(tmp_path, common.to_uint8)
    with pytest.raises(common.UserError, match="cannot read image") as e:
        strict[0]
    assert str(bad) in str(e.value)
    lenient = common.ImageFolder(tmp_path, common.to_uint8, skip_bad=True)
    arr, target = lenient[0]
    with Image.open(good) as im:
        assert np.array_equal(arr, np.asarray(im.convert("RGB")))
    assert target == 0
    assert len(lenient.skipped) == 1 and lenient.skipped[0].startswith(f"{bad}: ")
    # the bad file last: index wraps around to the first sample
    (tmp_path / "b" / "0.jpg").write_bytes(b"not a jpeg")
    arr, target = lenient[2]
    assert target == 0 and arr.shape == (6, 8, 3)


# --------------------------------------------------------------------------------------------
# Demo data
# --------------------------------------------------------------------------------------------

def test_make_demo_data(tmp_path, monkeypatch):
    """make_demo_data: root/{train,val}/<class>/<i>.jpg, the first `classes` of DEMO_CLASSES,
    the DONE marker, no temporary folder left; two calls into different folders give
    byte-identical files; a second call into a finished folder writes nothing; another seed
    gives other pictures."""
    kw = dict(train_per_class=3, val_per_class=2, size=40, classes=3)
    a = common.make_demo_data(tmp_path / "d", **kw)
    b = common.make_demo_data(tmp_path / "e", **kw)
    assert a == tmp_path / "d" and (a / "DONE").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "e"]

    def files(root):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    names = files(a)
    classes = list(common.DEMO_CLASSES[:3])
    expected = ["DONE"] + [f"{split}/{c}/{i:04d}.jpg" for split, n in (("train", 3), ("val", 2))
                           for c in classes for i in range(n)]
    assert names == sorted(expected)
    assert files(b) == names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    samples, found = common.find_images(a / "train")
    assert found == sorted(classes) and len(samples) == 9
    with Image.open(a / "val" / classes[1] / "0001.jpg") as im:
        assert im.size == (40, 40) and im.mode == "RGB"
    # pictures differ between samples
    assert (a / "train" / classes[0] / "0000.jpg").read_bytes() != \
        (a / "train" / classes[0] / "0001.jpg").read_bytes()
    stamp = (a / "train" / classes[0] / "0000.jpg").stat().st_mtime_ns
    with monkeypatch.context() as mp:
        mp.setattr(common, "draw_demo_image", lambda *args: pytest.fail("redrew demo data"))
        assert common.make_demo_data(a, **kw) == a
    assert (a / "train" / classes[0] / "0000.jpg").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "e"]
    c = common.make_demo_data(tmp_path / "f", seed=1, **kw)
    assert (c / names[1]).read_bytes() != (a / names[1]).read_bytes()
