"""Benchmarks, run by hand (never in CI): the input pipeline, the training step and the optimizer
steps, each side by side with timm / torchvision on the same inputs in the same run, so the
ratios hold on a noisy machine. timm and torchvision come from requirements-dev.txt.

    python bench.py                               # all three sections, on CUDA if present
    python bench.py pipeline --images 200         # 1. images/s per worker, per recipe
    python bench.py step --device cpu             # 2. training step, images/s and peak memory
    python bench.py optim                         # 3. optimizer / EMA step time and agreement
    python bench.py host --files 200000           # 4. host memory, listing time (by hand)
    python bench.py pipeline --jpegs /imagenet/train/n01440764   # on real JPEGs
    python bench.py decode --device cuda          # 5. --decode device on the GPU (by hand)

Prints markdown tables; README's "Speed" section quotes them with the machine they ran on.
"""
import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common

IMAGENET_SIZES = [(500, 375), (500, 375), (500, 375), (375, 500), (500, 333), (400, 400),
                  (640, 480)]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    print("\n".join(lines) + "\n", flush=True)


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    import timm
    import torchvision
    return (f"CPU {cpu} ({os.cpu_count()} cores), GPU {gpu}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, timm {timm.__version__}, "
            f"Pillow {Image.__version__}")


# --------------------------------------------------------------------------------------------
# 1. Input pipeline: decode + train / eval transform, one process, one thread = one worker
# --------------------------------------------------------------------------------------------

def make_jpegs(folder, count, seed=0):
    """Photo-like JPEGs at ImageNet's usual sizes (mostly 500 x 375), quality 90: smooth
    shapes, gradients, texture and sensor-like noise, so that they compress to about ImageNet's
    mean of ~110 KB (decoding time depends on it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        photo_like(rng, *IMAGENET_SIZES[i % len(IMAGENET_SIZES)]).save(path, quality=90)
        paths.append(path)
    return paths


def photo_like(rng, w, h):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.zeros((h, w, 3), np.float32) + rng.uniform(40, 200, 3)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, 120)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2)[..., None]
        arr += rng.uniform(-100, 100, 3) * blob
    small = rng.normal(0, 1, (h // 4 + 1, w // 4 + 1, 3)).astype(np.float32)
    texture = np.asarray(Image.fromarray(((small + 4) * 32).clip(0, 255).astype(np.uint8))
                         .resize((w, h), Image.BILINEAR), np.float32) - 128
    arr += 1.2 * texture + rng.normal(0, 16, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _write_photo(job):
    path, i = job
    photo_like(np.random.default_rng(i), *IMAGENET_SIZES[i % len(IMAGENET_SIZES)]).save(
        path, quality=90)


def make_jpeg_folder(root, classes, train_per_class, val_per_class, processes=None):
    """root/{train,val}/<class>/<i>.jpg of photo-like ImageNet-sized JPEGs (one generator per
    image, made in parallel): data for end-to-end input-pipeline runs (bench_gpu.py)."""
    import multiprocessing
    jobs = []
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = Path(root) / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(folder / f"{k:05d}.jpg", len(jobs) + k) for k in range(n)]
    with multiprocessing.Pool(processes) as pool:
        pool.map(_write_photo, jobs, chunksize=16)
    return Path(root)


def jpeg_source(args):
    """(paths, description) of the JPEGs to measure on: --jpegs, or --images generated ones."""
    if args.jpegs:
        paths = sorted(p for p in Path(args.jpegs).rglob("*")
                       if p.suffix.lower() in (".jpg", ".jpeg"))[:args.images]
        if not paths:
            raise SystemExit(f"no JPEG files under {args.jpegs}")
        return paths, f"{len(paths)} JPEGs from {args.jpegs}"
    paths = make_jpegs(Path(tempfile.mkdtemp(prefix="bench-jpegs-")), args.images)
    return paths, f"{len(paths)} generated JPEGs"


def pil_rgb(path):
    """timm's and tv's loader: open and convert("RGB")."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def ours_loader(transform):
    def load(path):  # common.ImageFolder.__getitem__
        with Image.open(path) as img:
            return transform(img)
    return load


