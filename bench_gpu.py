"""The first-GPU-run script (issues 12 and 16): run unattended on a GPU machine, it checks every
CUDA path and measures what README's GPU table needs, and writes one JSON (rewritten after every
part). Its budget (each part's time limit and their sum) is printed before anything runs.

    python bench_gpu.py --parts core --out gpu.json   # first call: under 6 minutes in all
    python bench_gpu.py --parts more --budget-only    # what the later parts would cost
    python bench_gpu.py --parts device_aug optim --out gpu-more.json   # by name, as time allows

Each part runs in subprocesses with time limits (a process past its limit is killed with its
children and recorded as a failure; the rest still run). Before the parts: a probe (torch, CUDA
and the GPUs, from a fresh process) and the generated data. The parts:

core (what decides whether the GPU paths work, and the headline img/s):
  tests       the suite's CUDA-only tests (device ops bit-equal on CUDA, no host sync in
              device_augment, the prefetch stream) and the amp-dtype tests
  sync        host syncs per training step under torch.cuda.set_sync_debug_mode("warn"), by
              source line, one short run per optimizer family of the recipes (LAMB: A1-A3,
              RMSpropTF: B, SGD + AGC: C, AdamP: D, SGD: tv, RS) and A3 with --device-aug, run at
              once (target: no line that syncs every step)
  step        bench.py step, eager: ResNet-50 at 224, batch 256, bf16 + channels_last, img/s,
              ours vs timm
  train_eval  train_a3.py on the generated data (eager), ending in a checkpoint that eval.py
              scores, at the run's evaluation precision and per-device batch, to its top-1
more (run afterwards, by name, if time is left):
  device_aug  train_eval with --device-aug
  optim       bench.py optim: LAMB, RMSpropTF, AdamP, SGD + AGC and EMA steps vs timm
  pipeline    bench.py pipeline for A1 and tv: images/s per worker with and without
              --device-aug, and the GPU time --device-aug costs per batch
  compile     train_eval with --compile
  step_compile  bench.py step with torch.compile
  torchrun    train_eval with --compile under torchrun on NCCL, 2 GPUs (skipped with fewer)
  decode      bench.py decode: --decode device's decode + crop img/s on the GPU at 160, 176
              and 224 px, its pixels against Pillow's, and the nvJPEG ordering check
  pipelines   train_a3.py (ResNet-50, --size px) end to end on generated ImageNet-sized JPEGs
              with each input pipeline: Pillow, Pillow + --device-aug, --decode device; the
              train img/s and data wait of each
timm comes from requirements-dev.txt. Nothing is downloaded: the data are generated.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# name: (group, time limits in s of its commands, run one after the other). The limits are
# about twice what each is estimated (not yet measured) to take on one H100 / H200 after a cold
# start (a first CUDA call, cudnn.benchmark's trials on the first step of each shape); core's
# sum, with the probe and the data, stays under CORE_LIMIT (tests/test_bench.py)
PARTS = {
    "tests": ("core", [50]),
    "sync": ("core", [80]),           # the runs go at once: one limit for all
    "step": ("core", [70]),
    "train_eval": ("core", [65, 35]),  # train_a3.py, then eval.py
    "device_aug": ("more", [65, 35]),
    "optim": ("more", [100]),
    "pipeline": ("more", [150]),
    "compile": ("more", [200, 35]),
    "step_compile": ("more", [270]),
    "torchrun": ("more", [240, 45]),
    "decode": ("more", [150]),
    "pipelines": ("more", [40, 90, 90, 90]),  # the data, then one run per pipeline
}
# pipelines: train_a3.py end to end on ImageNet-sized JPEGs, one run per input pipeline
PIPELINES = {"pillow": [], "pillow_device_aug": ["--device-aug"],
             "decode_device": ["--decode", "device"]}
SETUP = {"probe": 30, "data": 15}  # before any part; probe: a cold first `import torch`
CORE_LIMIT = 360   # the first call's whole budget, seconds
COMMAND_LIMIT = 600  # a lent machine's limit on one command
GROUPS = {"core": [p for p, (g, _) in PARTS.items() if g == "core"],
          "more": [p for p, (g, _) in PARTS.items() if g == "more"], "all": list(PARTS)}
# train_eval parts: extra train_a3.py flags, processes (torchrun when 2)
TRAIN_EVAL = {"train_eval": ([], 1), "device_aug": (["--device-aug"], 1),
              "compile": (["--compile"], 1), "torchrun": (["--compile"], 2)}
# sync: one short run per optimizer family the recipes use, and A3's --device-aug
SYNC_RUNS = {
    "lamb": ("train_a3.py", []),  # A1, A2, A3
    "lamb_device_aug": ("train_a3.py", ["--device-aug"]),
    "rmsproptf": ("train_b.py", []),  # B, with its EMA
    "sgd_agc": ("train_c.py", []),  # C: SGD + adaptive gradient clipping
    "adamp": ("train_d.py", []),  # D
    "sgd": ("train_tv.py", []),  # tv (float32, its EMA); RS uses SGD too
}

# printed by a fresh process after `import torch`: anything else it prints (a warning at import,
# a CUDA initialisation note) is ignored by the marker's regex
PROBE = """
import json, torch
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print("PROBE=" + json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda, gpus=gpus)),
      flush=True)
