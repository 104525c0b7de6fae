"""Side-by-side accuracy against the reference code: N seeds of one of our recipes and N of the
reference train.py with the same settings, run one at a time; prints both distributions, the
difference of the means with a 95% confidence interval, and the wall-time ratio. Run by hand,
never in CI (README "Compared with the reference code" comes from it).

    python compare.py digits /tmp/digits          # the README's data (needs scikit-learn)
    python compare.py digits /tmp/digits-random --split random   # the same images, split at random
    python compare.py digits /tmp/digits-jpeg --format jpeg      # as JPEGs, for --decode device
    python compare.py a3 --data /tmp/digits-jpeg --reference-checkout . --ours-option=--decode=device
    python compare.py a3 --data /tmp/digits --reference ~/pytorch-image-models/train.py --seeds 8
    python compare.py tv --data /tmp/digits --reference ~/vision/references/classification/train.py

A comparison is a recipe script plus the scaled-down overrides below (COMPARISONS); `--set KEY
VALUE` adds or changes one. Our command line is resolved by the script's own parser, and that
resolved recipe is translated into the reference's flags (timm_args, tv_args), so both sides run
the same numbers. Both runs of a seed go one after the other; finished runs are kept in --out and
not run again, so an interrupted comparison continues where it stopped.

The references: timm's train.py (https://github.com/huggingface/pytorch-image-models) for the
timm recipes, run as it is; it needs the timm package it was written for (pip install timm).
torchvision's references/classification/train.py (https://github.com/pytorch/vision, with its
utils.py, presets.py, transforms.py and sampler.py beside it) for tv, run through tv_reference
below, which seeds it and lets it run distributed on a CPU. Nothing of either is kept here.
"""
import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent

# ResNet-18 at 32 px on the UCI digits, batch 64: the settings of README's comparisons
SMALL = dict(model="resnet18", train_size=32, eval_size=32, batch_size=64, warmup_epochs=1)
COMPARISONS = {
    # issue 15: LAMB 4e-3 (the recipe's 8e-3 halved by hand, as in the first comparison)
    "a3": ("timm", "train_a3.py", dict(SMALL, epochs=12, lr=4e-3, min_lr=1e-6, warmup_lr=1e-4)),
    "b": ("timm", "train_b.py", dict(SMALL, epochs=15)),  # lr scaled linearly by the script
    "d": ("timm", "train_d.py", dict(SMALL, epochs=15)),
    # tv's train crop : eval crop : eval resize of 176 : 224 : 232, at 32 px. 30 epochs: at 15
    # the runs are still taking off (top-1 34-72%) and the comparison has little power
    "tv": ("tv", "train_tv.py", dict(SMALL, epochs=30, train_size=28, eval_resize=33)),
}
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # Student t, 97.5% quantile, df 1..30


# ==================================================================================================
# The data: UCI handwritten digits as 32 px RGB PNGs, a fixed 80/20 split per class
# ==================================================================================================

def digits_split(sizes, split):
    """The train indices of each class (of `sizes` images, in the data set's order)."""
    import numpy as np
    if split == "fixed":
        return [set(range(n - math.ceil(0.2 * n))) for n in sizes]
    rng = np.random.default_rng(0)  # one generator, the classes in order
    return [set(rng.permutation(n)[:int(0.8 * n)].tolist()) for n in sizes]


def make_digits(root, size=32, split="fixed", fmt="png"):
    """root/{train,val}/<digit>/<i>.png (fmt "jpeg": .jpg, baseline, quality 90, 4:2:0, what
    --decode device is for), 1,433 train and 364 val images. split "fixed": the
    last ceil(20%) of each class (in the data set's order) is val, values rounded. "random":
    for each class in order 0..9, its indices shuffled by one numpy default_rng(0), the first
    int(0.8 n) train, the rest val, values truncated (docs/COMPARISONS.md has both)."""
    try:
        from sklearn.datasets import load_digits  # ships the data: no download
    except ImportError:
        sys.exit("the digits data set comes with scikit-learn: pip install scikit-learn")
    from PIL import Image
    digits = load_digits()
    root = Path(root)
    sizes = [int((digits.target == label).sum()) for label in range(10)]
    for label, train in enumerate(digits_split(sizes, split)):
        images = digits.images[digits.target == label]
        for i, image in enumerate(images):
            folder = root / ("train" if i in train else "val") / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = image * (255 / 16)
            pixels = (pixels if split == "random" else pixels.round()).astype("uint8")
            image = Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB")
            if fmt == "jpeg":
                image.save(folder / f"{i:04d}.jpg", quality=90)
            else:
                image.save(folder / f"{i:04d}.png")
    suffix = ".jpg" if fmt == "jpeg" else ".png"
    counts = {s: sum(1 for _ in (root / s).rglob("*" + suffix)) for s in ("train", "val")}
    print(f"{root}: {counts['train']} train, {counts['val']} val images, 10 classes, {size} px")


