"""The first-GPU-run script (issues 12 and 16): run unattended on a GPU machine, it checks every
CUDA path and measures what README's GPU table needs, in under 8 minutes, and writes one JSON.

    python bench_gpu.py --out gpu.json            # everything, on the GPU(s) present
    python bench_gpu.py --parts sync train_eval   # some parts only

Parts, each in its own subprocess with its own time limit (a failure is recorded, the rest
still run):
  tests       the suite's CUDA-only tests (device ops bit-equal on CUDA, no host sync in
              device_augment, the prefetch stream) and the GPU-path tests
  sync        a short A3 run under torch.cuda.set_sync_debug_mode("warn"): host syncs per
              training step, by source line (target: none outside the log interval)
  step        bench.py step: ResNet-50 at 224, batch 256, bf16 + channels_last, ours vs timm,
              eager and torch.compile
  optim       bench.py optim: LAMB, RMSpropTF, AdamP, SGD + AGC and EMA steps vs timm
  pipeline    bench.py pipeline for A1 and tv: images/s per worker with and without
              --device-aug, and the GPU time --device-aug costs per batch
  train_eval  train_a3.py on generated data (with --compile, and with --device-aug) ending in a
              checkpoint that eval.py scores to the same top-1; under torchrun on NCCL with 2
              GPUs where there are 2
timm comes from requirements-dev.txt. Nothing is downloaded: the data are generated.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PARTS = ("tests", "sync", "step", "optim", "pipeline", "train_eval")

# run inside the training process of the sync part: every synchronising CUDA call is recorded
# with the line of common.py it came from; the step count comes from the run's rows
SYNC_PATCH = """
import collections, json, traceback, warnings, torch
if torch.cuda.is_available():  # elsewhere only the plumbing runs (the CPU smoke test)
    torch.cuda.set_sync_debug_mode("warn")
warnings.simplefilter("always")
lines = collections.Counter()
show = warnings.showwarning
def record(message, category, filename, lineno, file=None, line=None):
    if "synchronizing" not in str(message):
        return show(message, category, filename, lineno, file, line)
    where = [f for f in traceback.extract_stack() if f.filename.endswith("common.py")]
    lines[f"common.py:{where[-1].lineno} {where[-1].line}" if where else "elsewhere"] += 1
warnings.showwarning = record
import atexit
atexit.register(lambda: open(OUT + "-syncs.json", "w").write(json.dumps(lines)))
"""


def sh(cmd, timeout, env=None):
    """(returncode, stdout + stderr tail, seconds); a timeout is returncode 124."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, **(env or {})))
        code, text = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        code = 124
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x
                       for x in (e.stdout or "", e.stderr or "")) + f"\ntimed out ({timeout} s)"
    return code, text[-4000:], round(time.perf_counter() - t0, 1)


