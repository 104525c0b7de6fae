"""--decode device: the workers read the JPEG's bytes and draw; the main process decodes,
crops, resizes and flips (common.TrainTransform.decode_batch). Compared with the Pillow path
(--decode pillow --device-aug, itself pixel-equal to timm's transform, test_device_aug.py):
the crop boxes, flips and ops are identical (exactly); the pixels differ by the resize's
rounding only (mean < 0.5, max <= 8 grey levels, before the ops); files the device does not
decode go the Pillow way and are then identical (0 grey levels)."""
import functools
import numpy as np
import pytest
import torch
from PIL import Image

import common
from test_device_aug import photo
from test_train import rows, train

CPU = torch.device("cpu")
SPECS = ["rand-m7-mstd0.5-inc1", "ta_wide", None]  # A1-A3; tv; no ops


def write(folder, name, img, **kw):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An ImageFolder of baseline JPEGs of 13 sizes, 2 classes, photo-like pixels."""
    root = tmp_path_factory.mktemp("decode") / "train"
    for i in range(26):
        w, h = 60 + 7 * (i % 13), 50 + 11 * (i % 5)
        write(root, f"c{i % 2}/{i:02d}.jpg", photo(w, h, i), quality=90)
    return root


def batch(root, transform, keys, skip_bad=True):
    data = common.ImageFolder(root, transform, skip_bad=skip_bad)
    return common.collate(data.__getitems__(keys))


def load(transform, b, skip_bad=True, skipped=None):
    decode = functools.partial(transform.decode_batch, skip_bad=skip_bad)
    (x, y), = common.to_device([b], CPU, transform.on_device, skipped, decode)
    return x, y


def as_uint8(x):  # normalised float back to grey levels
    m, s = common._mean_std(CPU, tuple(common.IMAGENET_MEAN), tuple(common.IMAGENET_STD))
    return (x * s + m).round()


def recorded_renders(monkeypatch):
    seen = []
    render = common.TrainTransform.render

    def spy(self, img, box, flip):
        seen.append((tuple(box), bool(flip)))
        return render(self, img, box, flip)
    monkeypatch.setattr(common.TrainTransform, "render", spy)
    return seen


@pytest.mark.parametrize("spec", SPECS)
def test_draws_are_the_pillow_paths(photos, spec, monkeypatch):
    """Same seed: the device path's crop boxes, flips and ops equal those the Pillow path
    renders, image for image."""
    keys = [(i, 77) for i in range(26)]
    seen = recorded_renders(monkeypatch)
    pillow = batch(photos, common.TrainTransform(40, "bicubic", spec, device_aug=True), keys)
    coded = batch(photos, common.TrainTransform(40, "bicubic", spec, decode="device"), keys)
    enc = coded[0]
    assert isinstance(enc, common.EncodedBatch) and len(enc.coded) == 26 and not len(enc.decoded)
    assert len(seen) == 26  # the device path rendered nothing in the workers
    assert [(tuple(b), bool(f)) for b, f in zip(enc.boxes.tolist(), enc.flips)] == seen
    assert 0 < sum(f for _, f in seen) < 26
    if spec:
        assert torch.equal(pillow[2], coded[2])
    else:
        assert len(pillow) == len(coded) == 2


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_pixels_close_to_the_pillow_path(photos, interpolation):
    """No ops, so only the resize differs: Pillow rounds to uint8 between its two passes, the
    device path does not. A crop off by a pixel, a missed flip or another filter is far
    outside these bounds (checked on the flipped batch)."""
    keys = [(i, 5) for i in range(26)]
    t_p = common.TrainTransform(40, interpolation, None)
    t_d = common.TrainTransform(40, interpolation, None, decode="device")
    x_p, y_p = load(t_p, batch(photos, t_p, keys))
    x_d, y_d = load(t_d, batch(photos, t_d, keys))
    assert torch.equal(y_p, y_d)
    d = (as_uint8(x_p) - as_uint8(x_d)).abs()
    assert d.mean() < 0.5 and d.max() <= 8, (d.mean(), d.max())
    assert (as_uint8(x_p) - as_uint8(x_d).flip(-1)).abs().mean() > 10


def test_pixels_with_ops_are_the_same_ops(photos):
    """With RandAugment the ops, applied to nearly equal pixels, give nearly equal images
    (thresholds such as solarize can turn a 1-level difference into a large one, in a few
    pixels)."""
    keys = [(i, 9) for i in range(26)]
    spec = "rand-m7-mstd0.5-inc1"
    t_p = common.TrainTransform(40, "bicubic", spec, device_aug=True)
    t_d = common.TrainTransform(40, "bicubic", spec, decode="device")
    x_p, _ = load(t_p, batch(photos, t_p, keys))
    x_d, _ = load(t_d, batch(photos, t_d, keys))
    d = (as_uint8(x_p) - as_uint8(x_d)).abs()
    assert d.mean() < 1.5 and (d > 8).float().mean() < 0.01, (d.mean(), (d > 8).float().mean())


def test_files_the_device_does_not_decode_take_the_pillow_path(tmp_path):
    """Progressive, CMYK, grey JPEGs, a JPEG whose Adobe marker says RGB, PNGs (8 and 16 bit)
    are done by Pillow in the worker:
    in the batch they equal the Pillow path's to the grey level; the baseline JPEG is sent
    as bytes."""
    root = tmp_path / "train"
    img = photo(70, 54, 3)
    write(root, "a/0-baseline.jpg", img, quality=90)
    write(root, "a/1-progressive.jpg", img, quality=90, progressive=True)
    write(root, "a/2-cmyk.jpg", img.convert("CMYK"), quality=90)
    write(root, "a/3-grey.jpg", img.convert("L"), quality=90)
    write(root, "b/4.png", img)
    grey16 = (np.asarray(img.convert("L")).astype(np.uint16) * 257)
    write(root, "b/5-16bit.png", Image.fromarray(grey16))
    jpeg = (root / "a/0-baseline.jpg").read_bytes()  # an Adobe APP14 marker: transform 0, RGB
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
    (root / "b/6-adobe-rgb.jpg").write_bytes(jpeg[:2] + adobe + jpeg[2:])
    assert Image.open(root / "b/6-adobe-rgb.jpg").info["adobe_transform"] == 0
    keys = [(i, 3) for i in range(7)]
    spec = "rand-m7-mstd0.5-inc1"
    t_p = common.TrainTransform(32, "bicubic", spec, device_aug=True)
    t_d = common.TrainTransform(32, "bicubic", spec, decode="device")
    b = batch(root, t_d, keys)
    assert b[0].coded.tolist() == [0] and b[0].decoded.tolist() == [1, 2, 3, 4, 5, 6]
    x_p, _ = load(t_p, batch(root, t_p, keys))
    x_d, _ = load(t_d, b)
    assert torch.equal(x_p[1:], x_d[1:])
    assert (as_uint8(x_p[0]) - as_uint8(x_d[0])).abs().mean() < 1.5


def truncated_copy(photos, tmp_path):
    root = tmp_path / "train"
    for f in sorted(photos.rglob("*.jpg"))[:8]:
        write(root, f"{f.parent.name}/{f.name}", Image.open(f), quality=90)
    bad = sorted(root.rglob("*.jpg"))[3]
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) * 3 // 5])  # a readable header, part of the scan
    return root, bad


def test_an_unreadable_image_is_replaced_within_the_batch(photos, tmp_path):
    """One truncated JPEG fails the batched decode; image by image it fails on the device and
    in Pillow: it is reported and replaced by the next image of the batch, target and all.
    --bad-images error stops with the file's name."""
    root, bad = truncated_copy(photos, tmp_path)
    t = common.TrainTransform(32, "bicubic", None, decode="device")
    keys = [(i, 1) for i in range(8)]
    names = [p for p, _ in common.ImageFolder(root, t).samples]
    i = names.index(str(bad))
    skipped = []
    x, y = load(t, batch(root, t, keys), skipped=skipped)
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad}: ")
    assert torch.equal(x[i], x[i + 1]) and y[i] == y[i + 1]
    assert not torch.equal(x[i + 1], x[i + 2])
    with pytest.raises(common.UserError, match="cannot read image .*" + bad.name):
        load(t, batch(root, t, keys), skip_bad=False)