# ==================================================================================================
# Our recipe, resolved, and the same numbers as timm or tv train.py flags
# ==================================================================================================

def resolved_recipe(script, argv):
    """The recipe `script` trains with `argv`: the script runs as it would, its call of
    common.main caught and handed to the same parser (variants and per-model values included)."""
    import runpy
    from unittest import mock
    caught = {}

    def catch(recipe, demo=None, argv=None, variants=None, by_model=None):
        caught.update(recipe=recipe, variants=variants, by_model=by_model)
    with mock.patch.object(common, "main", catch):
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return common.parse_args(caught["recipe"], argv, variants=caught["variants"],
                             by_model=caught["by_model"])[1]


def timm_args(r):
    """timm train.py flags for the resolved recipe `r`; a key timm cannot express is an error."""
    def unsupported(what):
        raise common.UserError(f"timm's train.py has no equivalent of {what}")
    if r["train_size"] != r["eval_size"]:
        unsupported(f"train size {r['train_size']} != eval size {r['eval_size']} during training")
    if r["wd_groups"] != "timm" or r["mixup_style"] != "timm" or r["remode"] != "pixel":
        unsupported("the tv variants of weight-decay groups, Mixup or erasing")
    if r["warmup_factor"] is not None or r["repeated_aug"] or r["ema_every"] != 1:
        unsupported("tv's warmup factor, repeated augmentation or EMA every n steps here")
    opt = r["opt"]
    if opt == "sgd":  # timm's "sgd" is Nesterov SGD, "momentum" plain momentum SGD
        opt = "sgd" if r["nesterov"] else "momentum"
    a = ["--model", r["model"], "--epochs", r["epochs"], "-b", r["batch_size"],
         "--img-size", r["train_size"], "--crop-pct", r["crop_pct"],
         "--interpolation", r["interpolation"], "--train-interpolation", r["interpolation"],
         "--opt", opt, "--lr", r["lr"], "--weight-decay", r["weight_decay"],
         "--sched", r["sched"], "--warmup-epochs", r["warmup_epochs"],
         "--warmup-lr", r["warmup_lr"], "--min-lr", r["min_lr"] or 0,
         "--smoothing", r["label_smoothing"] or 0, "--drop", r["dropout"] or 0,
         "--drop-path", r["drop_path"] or 0, "--mixup", r["mixup"] or 0,
         "--cutmix", r["cutmix"] or 0, "--reprob", r["reprob"] or 0,
         "--remode", r["remode"], "--recount", r["recount"]]
    for key, flag in (("momentum", "--momentum"), ("opt_eps", "--opt-eps")):
        if r[key] is not None:
            a += [flag, r[key]]
    if r["opt_betas"]:
        a += ["--opt-betas", *r["opt_betas"]]
    if r["sched_per_step"]:
        a += ["--sched-on-updates"]
    if r["warmup_prefix"]:
        a += ["--warmup-prefix"]
    if r["sched"] == "step":
        a += ["--decay-rate", r["decay_rate"], "--decay-epochs", r["decay_epochs"]]
    if r["lr_noise"]:
        a += ["--lr-noise", *r["lr_noise"], "--lr-noise-pct", r["lr_noise_pct"],
              "--lr-noise-std", r["lr_noise_std"]]
    if r["loss"] == "bce":
        a += ["--bce-loss"]
        if r["bce_target_thresh"] is not None:
            a += ["--bce-target-thresh", r["bce_target_thresh"]]
    if r["clip"]:
        a += ["--clip-grad", r["clip"]["value"], "--clip-mode", r["clip"]["mode"]]
    if r["auto_augment"]:
        a += ["--aa", r["auto_augment"]]
    if not r["zero_init_last"]:
        a += ["--model-kwargs", "zero_init_last=False"]
    if r["ema_decay"]:
        a += ["--model-ema", "--model-ema-decay", r["ema_decay"]]
    return [str(v) for v in a]