def tables(text):
    """The markdown tables bench.py printed, as lists of rows of cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|") and "---" not in line]
    return rows


def runner(script, patch, out):
    """A Python file that runs `patch`, then `script` as __main__ with the command line it is
    given. The patch runs in each process after `import torch, common`, with RANK (torchrun's)
    and OUT (the run folder) defined: to record internals or inject faults."""
    path = Path(f"{out}-runner.py")
    path.write_text(f"import os, runpy, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                    "import torch\nimport common\n"
                    f"RANK, OUT = int(os.environ.get('RANK', 0)), {str(out)!r}\n"
                    f"{patch}\nsys.argv = [{str(ROOT / script)!r}] + sys.argv[1:]\n"
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return str(path)


def part_tests(args, work):
    code, text, secs = sh([sys.executable, "-m", "pytest", "-q", "-rs",
                           "tests/test_device_aug.py", "tests/test_speed_paths.py",
                           "tests/test_gpu_paths.py", "-k", "cuda or sync or stream or amp"],
                          timeout=240)
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return dict(ok=code == 0, seconds=secs, summary=summary[-1:] or None,
                tail=None if code == 0 else text)


def small_run(args):
    return ["--model", args.model, "--train-size", str(args.size), "--eval-size",
            str(args.size), "--crop-pct", "1.0", "--batch-size", str(args.batch), "--quiet",
            "--device", args.device]


def part_sync(args, work, data):
    out = work / "sync"
    # batches of 16: many steps an epoch; the log interval beyond them, so that any sync inside
    # the step shows as one per step (evaluation and the epoch's end sync by design)
    code, text, secs = sh([sys.executable, runner("train_a3.py", SYNC_PATCH, out), "--data",
                           str(data), "--output", str(out), "--epochs", "2",
                           "--log-interval", "100000", *small_run(args), "--batch-size", "16"],
                          timeout=180)
    result = dict(ok=code == 0, seconds=secs, tail=None if code == 0 else text)
    if code == 0:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        syncs = json.loads(Path(f"{out}-syncs.json").read_text())
        steps = len(rows) * (8 * args.images // 16)
        result.update(steps=steps, syncs=sum(syncs.values()), syncs_by_line=syncs,
                      train_img_s=[r["train_img_s"] for r in rows])
    return result


def part_bench(section, extra, timeout):
    code, text, secs = sh([sys.executable, "bench.py", section, *extra], timeout=timeout)
    return dict(ok=code == 0, seconds=secs, tables=tables(text),
                tail=None if code == 0 else text)


def part_train_eval(args, work, data):
    results = {}
    gpus = int(sh([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                  60)[1].split()[-1] or 0)
    variants = {"eager": [], "compile": ["--compile"], "device_aug": ["--device-aug"]}
    if gpus >= 2:
        variants["torchrun_nccl_2"] = ["--compile"]
    for name, extra in variants.items():
        out = work / f"run-{name}"
        launcher = [sys.executable] if not name.startswith("torchrun") else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        code, text, secs = sh([*launcher, "train_a3.py", "--data", str(data), "--output",
                               str(out), "--epochs", "2", *small_run(args), *extra], timeout=240)
        r = dict(ok=code == 0, seconds=secs, tail=None if code == 0 else text)
        if code == 0:
            best = max((json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()),
                       key=lambda row: row["top1"])
            ecode, etext, _ = sh([sys.executable, "eval.py", "--checkpoint", str(out / "best.pth"),
                                  "--data", str(data), "--device", args.device], timeout=120)
            # eval.py: JSON lines on stdout, its table on stderr (sh() returns both)
            scored = next((json.loads(line) for line in etext.splitlines()
                           if line.startswith("{")), None) if ecode == 0 else None
            r.update(train_top1=best["top1"], eval_top1=scored and scored["top1"],
                     same_top1=bool(scored) and abs(scored["top1"] - best["top1"]) < 1e-6,
                     eval_tail=None if ecode == 0 else etext)
        results[name] = r
    return dict(ok=all(r["ok"] and r.get("same_top1") for r in results.values()), gpus=gpus,
                runs=results)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu.json", help="the JSON written (after every part)")
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet50", help="train_eval and sync runs")
    p.add_argument("--size", type=int, default=160, help="train_eval and sync runs: image size")
    p.add_argument("--batch", type=int, default=128, help="train_eval and sync runs")
    p.add_argument("--images", type=int, default=40, help="generated images per class (8)")
    args = p.parse_args(argv)
    import torch
    import common
    report = dict(when=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__,
                  cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i) for i in
                                                 range(torch.cuda.device_count())], parts={})
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = common.make_demo_data(work / "data", train_per_class=args.images,
                                     val_per_class=max(4, args.images // 4), size=args.size + 32)
        dev = ["--device", args.device]
        jobs = dict(
            tests=lambda: part_tests(args, work),
            sync=lambda: part_sync(args, work, data),
            step=lambda: dict(eager=part_bench("step", [*dev, "--rounds", "1"], 200),
                              compile=part_bench("step", [*dev, "--rounds", "1", "--compile"],
                                                 300)),
            optim=lambda: part_bench("optim", [*dev, "--rounds", "1"], 120),
            pipeline=lambda: part_bench("pipeline", [*dev, "--recipes", "a1", "tv", "--images",
                                                     "200", "--rounds", "1"], 200),
            train_eval=lambda: part_train_eval(args, work, data))
        for name in args.parts:
            t0 = time.perf_counter()
            print(f"{name} ...", flush=True)
            try:
                report["parts"][name] = jobs[name]()
            except Exception as e:  # record and go on: one broken part must not lose the rest
                report["parts"][name] = dict(ok=False, error=f"{type(e).__name__}: {e}")
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v.get("ok", v) if isinstance(v, dict) else v
                      for k, v in report["parts"].items()}))
    return report


if __name__ == "__main__":
    main()