def reference_loader(transform):
    return lambda path: transform(pil_rgb(path))


def tv_preset(recipe, train):
    """torchvision references/classification/presets.py, PIL backend (its default), as its
    train.py builds them for the tv recipe."""
    import torchvision.transforms as T
    interp = {"bilinear": T.InterpolationMode.BILINEAR,
              "bicubic": T.InterpolationMode.BICUBIC}[recipe["interpolation"]]
    norm = [T.PILToTensor(), T.ConvertImageDtype(torch.float),
            T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)]
    if not train:
        return T.Compose([T.Resize(recipe["eval_resize"], interpolation=interp),
                          T.CenterCrop(recipe["eval_size"])] + norm)
    ops = [T.RandomResizedCrop(recipe["train_size"], interpolation=interp),
           T.RandomHorizontalFlip(0.5)]
    if recipe["auto_augment"] == "ta_wide":
        ops.append(T.TrivialAugmentWide(interpolation=interp))
    ops += norm
    if recipe["reprob"]:
        ops.append(T.RandomErasing(p=recipe["reprob"]))
    return T.Compose(ops)


def timm_transform(recipe, train):
    """timm's create_transform as train.py builds it with its prefetcher (the default): uint8
    out, normalisation and erasing on the GPU, as ours."""
    from timm.data import create_transform
    if train:
        return create_transform(recipe["train_size"], is_training=True,
                                auto_augment=recipe["auto_augment"],
                                interpolation=recipe["interpolation"], use_prefetcher=True)
    return create_transform(recipe["eval_size"], crop_pct=recipe["crop_pct"],
                            interpolation=recipe["interpolation"], use_prefetcher=True)