def tv_args(r):
    """torchvision references train.py flags for `r` (its -b is per process: it runs as one)."""
    def unsupported(what):
        raise common.UserError(f"torchvision's train.py has no equivalent of {what}")
    if not re.fullmatch(r"resnet\d+", r["model"]):
        unsupported(f"model {r['model']} (torchvision's ResNets only)")
    if r["opt"] != "sgd" or r["sched"] != "cosine" or r["sched_per_step"] or r["lr_noise"]:
        unsupported("an optimizer but SGD, a schedule but cosine once an epoch, or LR noise")
    if r["warmup_epochs"] and (r["warmup_lr"] is not None or not r["warmup_prefix"]
                               or not 0 < (r["warmup_factor"] or 0) <= 1):
        unsupported("a warmup from warmup_lr, one that does not precede the cosine, or a "
                    "warmup factor outside (0, 1] (tv's LinearLR start_factor)")
    if r["loss"] != "ce" or r["dropout"] or r["drop_path"] or r["zero_init_last"]:
        unsupported("BCE, dropout, drop path or zero-initialised last BN gammas")
    if r["auto_augment"] not in (None, "ta_wide") or (r["clip"] or {}).get("mode") == "agc":
        unsupported(f"augmentation {r['auto_augment']} or AGC")
    if ((r["mixup"] or r["cutmix"]) and r["mixup_style"] != "tv"
            or r["reprob"] and (r["remode"] != "tv" or r["recount"] != 1)
            or r["ema_decay"] and r["ema_style"] != "tv"):
        unsupported("timm's Mixup/CutMix, erasing or EMA")
    a = ["--model", r["model"], "--epochs", r["epochs"], "-b", r["batch_size"],
         "--train-crop-size", r["train_size"], "--val-crop-size", r["eval_size"],
         "--val-resize-size", r["eval_resize"], "--interpolation", r["interpolation"],
         "--opt", "sgd_nesterov" if r["nesterov"] else "sgd", "--lr", r["lr"],
         "--momentum", r["momentum"] or 0, "--wd", r["weight_decay"],
         "--lr-scheduler", "cosineannealinglr", "--lr-min", r["min_lr"] or 0,
         "--lr-warmup-epochs", r["warmup_epochs"], "--lr-warmup-method", "linear",
         "--lr-warmup-decay", r["warmup_factor"] or 1,  # unused without a warmup
         "--label-smoothing", r["label_smoothing"],
         "--mixup-alpha", r["mixup"], "--cutmix-alpha", r["cutmix"],
         "--random-erase", r["reprob"]]
    if r["wd_groups"] != "all":  # tv's default without the flag decays every parameter
        a += ["--norm-weight-decay", 0]  # timm's and tv's groupings exempt the norm layers
    if r["wd_groups"] == "timm":  # timm exempts every tensor of ndim <= 1: the biases too
        a += ["--bias-weight-decay", 0]
    if r["auto_augment"]:
        a += ["--auto-augment", r["auto_augment"]]
    if r["repeated_aug"]:
        a += ["--ra-sampler", "--ra-reps", r["repeated_aug"]]
    if r["clip"]:
        a += ["--clip-grad-norm", r["clip"]["value"]]
    if r["ema_decay"]:
        a += ["--model-ema", "--model-ema-steps", r["ema_every"],
              "--model-ema-decay", r["ema_decay"]]
    return [str(v) for v in a]