def test_replacement_is_the_next_readable_image_cyclically():
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).repeat(1, 3, 2, 2)
    target = torch.tensor([10, 11, 12, 13, 14])
    got = common.replace_unreadable(images, target, [(1, "b"), (2, "c"), (4, "e")])
    assert images[:, 0, 0, 0].tolist() == [0, 3, 3, 3, 0] and got.tolist() == [10, 13, 13, 13, 10]
    with pytest.raises(common.UserError, match="no image of a batch can be read: a"):
        common.replace_unreadable(images[:1], target[:1], [(0, "a")])


def test_the_device_failing_an_image_falls_back_to_pillow(photos, monkeypatch):
    """An image the device decoder refuses (here: told to) fails the batched call; retried
    alone it fails again and is decoded by Pillow with the same crop and flip; the others
    come from the device, and nothing is reported unreadable."""
    keys = [(i, 4) for i in range(12)]
    t = common.TrainTransform(40, "bicubic", None, decode="device")
    b = batch(photos, t, keys)
    expect, _ = load(t, b)
    refused = b[0].chunk(5)
    name, real = common.jpeg_decoder()
    calls = []

    def decoder(data, device):
        calls.append(len(data) if isinstance(data, list) else 1)
        parts = data if isinstance(data, list) else [data]
        if any(p.data_ptr() == refused.data_ptr() for p in parts):
            raise RuntimeError("nvjpeg: unsupported (test)")
        return real(data, device)
    monkeypatch.setattr(common, "jpeg_decoder", lambda: (name, decoder))
    skipped = []
    got, _ = load(t, b, skipped=skipped)
    assert calls == [12] + [1] * 12 and not skipped
    pillow = torch.tensor([int(i) for i in b[0].coded]) == int(b[0].coded[5])
    assert torch.equal(got[~pillow], expect[~pillow])
    assert (as_uint8(got[pillow]) - as_uint8(expect[pillow])).abs().mean() < 0.5