def synchronizer(device):
    """What to call before reading the clock: waits for the GPU's queued work."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_passes(candidates, paths, rounds):
    """{name: median images/s}: each round times one pass over the files per candidate, in
    turn, with the same seeds, so that drift of the machine hits all of them alike."""
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, load in candidates.items():
            common.seed_all(0)
            t0 = time.perf_counter()
            for path in paths:
                load(path)
            times[name].append(time.perf_counter() - t0)
    return {name: len(paths) / statistics.median(t) for name, t in times.items()}


def device_aug_rate(transform, load, paths, device, rounds, batch=128):
    """Images/s of the --device-aug half that leaves the workers: device_augment on batches of
    the images and ops the workers returned, on `device` (one thread on a CPU)."""
    common.seed_all(0)
    images, _, ops = common.collate([(load(p), 0) for p in paths])
    images, sync = images.to(device), synchronizer(device)

    def one_pass():
        sync()
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            transform.on_device(images[i:i + batch].clone(), ops[i:i + batch])
        sync()
        return time.perf_counter() - t0

    one_pass()  # warm-up
    return len(images) / statistics.median(one_pass() for _ in range(rounds))


def decode_rate(transform, load, paths, device, rounds, batch=128):
    """Images/s of the --decode device half that leaves the workers: decode_batch (decode,
    crop, resize, flip) and the ops, on `device` (one thread on a CPU)."""
    common.seed_all(0)
    batches = [common.collate([(load(p), 0) for p in paths[i:i + batch]])
               for i in range(0, len(paths), batch)]
    sync = synchronizer(device)

    def one_pass():
        sync()
        t0 = time.perf_counter()
        for images, target, *ops in batches:
            images, _ = transform.decode_batch(images, target, device, [])
            if ops:
                transform.on_device(images, ops[0])
        sync()
        return time.perf_counter() - t0

    one_pass()  # warm-up
    return len(paths) / statistics.median(one_pass() for _ in range(rounds))


def decode_deviation(paths, device, sizes=(224, 176, 160)):
    """How much --decode device changes the pixels against the Pillow path: the same crops (same
    seeds), no flip, no ops; mean and max |difference| (grey levels), per train size and
    filter. {(size, filter): (mean, max)}, printed as a table."""
    rows, out = [], {}
    for size in sizes:
        for interpolation in ("bicubic", "bilinear"):
            pillow = common.TrainTransform(size, interpolation, hflip=0.0)
            coded = common.TrainTransform(size, interpolation, hflip=0.0, decode="device")
            means, peak = [], 0
            for i in range(0, len(paths), 64):
                part = paths[i:i + 64]
                common.seed_all(i)
                ref = np.stack([ours_loader(pillow)(p) for p in part]).astype(np.int16)
                common.seed_all(i)
                b = common.collate([(ours_loader(coded)(p), 0) for p in part])
                got = coded.decode_batch(b[0], b[1], device, [])[0]
                d = np.abs(got.permute(0, 2, 3, 1).cpu().numpy().astype(np.int16) - ref)
                means.append(d.mean())
                peak = max(peak, int(d.max()))
            out[(size, interpolation)] = (float(np.mean(means)), peak)
            rows.append((size, interpolation, f"{np.mean(means):.3f}", peak))
    print(f"--decode device on {device.type}: pixels against the Pillow path, same crops, no "
          "flip or ops (grey levels of 255)\n")
    table(("train px", "filter", "mean abs diff", "max abs diff"), rows)
    return out


def bench_decode(args, device):
    """--decode device, the half on the device: decode + crop + resize + flip img/s per train
    size, without and with A3's ops, batches of --batch (default 256); the pixels against the
    Pillow path; on CUDA the nvJPEG ordering check (nvjpeg_ordering)."""
    paths, source = jpeg_source(args)
    batch = min(args.batch or 256, len(paths))
    print(f"## 5. --decode device on {device.type}: decode, crop, resize, flip (and ops), "
          f"img/s\n\n{source}, batches of {batch}, median of {args.rounds} passes\n")
    rows = []
    for size in (160, 176, 224):
        rates = []
        for spec in (None, "rand-m6-mstd0.5-inc1"):
            t = common.TrainTransform(size, "bicubic", spec, decode="device")
            rates.append(decode_rate(t, ours_loader(t), paths, device, args.rounds, batch))
        rows.append((size, f"{rates[0]:.0f}", f"{rates[1]:.0f}"))
    table(("train px", "decode + crop img/s", "+ A3's RandAugment ops img/s"), rows)
    decode_deviation(paths, device)
    if device.type == "cuda":
        found = nvjpeg_ordering(paths, device)
        table(("decode", "iterations", "corrupted"),
              [(k, v[1], v[0]) for k, v in found.items()])


def nvjpeg_ordering(paths, device, iterations=40, n=4096):
    """pytorch/vision#9606 on this GPU: with ~50 ms of work queued on the stream, image-sized
    blocks that queued reductions still read are freed, then a batch is decoded; an iteration
    is corrupted if a reduction comes out wrong (the decoder was handed, and wrote into, a
    block still in use). {name: (corrupted, iterations)}, for torchvision's call as it is and
    for common.decode_jpegs (which drains the stream first)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    chunks = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in paths[:32]]
    shapes = [tuple(decode_jpeg(c, mode=ImageReadMode.RGB).shape) for c in chunks]
    big = torch.randn(n, n, device=device) / n ** 0.5
    out = {}
    for name in ("torchvision decode_jpeg", "common.decode_jpegs"):
        bad = 0
        for _ in range(iterations):
            blocks = [torch.full(shape, k % 200 + 1, dtype=torch.uint8, device=device)
                      for k, shape in enumerate(shapes)]
            x = big
            for _ in range(8):
                x = x @ big  # queued work ahead of the reductions
            sums = [b.sum(dtype=torch.int64) for b in blocks]
            want = [(k % 200 + 1) * math.prod(shape) for k, shape in enumerate(shapes)]
            del blocks
            if name.startswith("torchvision"):
                decode_jpeg(chunks, mode=ImageReadMode.RGB, device=device)
            else:
                common.decode_jpegs(chunks, device)
            bad += [int(v) for v in torch.stack(sums).tolist()] != want
        out[name] = (bad, iterations)
    print("nvJPEG ordering (pytorch/vision#9606): iterations whose queued reductions were "
          "overwritten by the decoder\n")
    return out


