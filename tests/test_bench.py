"""bench.py still runs (a smoke test: tiny sizes, one round; the numbers are not checked, since
speed is measured by hand, never asserted in tests)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT


def bench(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def rows(out, first):
    return [line for line in out.splitlines() if line.startswith(f"| {first}")]


def test_bench_pipeline_runs():
    out = bench("pipeline", "--images", "3", "--rounds", "1", "--recipes", "a3", "tv")
    a3, tv = rows(out, "a3"), rows(out, "tv")
    assert len(a3) == len(tv) == 3  # train and eval rows, then the --decode device row
    assert "timm create_transform" in a3[0] and "torchvision preset" in tv[0]
    assert all(re.search(r"\| \d+ \| \d+ \| \d+\.\d\d \|", r) for r in a3[:2] + tv[:2])
    # train rows: --fast-decode, --device-aug, both, then the device half of --device-aug
    assert all(re.search(r"(\| \d+ \| \d+\.\d\d ){3}\| \d+ \|$", r) for r in (a3[0], tv[0]))
    # --decode device: reference, worker img/s, ratio, then its device half
    assert all(re.fullmatch(r"\| \w+ \| \d+ \| \d+ \| \d+ \| \d+\.\d \| \d+ \|", r)
               for r in (a3[2], tv[2])), (a3[2], tv[2])
    assert rows(out, "224") and rows(out, "128")  # the --fast-decode pixel table


def test_bench_step_and_optim_run():
    out = bench("step", "optim", "--device", "cpu", "--rounds", "1", "--steps", "1",
                "--batch", "4", "--size", "32")
    assert rows(out, "images/s") and rows(out, "peak RSS")
    for name in ("LAMB", "RMSpropTF", "AdamP", "SGD + AGC", "EMA update"):
        row = rows(out, name)
        assert row, name
        # same start and gradients: ours and timm's agree (the agreement is tested properly in
        # test_optim*.py; here a wrong pairing of the two sides would show)
        assert float(row[0].split("|")[-2]) < 1e-5, row


def test_bench_host_runs(tmp_path):
    """bench.py host on 2,000 generated entries: both sample lists, one row each."""
    out = bench("host", "--files", "2000", "--host-steps", "2", "--host-workers", "1",
                "--host-root", str(tmp_path / "many"))
    assert len(rows(out, "python list")) == len(rows(out, "numpy")) == 1
    assert len(list((tmp_path / "many" / "train").iterdir())) == 1000


def test_bench_gpu_plumbing_runs_on_the_cpu(tmp_path):
    """bench_gpu.py is for a GPU machine; here its sync and train_eval parts run on the CPU at
    tiny sizes, so that the one GPU session does not find a broken script."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "bench_gpu.py"), "--out", str(out),
                          # not compile: the same part with --compile, which costs ~30 s of
                          # CPU here and is tested in test_gpu_paths.py
                          "--parts", "sync", "train_eval", "device_aug", "torchrun",
                          "--device", "cpu", "--model", "resnet18", "--size", "32", "--batch",
                          "16", "--images", "4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("bench_gpu.py budget")  # printed before anything runs
    report = json.loads(out.read_text())
    sync = report["parts"]["sync"]
    assert sync["ok"], sync
    # one run per optimizer family of the recipes, and A3 with --device-aug
    assert set(sync["runs"]) == {"lamb", "lamb_device_aug", "rmsproptf", "sgd_agc", "adamp",
                                 "sgd"}
    for name, run in sync["runs"].items():
        assert run["steps"] == 4, (name, run)  # 2 epochs x 32 images / 16, by the step hook
        assert run["syncs_per_step"] == 0 and run["every_step"] == [], (name, run)  # no CUDA
    for name in ("train_eval", "device_aug"):
        r = report["parts"][name]
        assert r["ok"] and r["top1_agrees"], (name, r)
        # like with like: the run evaluated in float32 on the CPU, per-device batch 16
        assert (r["eval_amp_dtype"], r["eval_batch"], r["tolerance_images"]) == ("off", 16, 0)
        assert r["images"] == 32 and r["differs_by_images"] == 0
    assert report["parts"]["torchrun"] == dict(ok=None, skipped="needs 2 GPUs, found 0")