"""

# run inside the training process of the sync part: every synchronising CUDA call is recorded
# with the line of common.py it came from; the optimizer steps are counted by a global hook
SYNC_PATCH = """
import collections, json, traceback, warnings, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
if torch.cuda.is_available():  # elsewhere only the plumbing runs (the CPU smoke test)
    torch.cuda.set_sync_debug_mode("warn")
warnings.simplefilter("always")
lines = collections.Counter()
steps = [0]
register_optimizer_step_post_hook(lambda *a, **k: steps.__setitem__(0, steps[0] + 1))
show = warnings.showwarning
def record(message, category, filename, lineno, file=None, line=None):
    if "synchronizing" not in str(message):
        return show(message, category, filename, lineno, file, line)
    where = [f for f in traceback.extract_stack() if f.filename.endswith("common.py")]
    lines[f"common.py:{where[-1].lineno} {where[-1].line}" if where else "elsewhere"] += 1
warnings.showwarning = record
import atexit
atexit.register(lambda: open(OUT + "-syncs.json", "w").write(
    json.dumps(dict(steps=steps[0], lines=lines))))
"""


def expand(parts):
    """Part names and group names (core, more, all) -> part names, in the order given."""
    names = []
    for p in parts:
        names += [n for n in GROUPS.get(p, [p]) if n not in names]
    return names


def budget(names):
    """[(what, seconds)] of the probe, the data and the parts `names`, and their sum."""
    rows = list(SETUP.items()) + [(n, sum(PARTS[n][1])) for n in names]
    return rows, sum(s for _, s in rows)


def print_budget(names):
    rows, total = budget(names)
    print(f"bench_gpu.py budget (time limits, s; a process past its limit is killed and "
          f"recorded as failed): " + " + ".join(f"{n} {s}" for n, s in rows)
          + f" = {total} s ({total / 60:.1f} min)", flush=True)
    if total > COMMAND_LIMIT:
        print(f"note: over {COMMAND_LIMIT} s, one 10-minute command would be cut short: "
              "select fewer parts by name", flush=True)
    return total


def _kill(proc):
    try:  # its own session: the children (loader workers, torchrun's ranks) go with it
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def sh_many(cmds, timeout, env=None):
    """Run the commands at once; for each (returncode, stdout + stderr, seconds). Those still
    running `timeout` seconds after the start are killed with their children: returncode 124."""
    t0 = time.perf_counter()
    jobs = []
    try:
        for cmd in cmds:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True,
                                    env=dict(os.environ, **(env or {})),
                                    start_new_session=True)
            jobs.append((proc, out, err))
        results = []
        for proc, out, err in jobs:
            try:
                code, note = proc.wait(timeout=max(0.0, t0 + timeout - time.perf_counter())), ""
            except subprocess.TimeoutExpired:
                _kill(proc)
                code, note = 124, f"\ntimed out ({timeout} s)"
            text = ""
            for f in (out, err):
                f.seek(0)
                text += f.read()
            results.append((code, text + note, round(time.perf_counter() - t0, 1)))
        return results
    finally:
        for proc, out, err in jobs:
            if proc.poll() is None:  # an exception (Ctrl-C) here: no process left behind
                _kill(proc)
            out.close()
            err.close()


def sh(cmd, timeout, env=None):
    """(returncode, stdout + stderr, seconds); a timeout is returncode 124."""
    return sh_many([cmd], timeout, env)[0]


def tail(text, n=4000):
    return text[-n:]


def tables(text):
    """The markdown tables bench.py printed, as lists of rows of cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|") and "---" not in line]
    return rows