def bench_pipeline(args, device):
    torch.set_num_threads(1)
    paths, source = jpeg_source(args)
    mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    sizes = [Image.open(p).size for p in paths]
    mean_px = sum(w * h for w, h in sizes) / len(sizes)
    print(f"## 1. Input pipeline, images/s per worker (one process, one thread)\n\n"
          f"{source}, mean {mean_kb:.0f} KB, mean {mean_px / 1e3:.0f} kpixels; median of "
          f"{args.rounds} passes each, run in turn\n")
    rows, decoded = [], []
    for script, recipe in common.script_recipes():
        name = recipe["recipe"]
        if args.recipes and name not in args.recipes:
            continue
        tv = name == "tv"
        ref_name = "torchvision preset" if tv else "timm create_transform"
        ref = tv_preset if tv else timm_transform
        deferred = common.TrainTransform(recipe["train_size"], recipe["interpolation"],
                                         recipe["auto_augment"], device_aug=True)
        coded = common.TrainTransform(recipe["train_size"], recipe["interpolation"],
                                      recipe["auto_augment"], decode="device")
        train = {
            "ours": ours_loader(common.TrainTransform(
                recipe["train_size"], recipe["interpolation"], recipe["auto_augment"])),
            "ours --fast-decode": ours_loader(common.TrainTransform(
                recipe["train_size"], recipe["interpolation"], recipe["auto_augment"],
                fast_decode=True)),
            "ours --device-aug": ours_loader(deferred),
            "ours --device-aug --fast-decode": ours_loader(common.TrainTransform(
                recipe["train_size"], recipe["interpolation"], recipe["auto_augment"],
                fast_decode=True, device_aug=True)),
            "ours --decode device": ours_loader(coded),
            "ref": reference_loader(ref(recipe, True)),
        }
        ips = time_passes(train, paths, args.rounds)
        decoded.append((name, recipe["train_size"], f"{ips['ref']:.0f}",
                        f"{ips['ours --decode device']:.0f}",
                        f"{ips['ours --decode device'] / ips['ref']:.1f}",
                        f"{decode_rate(coded, train['ours --decode device'], paths, device, args.rounds):.0f}"))
        device_ips = device_aug_rate(deferred, train["ours --device-aug"], paths, device,
                                     args.rounds)
        rows.append((name, f"train {recipe['train_size']} px, {recipe['auto_augment']}",
                     ref_name, f"{ips['ref']:.0f}", f"{ips['ours']:.0f}",
                     f"{ips['ours'] / ips['ref']:.2f}", f"{ips['ours --fast-decode']:.0f}",
                     f"{ips['ours --fast-decode'] / ips['ref']:.2f}",
                     f"{ips['ours --device-aug']:.0f}",
                     f"{ips['ours --device-aug'] / ips['ref']:.2f}",
                     f"{ips['ours --device-aug --fast-decode']:.0f}",
                     f"{ips['ours --device-aug --fast-decode'] / ips['ref']:.2f}",
                     f"{device_ips:.0f}"))
        evals = {"ours": ours_loader(common.EvalTransform(
                     recipe["eval_size"], recipe["eval_resize"], recipe["interpolation"])),
                 "ref": reference_loader(ref(recipe, False))}
        ips = time_passes(evals, paths, args.rounds)
        rows.append((name, f"eval {recipe['eval_resize']} -> {recipe['eval_size']} px", ref_name,
                     f"{ips['ref']:.0f}", f"{ips['ours']:.0f}",
                     f"{ips['ours'] / ips['ref']:.2f}", "", "", "", "", "", "", ""))
    table(("recipe", "transform", "reference", "reference img/s", "ours img/s", "ratio",
           "ours --fast-decode img/s", "ratio", "ours --device-aug worker img/s", "ratio",
           "ours --device-aug --fast-decode worker img/s", "ratio",
           f"--device-aug ops on {device.type} img/s"), rows)
    print("--decode device: the workers only read the file and draw the crop, flip and ops "
          f"(worker img/s, one process, one thread); the decode, crop, resize, flip and ops "
          f"then run on {device.type} (one thread on a CPU)\n")
    table(("recipe", "train px", "reference img/s", "--decode device worker img/s",
           "ratio", f"decode + ops on {device.type} img/s"), decoded)
    fast_decode_deviation(paths)
    decode_deviation(paths, device)