def test_the_stream_is_drained_before_a_cuda_decode(monkeypatch):
    """nvJPEG's hardware path writes without waiting for queued work (pytorch/vision#9606):
    decode_jpegs synchronises the current stream first. Checked with a stand-in stream."""
    events = []

    class Stream:
        def synchronize(self):
            events.append("synchronize")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(common, "jpeg_decoder", lambda: (
        "test", lambda data, device: events.append(("decode", device)) or data))
    common.decode_jpegs([torch.zeros(4, dtype=torch.uint8)], torch.device("cuda"))
    assert events == ["synchronize", ("decode", torch.device("cuda"))]


def test_workers_send_encoded_batches(photos):
    """Through a 2-worker DataLoader (shared memory, per-batch reseeding) the batches decode
    to what the main process makes from the same keys."""
    t = common.TrainTransform(40, "bicubic", "rand-m7-mstd0.5-inc1", decode="device")
    data = common.ImageFolder(photos, t)
    sampler = common.TrainSampler(len(data), 8, seed=3, batch_seed=11)
    sampler.set_epoch(2)
    loader = common.make_loader(data, 8, 2, CPU, sampler, True)
    decode = functools.partial(t.decode_batch, skip_bad=True)
    got = list(common.to_device(loader, CPU, t.on_device, None, decode))
    keys = list(sampler)
    expect = [load(t, common.collate(data.__getitems__(keys[i:i + 8])))
              for i in range(0, 24, 8)]
    assert len(got) == 3
    for (x, y), (x2, y2) in zip(got, expect):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_the_decoder_gives_pillows_pixels_on_the_cpu(photos):
    """TorchCodec's decode_jpeg where installed, else torchvision's: on a CPU both are
    libjpeg-turbo, and give Pillow's pixels exactly (so on a CPU only the resize differs)."""
    name, decode = common.jpeg_decoder()
    assert name.split()[0] in ("torchcodec", "torchvision")
    files = sorted(photos.rglob("*.jpg"))[:4]
    chunks = [torch.from_numpy(np.fromfile(f, dtype=np.uint8)) for f in files]
    for f, img in zip(files, decode(chunks, CPU)):
        assert torch.equal(img, torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1))


def test_options_that_do_not_combine():
    with pytest.raises(common.UserError, match="--fast-decode"):
        common.TrainTransform(40, decode="device", fast_decode=True)
    with pytest.raises(common.UserError, match="bilinear or bicubic"):
        common.TrainTransform(40, "nearest", decode="device")


def test_train_run_with_decode_device(tiny_data, tmp_path):
    """train_a3.py --decode device, 1 epoch on the CPU: it trains, and within 0.05 of the
    Pillow path's loss (the pixels differ a little, the draws not at all)."""
    out = {}
    for name, extra in (("pillow", ("--device-aug",)), ("device", ("--decode", "device"))):
        res = train(tiny_data, tmp_path / name, "--epochs", "1", *extra)
        assert res.returncode == 0, res.stderr
        out[name] = rows(tmp_path / name)[-1]
    assert abs(out["pillow"]["train_loss"] - out["device"]["train_loss"]) < 0.05
    assert out["device"]["bad_images"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_on_cuda_close_to_the_cpu(photos):
    """nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's a little: the batch
    decoded on CUDA is within 2 grey levels on average of the one decoded on the CPU, with the
    same draws; repeated decodes give the same pixels (nothing overwritten)."""
    keys = [(i, 6) for i in range(26)]
    t = common.TrainTransform(40, "bicubic", "rand-m7-mstd0.5-inc1", decode="device")
    b = batch(photos, t, keys)
    x_cpu, y_cpu = load(t, b)
    cuda = torch.device("cuda")
    decode = functools.partial(t.decode_batch, skip_bad=True)
    runs = [list(common.to_device([b], cuda, t.on_device, None, decode))[0] for _ in range(3)]
    for x, y in runs:
        assert torch.equal(y.cpu(), y_cpu)
        assert (as_uint8(x.cpu()) - as_uint8(x_cpu)).abs().mean() < 2
        assert torch.equal(x, runs[0][0])