def probe(timeout=SETUP["probe"], prelude=""):
    """torch's and CUDA's versions and the GPUs' names, from a fresh process (`prelude`: code
    run before, the tests' stand-in for a warning printed at `import torch`)."""
    code, text, secs = sh([sys.executable, "-c", prelude + PROBE], timeout)
    found = re.findall(r"^PROBE=(\{.*\})\s*$", text, re.M)
    if code != 0 or not found:
        return dict(ok=False, seconds=secs, gpus=[], tail=tail(text))
    return dict(json.loads(found[-1]), ok=True, seconds=secs)


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
                           "tests/test_gpu_paths.py", "tests/test_decode.py", "-k",
                           "cuda or sync or stream or amp"],
                          timeout=PARTS["tests"][1][0])
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    # on a GPU a skipped CUDA test is a failure: it did not run
    skipped = args.device.startswith("cuda") and "skipped" in "".join(summary[-1:])
    return dict(ok=code == 0 and not skipped, seconds=secs, summary=summary[-1:] or None,
                tail=None if code == 0 else tail(text))


def small_run(args, batch):
    return ["--model", args.model, "--train-size", str(args.size), "--eval-size",
            str(args.size), "--crop-pct", "1.0", "--batch-size", str(batch), "--quiet",
            "--device", args.device]


def sync_summary(syncs, steps):
    """Host syncs per step, and the lines that synced at least once per step (a sync inside
    the step; evaluation and the epoch's end sync by design, fewer times than there are steps
    with the log interval beyond them)."""
    total = sum(syncs.values())
    return dict(steps=steps, syncs=total, syncs_per_step=round(total / max(steps, 1), 3),
                every_step=sorted(k for k, v in syncs.items() if steps and v >= steps),
                syncs_by_line=syncs)


def part_sync(args, work, data):
    # batches of 16: many steps an epoch; the log interval beyond them, so that any sync inside
    # the step shows as one per step. The runs go at once (the GPU and the cores have room for
    # them; a sync is counted per process): their img/s are not measurements
    cmds, outs = [], {}
    workers = max(1, min(4, (os.cpu_count() or 1) // len(SYNC_RUNS)))
    for name, (script, extra) in SYNC_RUNS.items():
        out = outs[name] = work / f"sync-{name}"
        cmds.append([sys.executable, runner(script, SYNC_PATCH, out), "--data", str(data),
                     "--output", str(out), "--epochs", "2", "--log-interval", "100000",
                     *small_run(args, 16), "--workers", str(workers), *extra])
    env = {} if "OMP_NUM_THREADS" in os.environ else {
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(SYNC_RUNS)))}
    runs = {}
    for (name, out), (code, text, secs) in zip(outs.items(),
                                               sh_many(cmds, PARTS["sync"][1][0], env)):
        r = dict(ok=code == 0, seconds=secs, tail=None if code == 0 else tail(text))
        try:  # one run's missing file must not lose the others' counts
            if code == 0:
                counted = json.loads(Path(f"{out}-syncs.json").read_text())
                r.update(sync_summary(counted["lines"], counted["steps"]),
                         train_img_s=[json.loads(x)["train_img_s"]
                                      for x in (out / "metrics.jsonl").read_text().splitlines()])
        except (OSError, ValueError, KeyError) as e:
            r.update(ok=False, error=f"{type(e).__name__}: {e}", tail=tail(text))
        runs[name] = r
    return dict(ok=all(r["ok"] for r in runs.values()), concurrent=True,
                syncs_per_step={n: r.get("syncs_per_step") for n, r in runs.items()},
                every_step={n: r.get("every_step") for n, r in runs.items()}, runs=runs)


def part_bench(section, extra, timeout):
    code, text, secs = sh([sys.executable, "bench.py", section, *extra], timeout=timeout)
    return dict(ok=code == 0, seconds=secs, tables=tables(text),
                tail=None if code == 0 else tail(text))


def eval_amp_dtype(precision):
    """eval.py's --amp-dtype for the precision a run's provenance.json records (common.amp_name:
    "bf16 autocast", "fp16 autocast + grad scaler", "float32"); None if unknown."""
    words = re.findall(r"[a-z0-9]+", str(precision).lower())
    if "bf16" in words or "bfloat16" in words:
        return "bf16"
    if "fp16" in words or "float16" in words:
        return "fp16"
    return "off" if words and words[0] in ("float32", "fp32") else None