def fast_decode_deviation(paths):
    """How much --fast-decode changes the pixels: same seeds, so the same crops; mean absolute
    difference (grey levels of 255) over the images where the draft applied, per train size."""
    rows = []
    for size in (224, 176, 160, 128):
        exact = common.TrainTransform(size, "bicubic", hflip=0.0)
        fast = common.TrainTransform(size, "bicubic", hflip=0.0, fast_decode=True)
        diffs = []
        for i, path in enumerate(paths):
            outs = []
            for transform in (exact, fast):
                random.seed(i)
                with Image.open(path) as img:
                    outs.append(transform(img).astype(np.int16))
            diff = np.abs(outs[0] - outs[1]).mean()
            if diff > 0:
                diffs.append(diff)
        rows.append((size, f"{100 * len(diffs) / len(paths):.0f}%",
                     f"{np.mean(diffs):.2f}" if diffs else "-"))
    print("--fast-decode: crops decoded at reduced scale, and their mean |difference| to the "
          "exact path (grey levels)\n")
    table(("train px", "crops reduced", "mean abs diff"), rows)


# --------------------------------------------------------------------------------------------
# 2. Training step: model + loss + backward + optimizer (+ EMA), synthetic uint8 batches on
#    the device; each side in its own process so that peak memory is its own
# --------------------------------------------------------------------------------------------

def step_worker(side, device, model_name, batch, size, steps, warmup, recipe, compile_):
    torch.manual_seed(0)
    device = torch.device(device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        torch.backends.cudnn.benchmark = True
    num_classes = 1000
    if side == "ours":
        model = common.create_model(model_name, num_classes, drop_path=recipe["drop_path"])
    else:
        import timm
        model = timm.create_model(model_name, num_classes=num_classes,
                                  drop_path_rate=recipe["drop_path"])
    model.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if side == "ours":
        optimizer = common.create_optimizer(model, recipe)
        ema = common.EMA(model, recipe["ema_decay"]) if recipe["ema_decay"] else None
        rng = np.random.default_rng(0)

        def mix(x, y):
            return common.mixup_cutmix(x, y, num_classes, recipe["mixup"], recipe["cutmix"],
                                       recipe["label_smoothing"], rng)

        def loss_fn(logits, y):
            return common.binary_cross_entropy(logits, y, recipe["label_smoothing"],
                                               recipe["bce_target_thresh"])
    else:
        from timm.data import Mixup
        from timm.loss import BinaryCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.utils import ModelEmaV3
        optimizer = create_optimizer_v2(model, recipe["opt"], lr=recipe["lr"],
                                        weight_decay=recipe["weight_decay"])
        ema = ModelEmaV3(model, recipe["ema_decay"]) if recipe["ema_decay"] else None
        mix = Mixup(mixup_alpha=recipe["mixup"], cutmix_alpha=recipe["cutmix"],
                    label_smoothing=recipe["label_smoothing"], num_classes=num_classes)
        loss_fn = BinaryCrossEntropy(smoothing=recipe["label_smoothing"],
                                     target_threshold=recipe["bce_target_thresh"])
    net = torch.compile(model) if compile_ else model
    amp = torch.bfloat16 if device.type == "cuda" else None
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8,
                           device=device).permute(0, 3, 1, 2)  # NHWC memory, as collate()
    target = torch.randint(0, num_classes, (batch,), device=device)

    def step():
        x = common.normalize(images)
        if not channels_last:
            x = x.contiguous()
        x, y = mix(x, target)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        return loss.detach()

    for _ in range(warmup):
        step()
    sync = synchronizer(device)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    assert torch.isfinite(loss)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(img_s=batch * steps / elapsed, peak_mib=peak)