def check_tv_epoch(r, data):
    """tv's train loader keeps a last partial batch, ours drops it (as timm): refuse data where
    the two would run a different number of steps."""
    images = sum(1 for f in (Path(data) / "train").glob("*/*") if f.is_file())
    epoch = images // 256 * 256 if r["repeated_aug"] else images  # tv's RASampler keeps this
    if epoch == 0:
        raise common.UserError(f"an epoch of 0 images: tv's repeated-augmentation sampler keeps "
                               f"a multiple of 256 of the {images} train images")
    if epoch % r["batch_size"]:
        raise common.UserError(
            f"an epoch of {epoch} images is not a multiple of the batch {r['batch_size']}: tv "
            "trains on the last partial batch, ours drops it; choose a batch that divides it")


def tv_reference(argv):
    """`compare.py tv-reference SEED TRAIN_PY ARGS...`: torchvision's train.py, seeded, as one
    distributed process (its repeated-augmentation sampler exists only when distributed), on a
    CPU where there is no GPU. The reference has no --seed and draws from unseeded generators;
    this seeds Python, NumPy and torch with SEED, and gives its samplers (RASampler and
    DistributedSampler, both seed + epoch with seed 0 by default, so every run would share its
    data orders) a seed derived from SEED that does not collide across seeds. Its own code runs
    unchanged."""
    import random
    import runpy
    import socket
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.utils.data.distributed as data_dist
    seed, train_py = int(argv[0]), Path(argv[1]).resolve()
    sys.path.insert(0, str(train_py.parent))
    import sampler  # tv's, next to its train.py
    import utils
    order_seed = int(np.random.SeedSequence([seed, common.SEED_ORDER]).generate_state(1)[0])

    def seeded(cls):
        init = cls.__init__

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("seed", order_seed)
            init(self, *args, **kwargs)
        cls.__init__ = __init__
    seeded(sampler.RASampler)
    seeded(data_dist.DistributedSampler)
    if not torch.cuda.is_available():  # tv's distributed code assumes NCCL and a GPU
        torch.cuda.set_device = lambda device: None

        def reduce_across_processes(value):  # utils' own, with its tensor on the CPU
            t = torch.tensor(value)
            dist.barrier()
            dist.all_reduce(t)
            return t
        utils.reduce_across_processes = reduce_across_processes
        init_group = dist.init_process_group
        dist.init_process_group = lambda *a, **k: init_group(*a, **dict(k, backend="gloo"))
        ddp = torch.nn.parallel.DistributedDataParallel

        class CpuDDP(ddp):
            def __init__(self, module, device_ids=None, **kwargs):
                super().__init__(module, **kwargs)
        torch.nn.parallel.DistributedDataParallel = CpuDDP
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    sys.argv = [str(train_py), *argv[2:]]
    runpy.run_path(str(train_py), run_name="__main__")


# ==================================================================================================
# One run of each side: command, then its per-epoch results
# ==================================================================================================

# The precision of the reference's AMP on CUDA (timm: --amp-dtype bfloat16; tv's --amp is
# fp16 with a grad scaler), which ours is given too; float32 both where the recipe has no AMP
AMP_DTYPE = {"timm": "bf16", "tv": "fp16"}


def our_command(script, data, seed, workers, out, argv, amp, root=ROOT):
    """`amp`: None on a CPU, else our --amp-dtype (bf16, fp16 or off); `root`: the checkout
    whose script runs (another one for --reference-checkout)."""
    return [sys.executable, str(Path(root) / script), "--data", data, "--seed", str(seed),
            "--workers", str(workers), "--output", str(out), "--quiet",
            *(["--amp-dtype", amp] if amp else []), *argv]


def timm_command(reference, recipe, data, seed, workers, out, cuda):
    amp = ["--amp", "--amp-dtype", "bfloat16"] if cuda and recipe["amp"] else []
    classes = sum(1 for d in (Path(data) / "train").iterdir() if d.is_dir())
    return [sys.executable, str(reference), "--data-dir", data, "--train-split", "train",
            "--val-split", "val", "--num-classes", str(classes), "--no-prefetcher",
            "--seed", str(seed), "-j", str(workers),
            "--output", str(out.parent), "--experiment", out.name, "--log-interval", "100000",
            "--checkpoint-hist", "1", "--device", "cuda" if cuda else "cpu", *amp,
            *timm_args(recipe)]