# eval.py scores the checkpoint at the training run's evaluation precision and per-device
# batch (and, after torchrun, under torchrun: the same shards), so with deterministic kernels
# the top-1 is the same. On a CPU it is (float32, same batches): no slack. On CUDA both
# processes run cudnn.benchmark, which picks each convolution's algorithm by timing, so the two
# may pick different ones; in bf16 the logits then differ in their last bits and an image
# whose two best classes are that close can change its top-1: one image of slack
def tolerance_images(device):
    return 1 if str(device).startswith("cuda") else 0


def top1_agrees(train_top1, eval_top1, train_images, eval_images, tolerance):
    """(agrees, images the two top-1s differ by): the same images counted, and the top-1s
    (percentages, rounded to 3 decimals) at most `tolerance` images apart."""
    if train_images != eval_images or not eval_images:
        return False, None
    differ = round(abs(train_top1 - eval_top1) * eval_images / 100)
    return differ <= tolerance, differ


def part_train_eval(args, work, data, name, gpus):
    extra, nproc = TRAIN_EVAL[name]
    train_limit, eval_limit = PARTS[name][1]
    if nproc > 1 and gpus < nproc:
        return dict(ok=None, skipped=f"needs {nproc} GPUs, found {gpus}")
    out = work / f"run-{name}"
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc)]
    code, text, secs = sh([*launcher, "train_a3.py", "--data", str(data), "--output", str(out),
                           "--epochs", "2", *small_run(args, args.batch), *extra], train_limit)
    r = dict(ok=code == 0, seconds=secs, tail=None if code == 0 else tail(text))
    if code != 0:
        return r
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    key = "ema_top1" if "ema_top1" in rows[0] else "top1"  # best.pth is the best by it
    best = max(rows, key=lambda row: row[key])
    # like with like: the run evaluated at its precision with its per-device batch
    prov = json.loads((out / "provenance.json").read_text())[-1]
    amp, batch = eval_amp_dtype(prov.get("precision")), prov.get("device_batch")
    r.update(train_top1=best[key], eval_amp_dtype=amp, eval_batch=batch,
             tolerance_images=tolerance_images(args.device))
    if amp is None or not batch:
        return dict(r, ok=False, error=f"provenance.json: precision {prov.get('precision')!r}, "
                    f"device_batch {batch!r}: cannot evaluate like with like")
    ecode, etext, esecs = sh([*launcher, "eval.py", "--checkpoint", str(out / "best.pth"),
                              "--data", str(data), "--device", args.device, "--amp-dtype", amp,
                              "--batch-size", str(batch)], eval_limit)
    # eval.py: JSON lines on stdout, its table on stderr
    scored = next((json.loads(line) for line in etext.splitlines()
                   if line.startswith("{")), None) if ecode == 0 else None
    agrees, differ = top1_agrees(best[key], scored and scored["top1"], best.get("val_images"),
                                 scored and scored["images"], r["tolerance_images"])
    r.update(eval_top1=scored and scored["top1"], images=scored and scored["images"],
             differs_by_images=differ, top1_agrees=agrees, eval_seconds=esecs,
             loss_diff=round(scored["loss"] - best["val_loss"], 5) if scored and key == "top1"
             else None,
             eval_tail=None if ecode == 0 else tail(etext))
    r["ok"] = agrees
    return r