def bench_step(args, device):
    _, recipe = next((s, r) for s, r in common.script_recipes() if r["recipe"] == args.recipe)
    if recipe["loss"] != "bce" or recipe["mixup_style"] != "timm":
        raise SystemExit("the step benchmark runs a timm recipe with BCE (a1, a2, a3)")
    cpu = device.type == "cpu"
    model = args.model or ("resnet18" if cpu else "resnet50")
    size = args.size or (128 if cpu else 224)
    batch = args.batch or (32 if cpu else 256)
    steps, warmup = args.steps or (5 if cpu else 50), 3 if cpu else 15
    memory = "peak RSS of the process (MiB)" if cpu else "peak CUDA memory allocated (MiB)"
    print(f"## 2. Training step, {model}, recipe {args.recipe} ({recipe['opt']}, BCE, "
          f"mixup {recipe['mixup']} / cutmix {recipe['cutmix']}), batch {batch}, {size} px, "
          f"{device.type}{', bf16 autocast, channels_last' if not cpu else ', fp32'}"
          f"{', torch.compile' if args.compile else ''}\n\n{steps} timed steps after {warmup}; "
          f"each side in its own process, {args.rounds} rounds in turn, median\n")
    results = {"ours": [], "timm": []}
    for _ in range(args.rounds):
        for side in results:
            job = dict(side=side, device=str(device), model_name=model, batch=batch, size=size,
                       steps=steps, warmup=warmup, recipe=recipe, compile_=args.compile)
            out = subprocess.run([sys.executable, __file__, "_step", json.dumps(job)],
                                 capture_output=True, text=True, cwd=Path(__file__).parent)
            if out.returncode != 0:
                raise SystemExit(f"{side} step worker failed:\n{out.stderr[-3000:]}")
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {side: (statistics.median(r["img_s"] for r in rs),
                  statistics.median(r["peak_mib"] for r in rs)) for side, rs in results.items()}
    table(("", "timm", "ours", "ours / timm"),
          [("images/s", f"{med['timm'][0]:.1f}", f"{med['ours'][0]:.1f}",
            f"{med['ours'][0] / med['timm'][0]:.2f}"),
           (memory, f"{med['timm'][1]:.0f}", f"{med['ours'][1]:.0f}",
            f"{med['ours'][1] / med['timm'][1]:.2f}")])


# --------------------------------------------------------------------------------------------
# 3. Optimizer and EMA steps on a ResNet-50's parameters, ours vs timm's, same gradients
# --------------------------------------------------------------------------------------------

OPTIM_CASES = [  # (name, our recipe keys, timm factory name and kwargs, AGC clip factor)
    ("LAMB", dict(opt="lamb", lr=5e-3, weight_decay=0.02), ("lamb", {}), None),
    ("RMSpropTF", dict(opt="rmsproptf", lr=0.048, weight_decay=1e-5, momentum=0.9,
                       opt_eps=1e-3), ("rmsproptf", dict(momentum=0.9, eps=1e-3)), None),
    ("AdamP", dict(opt="adamp", lr=5e-3, weight_decay=0.01, opt_eps=1e-8), ("adamp", {}), None),
    ("SGD + AGC", dict(opt="sgd", lr=0.1, weight_decay=1e-4, momentum=0.9, nesterov=True),
     ("sgd", dict(momentum=0.9, nesterov=True)), 0.05),
]