def tv_command(reference, recipe, data, seed, workers, out, cuda):
    amp = ["--amp"] if cuda and recipe["amp"] else []
    return [sys.executable, str(ROOT / "compare.py"), "tv-reference", str(seed), str(reference),
            "--data-path", data, "--device", "cuda" if cuda else "cpu", "-j", str(workers),
            "--output-dir", str(out), "--print-freq", "100000", *amp, *tv_args(recipe)]


def our_rows(out):
    """[(top1, ema_top1 or None, lr)] per epoch from our metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["top1"], r.get("ema_top1"), r["lr"]) for r in rows]


TIMM_TEST = re.compile(r"Test( \(EMA\))?: \[\s*(\d+)/(\d+)\].*Acc@1:\s*[\d.]+\s*\(\s*([\d.]+)\)")


def timm_rows(out, log):
    """The same from timm: top-1 of the model and the EMA from its log (summary.csv holds the
    EMA's alone when there is one), the lr from summary.csv."""
    plain, ema = [], []
    for m in TIMM_TEST.finditer(log):
        if m.group(2) == m.group(3):  # the last batch's line carries the running average
            (ema if m.group(1) else plain).append(float(m.group(4)))
    with open(out / "summary.csv") as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f)]
    ema = ema or [None] * len(plain)
    return list(zip(plain, ema, lrs))


TV_TEST = re.compile(r"^Test: (EMA)? ?Acc@1 ([\d.]+) Acc@5", re.M)
TV_FIRST_STEP = re.compile(r"^Epoch: \[(\d+)\]\s+\[\s*0/\d+\].*?\blr: ([\d.e+-]+)", re.M)


def tv_rows(out, log):
    """The same from torchvision's log: each epoch's first step line (--print-freq larger than
    an epoch prints only that one) carries the epoch's lr, each evaluation its top-1."""
    plain, ema = [], []
    for m in TV_TEST.finditer(log):
        (ema if m.group(1) else plain).append(float(m.group(2)))
    lrs = [float(m.group(2)) for m in TV_FIRST_STEP.finditer(log)]
    ema = ema or [None] * len(plain)
    return list(zip(plain, ema, lrs))


REFERENCES = {"timm": (timm_args, timm_command, timm_rows),
              "tv": (tv_args, tv_command, tv_rows)}


def run_one(side, cmd, out, epochs, threads, parse):
    """Run one training (unless a finished one is in `out`) and return its result."""
    done = out / "compare-run.json"
    if done.exists():
        return json.loads(done.read_text())
    if out.exists():  # an interrupted run: start it again from scratch
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONHASHSEED="0")
    print(f"  {side}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (out / "compare-log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{side} failed (exit {proc.returncode}); its log: {out / 'compare-log.txt'}\n"
                 + "\n".join((proc.stdout + proc.stderr).splitlines()[-15:]))
    rows = parse(out, proc.stdout + proc.stderr)
    for f in out.glob("model_*.pth"):  # tv keeps a checkpoint of every epoch: 15 x 90 MB a run
        f.unlink()
    if len(rows) != epochs:
        sys.exit(f"{side}: {len(rows)} epochs in its results, expected {epochs} ({out})")
    top1 = [r[0] for r in rows]
    result = dict(final=top1[-1], best=max(top1), final_ema=rows[-1][1],
                  lr=[r[2] for r in rows], seconds=round(seconds, 1), command=cmd)
    done.write_text(json.dumps(result) + "\n")
    return result


# ==================================================================================================
# Statistics: mean +- std per side, difference of means with a Welch 95% interval
# ==================================================================================================

def t975(df):
    if df >= 30:
        return 1.96 + 2.4 / df  # within 0.003 of the exact quantile for df >= 30
    return T975[max(int(df), 1) - 1]  # rounding df down: a slightly wider interval


def difference(ours, ref):
    """(mean difference, 95% CI half-width, difference / pooled std) of two samples."""
    n1, n2 = len(ours), len(ref)
    v1, v2 = statistics.variance(ours), statistics.variance(ref)
    se2 = v1 / n1 + v2 / n2
    diff = statistics.mean(ours) - statistics.mean(ref)
    if se2 == 0:
        return diff, 0.0, 0.0 if diff == 0 else math.inf
    df = se2 ** 2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    pooled = math.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
    return diff, t975(df) * math.sqrt(se2), diff / pooled if pooled else math.inf


