"""Runs that survive (issue 11): stopped by a real signal mid-epoch and at an epoch's end, then
resumed, a run equals the uninterrupted one (rows and bit-identical weights) for A3, B and tv;
SIGKILL at random moments, inside slow checkpoint writes too, loses no checkpoint; a truncated
newest checkpoint falls back to the previous one; a full disk is one line; a checkpoint holding
pickled objects is refused."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from bench_gpu import runner
from conftest import ROOT

# 48 train images in batches of 8: 6 steps an epoch; 2 loader workers
SMALL = ["--model", "resnet18", "--train-size", "32", "--eval-size", "32", "--eval-resize", "36",
         "--batch-size", "8", "--warmup-epochs", "1", "--epochs", "3", "--workers", "2",
         "--quiet", "--device", "cpu"]
RECIPES = {  # what each recipe brings: a3 RandAugment + Mixup/CutMix; b LR noise, EMA,
    # erasing x3; tv repeated augmentation, TrivialAugment, EMA with warmup copies
    "a3": ("train_a3.py", []),
    "b": ("train_b.py", ["--ema-decay", "0.9"]),
    "tv": ("train_tv.py", ["--ema-every", "2", "--ema-decay", "0.99"]),
    # the JPEGs decoded in the main process: the workers' draws alone must carry the state
    "a3-decode-device": ("train_a3.py", ["--decode", "device"]),
}
# measurements of the machine, not of the run: they differ between any two runs
TIMING = ("train_img_s", "epoch_s", "data_wait", "peak_rss_gb", "peak_mem_gb")

# sends a signal to this process's whole group (the loader workers too, as Ctrl-C and SLURM
# do) at the n-th call of a common function
SIGNAL_AT = """
import signal
def signal_at(name, n, signum=signal.SIGTERM):
    fn, calls = getattr(common, name), [0]
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.killpg(os.getpgid(0), signum)
        return fn(*a, **k)
    setattr(common, name, wrapped)
"""


def start(script, data, out, *extra, patch="", wait=True):
    """A training subprocess in its own session (signals to its group stay inside it)."""
    cmd = [sys.executable, runner(script, patch, out), "--data", str(data), "--output",
           str(out), *SMALL, *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ema = ckpt["ema"]["module"] if ckpt.get("ema") else {}
    return {**ckpt["model"], **{f"ema.{k}": v for k, v in ema.items()}}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("name", list(RECIPES))
def test_stopped_by_signals_and_resumed_equals_straight_run(name, tiny_data, tmp_path):
    script, extra = RECIPES[name]
    straight = tmp_path / "straight"
    res = start(script, tiny_data, straight, *extra)
    assert res.returncode == 0, res.stderr

    out = tmp_path / "stopped"
    # SIGTERM at the 9th step (epoch 2, step 3 of 6): the step ends, a mid-epoch checkpoint
    res = start(script, tiny_data, out, *extra, patch=SIGNAL_AT + "signal_at('augment_batch', 9)")
    assert res.returncode == common.EXIT_STOPPED, res.stderr
    assert "stopped by a signal at epoch 2, step 3 of 6" in res.stderr
    assert "--resume auto" in res.stderr
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["next"] == (1, 3) and ckpt["epoch"] == 0
    assert len(rows(out)) == 1

    # resumed; Ctrl-C (SIGINT) during epoch 2's evaluation: stop at the epoch's end
    res = start(script, tiny_data, out, *extra, "--resume", "auto",
                patch=SIGNAL_AT + "signal_at('evaluate', 1, signal.SIGINT)")
    assert res.returncode == common.EXIT_STOPPED, res.stderr
    assert "resumed from" in res.stdout and "epoch 2, step 4 of 6" in res.stdout
    assert "stopped by a signal at the end of epoch 2" in res.stderr
    assert torch.load(out / "last.pth", weights_only=True)["next"] == (2, 0)

    res = start(script, tiny_data, out, *extra, "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert rows(out) == rows(straight)
    assert_same_weights(out / "last.pth", straight / "last.pth")


SLOW_SAVE = """
import io, time
real_save = torch.save
def slow_save(obj, f, *a, **k):  # the real bytes, written in 16 pieces 20 ms apart
    buffer = io.BytesIO()
    real_save(obj, buffer, *a, **k)
    data = buffer.getvalue()
    step = len(data) // 16 + 1
    for i in range(0, len(data), step):
        f.write(data[i:i + step])
        f.flush()
        time.sleep(0.02)
