"""The speed paths of the input pipeline: --fast-decode (JPEG draft decoding) keeps the random
draws and the crop geometry of the exact path and changes pixels only a little; the device
loader (to_device) yields exactly the normalised batches."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

import common


def smooth_jpeg(path, w=400, h=300, seed=0, quality=95, fmt="JPEG"):
    """A smooth picture (gradients and soft blobs), where a scaled decode is close to a
    bicubic downscale, and a mistake in the crop geometry is not."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([255 * xx / w, 255 * yy / h, 128 + 60 * np.sin(xx / 23 + yy / 31)], -1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(15, 60)
        arr += rng.uniform(-90, 90, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2)[..., None]
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, fmt, quality=quality)
    return path


def run(transform, path, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    with Image.open(path) as img:
        out = transform(img)
    return out, (random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy())


def test_decode_reduction():
    assert common.decode_reduction(500, 375, 400, 330, 160) == 2
    assert common.decode_reduction(500, 375, 319, 330, 160) == 1
    assert common.decode_reduction(500, 375, 300, 260, 64) == 4
    assert common.decode_reduction(500, 375, 500, 375, 32) == 8
    assert common.decode_reduction(40, 40, 40, 40, 4) == 4  # 8 would leave under 8x8 blocks


@pytest.mark.parametrize("size,aa", [(48, None), (32, "rand-m9-mstd0.5-inc1"), (40, "ta_wide")])
def test_fast_decode_same_draws_close_pixels(tmp_path, size, aa):
    """Per seed: the same random state after the transform (same draws, so the same crop, flip
    and RandAugment ops), and the output within a few grey levels of the exact path where the
    draft applied; identical where it did not. A crop box not scaled to the reduced image
    would be off by 30+ levels."""
    path = smooth_jpeg(tmp_path / "a.jpg")
    exact = common.TrainTransform(size, "bicubic", aa)
    fast = common.TrainTransform(size, "bicubic", aa, fast_decode=True)
    reduced = 0
    for seed in range(40):
        a, state_a = run(exact, path, seed)
        b, state_b = run(fast, path, seed)
        assert state_a[0] == state_b[0] and torch.equal(state_a[1], state_b[1])
        assert np.array_equal(state_a[2], state_b[2])
        diff = np.abs(a.astype(np.int16) - b).mean()
        random.seed(seed)
        top, left, h, w = common.random_resized_crop_params(400, 300, (0.08, 1.0), (3 / 4, 4 / 3))
        if common.decode_reduction(400, 300, w, h, size) > 1:
            reduced += 1
            assert diff < 3.0, (seed, diff)
        else:
            assert diff == 0, seed
    assert reduced >= 10  # the test exercises the draft path


def test_fast_decode_draft_really_decodes_less(tmp_path, monkeypatch):
    """The JPEG is decoded at the reduced size (so the saving is real), and a PNG, which has no
    scaled decode, goes the exact way with identical output."""
    jpg = smooth_jpeg(tmp_path / "a.jpg")
    png = smooth_jpeg(tmp_path / "a.png", fmt="PNG")
    sizes = []
    load = Image.Image.load

    def spy(self):
        sizes.append(self.size)
        return load(self)
    monkeypatch.setattr(Image.Image, "load", spy)
    fast = common.TrainTransform(24, "bicubic", None, scale=(0.9, 1.0), fast_decode=True)
    run(fast, jpg, 0)
    assert sizes[0] == (50, 38)  # 400 x 300 at 1/8: ceil'd by libjpeg
    monkeypatch.setattr(Image.Image, "load", load)
    exact = common.TrainTransform(24, "bicubic", None, scale=(0.9, 1.0))
    for seed in range(5):
        assert np.array_equal(run(fast, png, seed)[0], run(exact, png, seed)[0])


def test_fast_decode_grey_and_cmyk_jpegs(tmp_path):
    """Other JPEG modes come out RGB, of the right size, close to the exact path."""
    base = smooth_jpeg(tmp_path / "a.jpg")
    for mode in ("L", "CMYK"):
        path = tmp_path / f"{mode}.jpg"
        Image.open(base).convert(mode).save(path, quality=95)
        fast = common.TrainTransform(32, "bicubic", None, scale=(0.9, 1.0), fast_decode=True)
        exact = common.TrainTransform(32, "bicubic", None, scale=(0.9, 1.0))
        a, b = run(exact, path, 1)[0], run(fast, path, 1)[0]
        assert a.shape == b.shape == (32, 32, 3)
        assert np.abs(a.astype(np.int16) - b).mean() < 3.0


def test_to_device_yields_normalised_batches():
    batches = [(torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8), torch.arange(3) + i)
               for i in range(4)]
    out = list(common.to_device(batches, torch.device("cpu")))
    assert len(out) == 4
    for (images, target), (x, y) in zip(batches, out):
        assert torch.equal(x, common.normalize(images)) and torch.equal(y, target)
    assert list(common.to_device([], torch.device("cpu"))) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_cuda_prefetch_matches():
    batches = [(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8).pin_memory(),
                torch.arange(4)) for _ in range(5)]
    for (images, target), (x, y) in zip(batches, common.to_device(batches, torch.device("cuda"))):
        assert x.is_cuda and torch.equal(x.cpu(), common.normalize(images))


def test_image_folder_passes_the_undecoded_file(tmp_path):
    """The dataset hands the transform the opened file (size known, pixels not yet decoded),
    and a plain transform still gets RGB pixels."""
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    smooth_jpeg(root / "a" / "x.jpg", w=64, h=48)
    seen = []

    def transform(img):
        seen.append((img.size, getattr(img, "tile", None) not in (None, [])))
        return common.to_uint8(img)
    arr, target = common.ImageFolder(root, transform)[0]
    assert seen == [((64, 48), True)] and arr.shape == (48, 64, 3) and target == 0
    buf = io.BytesIO()
    Image.open(root / "a" / "x.jpg").convert("L").save(buf, "PNG")
    (root / "a" / "y.png").write_bytes(buf.getvalue())
    assert common.ImageFolder(root, common.to_uint8)[1][0].shape == (48, 64, 3)


@pytest.mark.parametrize("opt", ["lamb", "rmsproptf", "adamp", "sgd"])
def test_cpu_slices_give_the_same_steps(opt, monkeypatch):
    """On the CPU the optimizers run their multi-tensor ops on slices of the parameters
    (param_slices); slices of a few tensors must give exactly the steps of one whole-model slice
    (LAMB's global gradient norm, AdamP's per-tensor projection and AGC included)."""
    recipe = dict(opt=opt, lr=0.01, weight_decay=0.05, wd_groups="timm", opt_eps=None,
                  opt_betas=None, momentum=0.9, nesterov=True)
    results = []
    for chunk in (2 ** 40, 300):
        monkeypatch.setattr(common, "CPU_CHUNK", chunk)
        torch.manual_seed(0)
        model = common.create_model("resnet18", num_classes=7)
        assert len(common.param_slices(list(model.parameters()))) == (1 if chunk > 2 ** 30 else 52)
        optimizer = common.create_optimizer(model, recipe)
        for step in range(3):
            torch.manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            if opt == "sgd":
                common.agc(common.head_excluded(model), 0.05)
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