def part_pipelines(args, work):
    """Train img/s end to end per input pipeline. 2 epochs of --pipeline-images ImageNet-sized
    JPEGs (bench.make_jpeg_folder) with the default loader workers (the cores); the second
    epoch's train img/s is the figure (the first pays for cudnn's trials and worker start)."""
    limits = PARTS["pipelines"][1]
    data = work / "jpegs"
    code, text, secs = sh([sys.executable, "-c", "import bench; bench.make_jpeg_folder("
                           f"{str(data)!r}, 8, {args.pipeline_images // 8}, 8)"], limits[0])
    result = dict(ok=code == 0, data_seconds=secs, images=args.pipeline_images, runs={})
    if code != 0:
        return dict(result, tail=tail(text))
    for (name, extra), limit in zip(PIPELINES.items(), limits[1:]):
        out = work / f"pipeline-{name}"
        code, text, secs = sh([sys.executable, "train_a3.py", "--data", str(data), "--output",
                               str(out), "--epochs", "2", *small_run(args, args.batch),
                               "--workers", str(len(os.sched_getaffinity(0))), *extra], limit)
        r = dict(ok=code == 0, seconds=secs, tail=None if code == 0 else tail(text))
        if code == 0:
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            r.update(train_img_s=[row["train_img_s"] for row in rows],
                     data_wait=[row.get("data_wait") for row in rows],
                     bad_images=[row.get("bad_images") for row in rows])
        result["runs"][name] = r
    result["ok"] = all(r["ok"] for r in result["runs"].values())
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu.json", help="the JSON written (after every part)")
    p.add_argument("--parts", nargs="+", default=["core"], choices=[*GROUPS, *PARTS],
                   help="parts or groups (core, more, all; default core)")
    p.add_argument("--budget-only", action="store_true", help="print the budget and exit")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet50", help="train_eval and sync runs")
    p.add_argument("--size", type=int, default=160, help="train_eval and sync runs: image size")
    p.add_argument("--batch", type=int, default=128, help="train_eval runs")
    p.add_argument("--images", type=int, default=40, help="generated images per class (8)")
    p.add_argument("--decode-images", type=int, default=256,
                   help="decode: ImageNet-sized JPEGs generated for bench.py decode")
    p.add_argument("--pipeline-images", type=int, default=8192,
                   help="pipelines: ImageNet-sized JPEGs generated for the end-to-end runs")
    args = p.parse_args(argv)
    names = expand(args.parts)
    total = print_budget(names)
    if args.budget_only:
        return None
    t_start = time.perf_counter()
    found = probe()
    report = dict(when=time.strftime("%Y-%m-%d %H:%M"), torch=found.get("torch"),
                  cuda=found.get("cuda"), gpus=found["gpus"], budget_s=total, probe=found,
                  parts={})
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if not found["ok"]:  # a slow cold start, say: go on, the parts record their own failures
        print(f"probe failed after {found['seconds']} s (probe.tail in {out}); going on",
              flush=True)
    elif args.device.startswith("cuda") and not found["gpus"]:
        report["error"] = (f"--device {args.device}: torch {found['torch']} (CUDA "
                           f"{found['cuda']}) sees no GPU; nothing run")
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"bench_gpu.py: {report['error']} (--device cpu runs the plumbing)", flush=True)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        code, text, secs = sh([sys.executable, "-c", "import common; common.make_demo_data("
                               f"{str(data)!r}, train_per_class={args.images}, val_per_class="
                               f"{max(4, args.images // 4)}, size={args.size + 32})"],
                              SETUP["data"])
        report["data"] = dict(ok=code == 0, seconds=secs, tail=None if code == 0 else tail(text))
        dev = ["--device", args.device]
        jobs = dict(
            tests=lambda: part_tests(args, work),
            sync=lambda: part_sync(args, work, data),
            step=lambda: part_bench("step", [*dev, "--rounds", "1"], PARTS["step"][1][0]),
            step_compile=lambda: part_bench("step", [*dev, "--rounds", "1", "--compile"],
                                            PARTS["step_compile"][1][0]),
            optim=lambda: part_bench("optim", [*dev, "--rounds", "1"], PARTS["optim"][1][0]),
            pipeline=lambda: part_bench("pipeline", [*dev, "--recipes", "a1", "tv", "--images",
                                                     "200", "--rounds", "1"],
                                        PARTS["pipeline"][1][0]),
            decode=lambda: part_bench("decode", [*dev, "--images", str(args.decode_images),
                                                 "--rounds", "3"],
                                      PARTS["decode"][1][0]),
            pipelines=lambda: part_pipelines(args, work),
            **{name: (lambda name=name: part_train_eval(args, work, data, name,
                                                        len(found["gpus"])))
               for name in TRAIN_EVAL})
        for name in names:
            t0 = time.perf_counter()
            print(f"{name} (limit {sum(PARTS[name][1])} s) ...", flush=True)
            try:
                report["parts"][name] = jobs[name]()
            except Exception as e:  # record and go on: one broken part must not lose the rest
                report["parts"][name] = dict(ok=False, error=f"{type(e).__name__}: {e}")
            print(f"{name}: {time.perf_counter() - t0:.0f} s, ok "
                  f"{report['parts'][name].get('ok')}", flush=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v.get("ok", v) if isinstance(v, dict) else v
                      for k, v in report["parts"].items()}))
    print(f"{report['seconds']:.0f} s in all (budget {total} s)", flush=True)
    return report


if __name__ == "__main__":
    main()