torch.save = slow_save
"""


def progress(out):
    """(epoch, step) of the newest checkpoint in `out` that loads; None if none does."""
    best = None
    for name in ("last.pth", "prev.pth"):
        try:
            ckpt = torch.load(out / name, map_location="cpu", weights_only=True)
        except Exception:
            continue
        best = max(best or (0, 0), tuple(ckpt["next"]))
    return best


def test_sigkill_at_random_moments_never_loses_a_checkpoint(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    assert start("train_a3.py", tiny_data, straight).returncode == 0
    out, rng, seen, kills = tmp_path / "killed", random.Random(0), None, 0
    # a checkpoint after every step (0.0001 minutes), each write ~0.3 s: kills land in writes
    extra = ["--save-every-minutes", "0.0001", "--resume", "auto"]
    while kills < 5:
        proc = start("train_a3.py", tiny_data, out, *extra, patch=SLOW_SAVE, wait=False)
        time.sleep(rng.uniform(3.5, 7.0))
        if proc.poll() is not None:  # ended before the kill: it must have finished
            assert proc.returncode == 0, proc.communicate()[1]
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        kills += 1
        now = progress(out)
        if seen is not None:
            assert now is not None and now >= seen, f"kill {kills}: {now} after {seen}"
        seen = now or seen
    res = start("train_a3.py", tiny_data, out, *extra)
    assert res.returncode == 0, res.stderr
    assert kills >= 3
    assert rows(out) == rows(straight)
    assert_same_weights(out / "last.pth", straight / "last.pth")


class Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        time.sleep(0.01)
        return os.getpid()


def test_loader_workers_ignore_stop_signals():
    """Ctrl-C and SLURM signal the whole process group: the workers must live on until the
    main process has finished its step and saved."""
    loader = torch.utils.data.DataLoader(Pids(), batch_size=1, num_workers=1,
                                         worker_init_fn=common.worker_init, prefetch_factor=2)
    batches = iter(loader)
    pid = int(next(batches))
    for name in common.STOP_SIGNALS:
        os.kill(pid, getattr(signal, name))
    time.sleep(0.3)
    assert len(list(batches)) == 39


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert start("train_a3.py", tiny_data, out, "--epochs", "2").returncode == 0
    size = (out / "last.pth").stat().st_size
    with open(out / "last.pth", "r+b") as f:
        f.truncate(size // 2)
    res = start("train_a3.py", tiny_data, out, "--epochs", "2", "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert "warning: skipping cannot read checkpoint" in res.stdout
    assert f"resumed from {out / 'prev.pth'} at epoch 2" in res.stdout
    assert [r["epoch"] for r in rows(out)] == [1, 2]  # epoch 2 again, logged once


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    patch = """
import errno
real_save, calls = torch.save, [0]
def full(*a, **k):
    calls[0] += 1
    if calls[0] == 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(*a, **k)