def incomplete_beta(x, a, b):
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (Lentz's
    method), on the side of x where it converges fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            term = 1.0
        elif i % 2:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + term / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def f_cdf(x, d1, d2):
    """P(F <= x) for Fisher's F with (d1, d2) degrees of freedom."""
    return incomplete_beta(d1 * x / (d1 * x + d2), d1 / 2, d2 / 2) if x > 0 else 0.0


def f_quantile(q, d1, d2):
    lo, hi = 0.0, 1.0
    while f_cdf(hi, d1, d2) < q:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f_cdf(mid, d1, d2) < q else (lo, mid)
    return (lo + hi) / 2


def variance_ratio(ours, ref):
    """(var ours / var reference, its 95% interval, the two-sided p of the F test of equal
    variances). The F test assumes normal samples; with 16 seeds a side a ratio of about 2.9
    is needed to reach p < 0.05."""
    d1, d2 = len(ours) - 1, len(ref) - 1
    ratio = statistics.variance(ours) / statistics.variance(ref)
    interval = (ratio / f_quantile(0.975, d1, d2), ratio / f_quantile(0.025, d1, d2))
    p = 2 * min(f_cdf(ratio, d1, d2), 1 - f_cdf(ratio, d1, d2))
    return ratio, interval, min(p, 1.0)


def describe(values):
    return (f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} "
            f"(min {min(values):.2f}, max {max(values):.2f})")