def test_bench_gpu_decode_parts_run_on_the_cpu(tmp_path):
    """The --decode device parts: bench.py decode's tables, and the end-to-end runs of the three
    input pipelines, each with its train img/s (tiny sizes; the numbers are not checked)."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "bench_gpu.py"), "--out", str(out),
                          "--parts", "decode", "pipelines", "--device", "cpu", "--model",
                          "resnet18", "--size", "32", "--batch", "8", "--decode-images", "8",
                          "--pipeline-images", "32"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert parts["decode"]["ok"], parts["decode"]
    cells = parts["decode"]["tables"]
    assert [r[0] for r in cells if r[0] in ("160", "176", "224")][:3] == ["160", "176", "224"]
    runs = parts["pipelines"]["runs"]
    assert parts["pipelines"]["ok"] and set(runs) == {"pillow", "pillow_device_aug",
                                                       "decode_device"}, parts["pipelines"]
    assert all(len(r["train_img_s"]) == 2 and r["bad_images"] == [0, 0] for r in runs.values())


def test_bench_gpu_core_budget_fits_the_first_call():
    """The first call on a lent GPU (at most 10 minutes a command, 15 in all with the machine's
    start): `--parts core` is killed part by part within its printed budget, under 6 minutes."""
    import bench_gpu
    core = bench_gpu.expand(["core"])
    assert core == ["tests", "sync", "step", "train_eval"]
    rows, total = bench_gpu.budget(core)
    assert [n for n, _ in rows][:2] == ["probe", "data"] and total == sum(s for _, s in rows)
    assert total < bench_gpu.CORE_LIMIT == 360
    assert bench_gpu.budget(bench_gpu.expand(["all"]))[1] > 600  # hence the split
    assert bench_gpu.expand(["train_eval", "core", "optim"]) == [
        "train_eval", "tests", "sync", "step", "optim"]
    res = subprocess.run([sys.executable, str(ROOT / "bench_gpu.py"), "--parts", "core",
                          "--budget-only", "--out", "/nonexistent/gpu.json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "bench_gpu.py budget (time limits, s; a process past its limit is killed and recorded "
        "as failed): " + " + ".join(f"{n} {s}" for n, s in rows)
        + f" = {total} s ({total / 60:.1f} min)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with no GPU")
def test_bench_gpu_on_cuda_without_a_gpu_says_so_in_one_line(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench_gpu.py"), "--parts", "core",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and "sees no GPU; nothing run" in lines[1], res.stdout + res.stderr
    report = json.loads(out.read_text())
    assert report["parts"] == {} and "sees no GPU" in report["error"]


def test_bench_gpu_probe_ignores_warnings_printed_at_import():
    """sh() returns stdout and stderr together: a warning at `import torch` (both streams,
    numbers at the end of a line) must not be read as the GPU count."""
    import bench_gpu
    warn = ("import sys, warnings\n"
            "print('UserWarning: CUDA initialization: driver too old (found version 11040) 3',"
            " file=sys.stderr)\n"
            "print('W1203 note: 7 devices', flush=True)\n"
            "warnings.warn('NVML init failed 5')\n")
    found = bench_gpu.probe(prelude=warn)
    assert found["ok"], found
    assert found["gpus"] == [torch.cuda.get_device_name(i)
                             for i in range(torch.cuda.device_count())]
    assert found["torch"] == torch.__version__
    # and a probe that never prints its marker is a failure with zero GPUs, not a crash
    silent = bench_gpu.probe(prelude="print('GPUs: 4')\nraise SystemExit(0)\n")
    assert silent["ok"] is False and silent["gpus"] == [] and "GPUs: 4" in silent["tail"]


def test_bench_gpu_compares_top1_like_with_like():
    import bench_gpu
    # the run's provenance precision -> eval.py's --amp-dtype (common.amp_name's strings)
    import common
    assert [bench_gpu.eval_amp_dtype(common.amp_name(d))
            for d in (torch.bfloat16, torch.float16, None)] == ["bf16", "fp16", "off"]
    assert bench_gpu.eval_amp_dtype("something new") is None
    assert bench_gpu.tolerance_images("cuda") == bench_gpu.tolerance_images("cuda:0") == 1
    assert bench_gpu.tolerance_images("cpu") == 0
    agrees = bench_gpu.top1_agrees
    assert agrees(12.5, 12.5, 80, 80, 0) == (True, 0)
    assert agrees(12.5, 13.75, 80, 80, 1) == (True, 1)  # one image of 80 = 1.25 points
    assert agrees(12.5, 11.25, 80, 80, 1) == (True, 1)
    assert agrees(12.5, 13.75, 80, 80, 0) == (False, 1)
    assert agrees(12.5, 15.0, 80, 80, 1) == (False, 2)
    assert agrees(33.333, 33.333, 3, 3, 0) == (True, 0)
    assert agrees(33.333, 66.667, 3, 3, 1) == (True, 1)  # rounded to 3 decimals
    assert agrees(12.5, 12.5, 80, 72, 1) == (False, None)  # other images counted
    assert agrees(12.5, None, 80, None, 1) == (False, None)  # eval.py failed


def test_bench_gpu_sync_summary_and_timeouts(tmp_path):
    import bench_gpu
    s = bench_gpu.sync_summary({"common.py:10 x.item()": 40, "common.py:20 eval": 10}, 40)
    assert s["syncs"] == 50 and s["syncs_per_step"] == 1.25
    assert s["every_step"] == ["common.py:10 x.item()"]
    assert bench_gpu.sync_summary({}, 0)["syncs_per_step"] == 0
    # a command past its limit is killed with its children, quickly
    pid_file = tmp_path / "child"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "print('started', flush=True)\ntime.sleep(60)\n")
    t0 = time.perf_counter()
    (rc, text, _), (rc2, text2, _) = bench_gpu.sh_many(
        [[sys.executable, "-c", code], [sys.executable, "-c", "print('quick')"]], 3)
    assert time.perf_counter() - t0 < 20
    assert rc == 124 and "started" in text and "timed out (3 s)" in text
    assert rc2 == 0 and text2 == "quick\n"
    child = Path(f"/proc/{pid_file.read_text()}/stat")
    for _ in range(50):
        if not child.exists() or child.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the timed-out command's child is still running")