torch.save = full
"""
    res = start("train_a3.py", tiny_data, out, "--epochs", "2", patch=patch)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: cannot write checkpoint {out / 'last.pth'}: No space left on "
                     f"device; {out / 'last.pth'} still holds the previous checkpoint"]
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 0
    assert not (out / "last.pth.tmp").exists()


class Payload:
    def __reduce__(self):
        return (open, (str(ROOT / "PWNED"), "w"))


def test_checkpoint_with_pickled_objects_is_refused(tiny_data, tmp_path):
    bad = tmp_path / "bad.pth"
    model = common.create_model("resnet18", 4, 0.0, 0.0, True)
    torch.save(dict(model=model.state_dict(), extra=Payload()), bad)
    marker = ROOT / "PWNED"
    ev = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(bad),
                         "--data", str(tiny_data), "--workers", "0"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ev.returncode == 2 and not marker.exists()
    assert ev.stderr.strip() == (f"error: refusing checkpoint {bad}: it holds pickled Python "
                                 "objects, not only tensors, and loading it could run code")
    res = start("train_a3.py", tiny_data, tmp_path / "run", "--resume", str(bad))
    assert res.returncode == 2 and not marker.exists()
    assert "refusing checkpoint" in res.stderr


def test_two_ranks_agree_to_stop_when_one_is_signalled(tiny_data, tmp_path):
    """gloo, 2 ranks under torchrun. First SIGTERM reaches rank 1 alone: both stop after the
    same step (no hang), rank 0 saves both ranks' running sums. Resumed, then SIGTERM to
    torchrun itself, which forwards it to its ranks. Resumed again, the run equals the
    straight one."""
    from test_gpu_paths import TORCHRUN, run
    extra = ["--epochs", "4", "--log-interval", "1"]
    straight, out = tmp_path / "straight", tmp_path / "stopped"
    res = run("train_a3.py", tiny_data, straight, *extra, nproc=2, port=29561)
    assert res.returncode == 0, res.stderr
    patch = ("import signal\nfn, calls = common.augment_batch, [0]\n"
             "def wrapped(*a, **k):\n    calls[0] += 1\n"
             "    if calls[0] == 5 and RANK == 1:\n        os.kill(os.getpid(), signal.SIGTERM)\n"
             "    return fn(*a, **k)\ncommon.augment_batch = wrapped\n")
    res = run("train_a3.py", tiny_data, out, *extra, patch=patch, nproc=2, port=29562,
              timeout=300)
    assert res.returncode != 0
    assert "stopped by a signal at epoch 2, step 2 of 3" in res.stderr, res.stderr
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["next"] == (1, 2) and ckpt["partial"].shape == (2, 4)

    from test_train import SMALL as TRAIN_SMALL
    proc = subprocess.Popen([*TORCHRUN, "--master_port", "29563", str(ROOT / "train_a3.py"),
                             "--data", str(tiny_data), "--output", str(out), *TRAIN_SMALL,
                             *extra, "--resume", "auto"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while len((out / "metrics.jsonl").read_text().splitlines()) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to torchrun only
    _, stderr = proc.communicate(timeout=120)
    assert "stopped by a signal" in stderr, stderr
    assert tuple(torch.load(out / "last.pth", weights_only=True)["next"]) < (4, 0)

    res = run("train_a3.py", tiny_data, out, *extra, "--resume", "auto", nproc=2, port=29564)
    assert res.returncode == 0, res.stderr
    assert rows(out) == rows(straight)
    assert_same_weights(out / "last.pth", straight / "last.pth")


@pytest.mark.parametrize("kind", ["train", "repeated"])
def test_sampler_resumes_at_a_batch_without_the_batches_before(kind):
    """set_epoch(e, skip=k): exactly the keys (index, batch seed) the full epoch yields after
    its first k batches, and a length that says so (the loader never asks for the others)."""
    def make():
        if kind == "train":
            return common.TrainSampler(100, 8, accum=2, world=2, rank=1, seed=5, batch_seed=9)
        return common.RepeatedAugSampler(100, 3, world=2, rank=1, seed=5, batch=8,
                                         batch_seed=9)
    full, part = make(), make()
    full.set_epoch(3)
    part.set_epoch(3, skip=2)
    keys = list(full)
    assert list(part) == keys[16:] and len(part) == len(full) - 16 == len(keys) - 16