def bench_optim(args, device):
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3
    from timm.utils.agc import adaptive_clip_grad
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    base = common.create_model("resnet50").to(device)
    grads = [torch.randn_like(p) * 1e-2 for p in base.parameters()]
    steps = args.steps or (5 if device.type == "cpu" else 50)
    sync = synchronizer(device)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"## 3. Optimizer step on a ResNet-50's parameters ({n_params / 1e6:.1f} M, "
          f"{len(grads)} tensors), {device.type}\n\nms per step, median over {args.rounds} "
          f"rounds of {steps} steps in turn; 'max diff' = largest |ours - timm| of any "
          "parameter after all the steps, from the same start and gradients\n")
    rows = []
    for name, keys, (timm_name, timm_kwargs), agc in OPTIM_CASES:
        recipe = dict(dict(wd_groups="timm", opt_eps=None, opt_betas=None, momentum=None,
                           nesterov=None), **keys)
        models = {"ours": deepcopy(base), "timm": deepcopy(base)}
        opts = {"ours": common.create_optimizer(models["ours"], recipe),
                "timm": create_optimizer_v2(models["timm"], timm_name, lr=recipe["lr"],
                                            weight_decay=recipe["weight_decay"], **timm_kwargs)}
        head = {side: [p for n, p in m.named_parameters() if not n.startswith("fc.")]
                for side, m in models.items()}

        def one(side):
            params = list(models[side].parameters())
            if params[0].grad is None:
                for p, g in zip(params, grads):
                    p.grad = g.clone()
            else:  # the same gradients again (AGC scales them in place)
                torch._foreach_copy_([p.grad for p in params], grads)
            sync()
            t0 = time.perf_counter()
            if agc is not None:
                if side == "ours":
                    common.agc(head[side], agc)
                else:
                    adaptive_clip_grad(head[side], agc)
            opts[side].step()
            sync()
            return time.perf_counter() - t0
        times = {"ours": [], "timm": []}
        for side in times:
            one(side)  # warm-up: state allocation
        for _ in range(args.rounds):
            for side in times:
                times[side].append(sum(one(side) for _ in range(steps)) / steps)
        diff = max((a - b).abs().max().item() for a, b in zip(
            models["ours"].parameters(), models["timm"].parameters()))
        t_ours, t_timm = statistics.median(times["ours"]), statistics.median(times["timm"])
        rows.append((name, f"{1e3 * t_timm:.1f}", f"{1e3 * t_ours:.1f}",
                     f"{t_timm / t_ours:.2f}x", f"{diff:.1e}"))
    # EMA: timm ModelEmaV3 (foreach) vs ours, one update
    models = {"ours": deepcopy(base), "timm": deepcopy(base)}
    emas = {"ours": common.EMA(models["ours"], 0.9998),
            "timm": ModelEmaV3(models["timm"], 0.9998)}
    times = {"ours": [], "timm": []}
    for _ in range(args.rounds):
        for side in times:
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                emas[side].update(models[side])
            sync()
            times[side].append((time.perf_counter() - t0) / steps)
    diff = max((a - b).abs().max().item() for a, b in zip(
        emas["ours"].module.state_dict().values(), emas["timm"].module.state_dict().values()))
    t_ours, t_timm = statistics.median(times["ours"]), statistics.median(times["timm"])
    rows.append(("EMA update", f"{1e3 * t_timm:.1f}", f"{1e3 * t_ours:.1f}",
                 f"{t_timm / t_ours:.2f}x", f"{diff:.1e}"))
    table(("step", "timm ms", "ours ms", "speed-up", "max diff"), rows)


# --------------------------------------------------------------------------------------------
# 4. Host memory and listing time on a large folder (by hand: it writes --files entries)

def many_files(root, files, classes=1000, size=24):
    """`files` train entries in `classes` folders (and 2% as many val), hard links to one small
    JPEG a class: the listing and the per-file work of a large data set, without its bytes."""
    root = Path(root)
    if (root / f"done-{files}").exists():
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", files // classes), ("val", max(1, files // classes // 50))):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            first = d / f"n{c:08d}_0.JPEG"  # ext4 allows 65,000 links a file
            if not first.exists():
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(first)
            for i in range(1, n):
                link = d / f"n{c:08d}_{i}.JPEG"
                if not link.exists():
                    os.link(first, link)
    (root / f"done-{files}").write_text("")
    return root


def pss_mb(pid):
    """PSS of a process and its children (the loader workers), MB: what they cost together."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for p in [pid, *map(int, children)]:
        try:
            total += sum(int(line.split()[1]) for line in
                         Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
                         if line.startswith("Pss:"))
        except OSError:
            pass
    return total / 1024


def host_worker(root, kind, workers, batch, steps):
    """One rank's training loader over `root`: listing seconds, PSS before and at its peak."""
    import threading
    t0 = time.perf_counter()
    table, classes = common.list_folder(Path(root) / "train")
    listed = time.perf_counter() - t0
    listing = (table, classes) if kind == "numpy" else (list(table), classes)
    ds = common.ImageFolder(Path(root) / "train", common.TrainTransform(
        16, "bicubic", "rand-m7-n2-mstd0.5-inc1"), listing=listing)
    loader = common.make_loader(ds, batch, workers, torch.device("cpu"), common.TrainSampler(
        len(ds), batch, seed=1, batch_seed=2), True)
    base, peak, done = pss_mb(os.getpid()), [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], pss_mb(os.getpid()))
            time.sleep(0.2)
    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in zip(range(steps), loader):
        pass
    done.set()
    watcher.join()
    return dict(files=len(ds), listed_s=listed, base_mb=base, peak_mb=peak[0])