def report(name, results):
    ours, ref = results["ours"], results["reference"]
    seeds = ", ".join(str(s) for s in results["seeds"])
    ref_seeds = results.get("reference_seeds", results["seeds"])
    same = ("the same numbers on both sides" if ref_seeds == results["seeds"] else
            "reference seeds " + ", ".join(str(s) for s in ref_seeds))
    lines = [f"{name}: {len(ours)} seeds a side ({seeds}; {same})",
             "| | final top-1 | best top-1 | wall time |", "|---|---|---|---|"]
    for side, runs in (("ours", ours), ("reference", ref)):
        lines.append(f"| {side} | {describe([r['final'] for r in runs])} | "
                     f"{describe([r['best'] for r in runs])} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.1f} s |")
    for key in ("final", "best"):
        diff, half, effect = difference([r[key] for r in ours], [r[key] for r in ref])
        lines.append(f"{key} top-1, ours - reference: {diff:+.2f} (95% CI {diff - half:+.2f} to "
                     f"{diff + half:+.2f}), {effect:+.2f} pooled standard deviations")
    for key in ("final", "best"):
        ratio, (lo, hi), p = variance_ratio([r[key] for r in ours], [r[key] for r in ref])
        lines.append(f"{key} top-1, variance ours / reference: {ratio:.2f} (95% CI {lo:.2f} to "
                     f"{hi:.2f}), F test p = {p:.3f}")
    ratio = (statistics.mean(r["seconds"] for r in ours) /
             statistics.mean(r["seconds"] for r in ref))
    lines.append(f"wall time ours / reference: {ratio:.2f}")
    lr_gap = max(abs(a - b) / max(abs(b), 1e-12)
                 for o, f in zip(ours, ref) for a, b in zip(o["lr"], f["lr"]))
    lines.append(f"per-epoch lr, largest relative difference between the sides: {lr_gap:.1e}")
    return "\n".join(lines)


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["digits"]:
        d = argparse.ArgumentParser(prog="compare.py digits")
        d.add_argument("dir")
        d.add_argument("--split", choices=("fixed", "random"), default="fixed")
        d.add_argument("--format", choices=("png", "jpeg"), default="png")
        a = d.parse_args(argv[1:])
        return make_digits(a.dir, split=a.split, fmt=a.format)
    if argv[:1] == ["tv-reference"]:
        return tv_reference(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("comparison", choices=list(COMPARISONS))
    p.add_argument("--data", required=True, help="folder with train/ and val/")
    p.add_argument("--reference",
                   help="path of timm's train.py, or of torchvision's references/classification/"
                   "train.py for tv")
    p.add_argument("--reference-checkout", metavar="DIR",
                   help="instead of --reference: the same recipe script of another checkout of "
                   "this code (git worktree add DIR COMMIT), to see whether a change moved "
                   "accuracy; its seeds are --reference-seed-stride apart")
    p.add_argument("--reference-seed-stride", type=int, default=None,
                   help="the reference side's seeds first, first + stride, ... (default: "
                   "--seed-stride); 1000 for checkouts whose seeds share data orders one epoch "
                   "apart (seed + epoch, before 2026-11-27)")
    p.add_argument("--ours-option", action="append", default=[], metavar="OPTION",
                   help="a run option for our side only, e.g. --ours-option=--decode=device "
                   "with --reference-checkout . to compare two ways of running one checkout")
    p.add_argument("--seeds", type=int, default=8, help="seeds a side: 0..N-1 (default 8)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--seed-stride", type=int, default=1,
                   help="seeds first, first + stride, ...: 1000 for B, whose timm LR noise is "
                   "seeded with seed + epoch (seed s + 1 replays seed s's noise one epoch late)")
    p.add_argument("--workers", type=int, default=2, help="loader workers, both sides")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS, both sides")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="change one recipe key on both sides (--set epochs 20)")
    p.add_argument("--out", help="folder for the runs (default runs/compare-<comparison>)")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds: at least 2 a side, for a standard deviation")
    if bool(args.reference) == bool(args.reference_checkout):
        p.error("give one of --reference and --reference-checkout")
    kind, script, overrides = COMPARISONS[args.comparison]
    translate, reference_command, reference_rows = REFERENCES[kind]
    overrides = dict(overrides, **{k.replace("-", "_"): v for k, v in args.set})
    flags = [x for k, v in overrides.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    recipe = resolved_recipe(script, flags)
    out = Path(args.out or f"runs/compare-{args.comparison}")
    import torch
    cuda = torch.cuda.is_available()
    amp = (AMP_DTYPE[kind] if recipe["amp"] else "off") if cuda else None
    if kind == "tv":
        check_tv_epoch(recipe, args.data)
    seeds = [args.first_seed + k * args.seed_stride for k in range(args.seeds)]
    stride = args.reference_seed_stride or args.seed_stride
    ref_seeds = [args.first_seed + k * stride for k in range(args.seeds)]
    results = dict(seeds=seeds, reference_seeds=ref_seeds, recipe=recipe, ours=[], reference=[])
    if args.reference_checkout:  # our own script at another commit, our flags and results
        checkout = Path(args.reference_checkout).resolve()
        if not (checkout / script).is_file():
            p.error(f"--reference-checkout: no {script} in {checkout}")
        print(f"{args.comparison}: {script} {' '.join(flags)}\n  reference: {checkout / script}")

        def reference_command(_, recipe, data, seed, workers, out, cuda):
            return our_command(script, data, seed, workers, out, flags, amp, root=checkout)

        def reference_rows(o, log):
            return our_rows(o)
    else:
        print(f"{args.comparison}: {script} {' '.join(flags)}\n  {kind}: "
              f"{' '.join(translate(recipe))}")
    for seed, ref_seed in zip(seeds, ref_seeds):  # the sides alternate: a slow hour hits both
        print(f"seed {seed}" + (f", reference seed {ref_seed}" if ref_seed != seed else ""),
              flush=True)
        mine = out / f"ours-seed{seed}"
        results["ours"].append(run_one(
            "ours", our_command(script, args.data, seed, args.workers, mine,
                                flags + [x for o in args.ours_option for x in o.split("=", 1)],
                                amp), mine,
            recipe["epochs"], args.threads, lambda o, log: our_rows(o)))
        theirs = out / f"reference-seed{ref_seed}"
        results["reference"].append(run_one(
            "reference", reference_command(args.reference, recipe, args.data, ref_seed,
                                           args.workers, theirs, cuda),
            theirs, recipe["epochs"], args.threads, reference_rows))
        print(f"  top-1 ours {results['ours'][-1]['final']:.2f}, reference "
              f"{results['reference'][-1]['final']:.2f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    text = report(args.comparison, results)
    print(text)
    (out / "compare.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "compare.md").write_text(text + "\n")


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        sys.exit(f"error: {e}")