def bench_host(args):
    if not Path("/proc/self/smaps_rollup").exists():
        print("host: needs Linux's /proc/<pid>/smaps_rollup\n")
        return
    root = many_files(args.host_root or Path(tempfile.gettempdir()) / "bench-host",
                      args.files)
    rows = []
    for kind in ("python list", "numpy"):
        job = dict(root=str(root), kind=kind.split()[-1], workers=args.host_workers,
                   batch=128, steps=args.host_steps)
        out = subprocess.run([sys.executable, __file__, "_host", json.dumps(job)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.splitlines()[-1])
        rows.append((kind, f"{r['files']:,}", args.host_workers, f"{r['listed_s']:.2f}",
                     f"{1.28e6 / r['files'] * r['listed_s']:.1f}", f"{r['base_mb']:.0f}",
                     f"{r['peak_mb']:.0f}"))
    print(f"one rank's training loader, {args.host_steps} batches of 128 at 16 px (PSS of the "
          "process and its workers; the listing from a warm cache, scaled linearly to 1.28M "
          "files)\n")
    table(("sample list", "files", "workers", "listing s", "1.28M files s", "PSS before MB",
           "PSS peak MB"), rows)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "_step":  # the step benchmark's worker process
        job = json.loads(sys.argv[2])
        print(json.dumps(step_worker(**job)))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "_host":  # the host benchmark's worker process
        print(json.dumps(host_worker(**json.loads(sys.argv[2]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sections", nargs="*", help="pipeline, step, optim (default: all three)")
    p.add_argument("--device", default="auto", help="cpu, cuda (default: cuda if present)")
    p.add_argument("--images", type=int, default=200, help="JPEGs for the pipeline benchmark")
    p.add_argument("--jpegs", help="a folder of real JPEGs instead of generated ones")
    p.add_argument("--recipes", nargs="*", help="pipeline: only these recipes (a1 ... tv, rs)")
    p.add_argument("--rounds", type=int, default=3, help="repetitions, in turn, median taken")
    p.add_argument("--recipe", default="a1", help="step: the recipe (a1, a2, a3)")
    p.add_argument("--model", help="step: default resnet18 on CPU, resnet50 on CUDA")
    p.add_argument("--batch", type=int, help="step: default 32 on CPU, 256 on CUDA; decode: "
                   "images per decoded batch (default 256)")
    p.add_argument("--size", type=int, help="step: default 128 px on CPU, 224 on CUDA")
    p.add_argument("--steps", type=int, help="timed steps per round")
    p.add_argument("--compile", action="store_true", help="step: torch.compile both models")
    p.add_argument("--files", type=int, default=200_000, help="host: train entries generated")
    p.add_argument("--host-root", help="host: where to generate them (default: the temp dir)")
    p.add_argument("--host-workers", type=int, default=4, help="host: loader workers")
    p.add_argument("--host-steps", type=int, default=300, help="host: batches drawn")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    sections = args.sections or ["pipeline", "step", "optim"]
    known = {"pipeline", "step", "optim", "host", "decode"}
    if set(sections) - known:
        p.error(f"unknown section(s) {sorted(set(sections) - known)}")
    print(f"# bench.py, {time.strftime('%Y-%m-%d %H:%M')}\n\n{machine(device)}\n", flush=True)
    if "pipeline" in sections:
        bench_pipeline(args, device)
    if "step" in sections:
        bench_step(args, device)
    if "optim" in sections:
        bench_optim(args, device)
    if "host" in sections:
        bench_host(args)
    if "decode" in sections:
        bench_decode(args, device)


if __name__ == "__main__":
    main()
