"""Correct at scale: what an 8-GPU, multi-node or preempted run would hit, run on the CPU with
2 gloo ranks under torchrun, a patched rank or a patched device count. Each test fails on the
code before its fix (named in its docstring)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from bench_gpu import runner
from conftest import ROOT
from test_gpu_paths import TORCHRUN, bad_loss, run
from test_resume import assert_same_weights, rows
from test_train import SMALL


# ---- which GPU a rank takes -----------------------------------------------------------------

@pytest.mark.parametrize("local_rank, visible, index", [(3, 1, 0), (3, 8, 3), (9, 8, 1)])
def test_rank_takes_a_gpu_it_can_see(monkeypatch, local_rank, visible, index):
    """srun binding one GPU a task (CUDA_VISIBLE_DEVICES of one device) leaves LOCAL_RANK 3 one
    visible GPU, cuda:0; before, setup_device asked for cuda:3 ("invalid device ordinal")."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "1")
    device, _, _ = common.setup_device("cuda")
    assert device == torch.device("cuda", index) and chosen == [device]


def test_two_ranks_on_one_gpu_are_refused(monkeypatch):
    class Props:
        name, uuid = "NVIDIA H200", "GPU-1234"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    monkeypatch.setattr(common, "gather_objects", lambda obj, world: [
        (r, "node1", "cuda:0", "NVIDIA H200", "GPU-1234", "0") for r in range(world)])
    with pytest.raises(common.UserError, match="ranks 0 and 1 share one GPU"):
        common.placement(torch.device("cuda", 0), 0, 2)
    monkeypatch.setattr(common, "gather_objects", lambda obj, world: [
        (r, f"node{r}", "cuda:0", "NVIDIA H200", f"GPU-{r}", "0") for r in range(world)])
    lines, names = common.placement(torch.device("cuda", 0), 0, 2)  # one GPU a node: fine
    assert lines[1] == "rank 1 on node1: cuda:0 (NVIDIA H200, CUDA_VISIBLE_DEVICES=0)"
    assert names == ["NVIDIA H200", "NVIDIA H200"]
    monkeypatch.setattr(common, "gather_objects", lambda obj, world: [  # no UUIDs: no check
        (r, "node0", f"cuda:{r}", "AMD GPU", "00000000-0000-0000-0000-000000000000", "")
        for r in range(world)])
    assert len(common.placement(torch.device("cuda", 0), 0, 2)[0]) == 2


# ---- one checkpoint for every rank --------------------------------------------------------------

# rank 1 sees another --output folder than rank 0 under the same path, as a node with
# node-local disk does: every path it loads under OUT is read from OUT-node1 instead
NODE_LOCAL = """
if RANK == 1:
    real_load = common.load_checkpoint
    common.load_checkpoint = lambda p: real_load(str(p).replace(OUT, OUT + "-node1"))
"""
# every listing of a folder, by rank, in a file per rank
COUNT_LISTINGS = """
real_find = common.find_images
def counted(root):
    with open(f"{OUT}-listed{RANK}", "a") as f:
        f.write(str(root) + "\\n")
    return real_find(root)
common.find_images = counted
"""
EXTRA = ["--epochs", "3", "--log-interval", "1"]


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """A 2-rank run of 3 epochs; its prev.pth is the checkpoint at the end of epoch 2."""
    out = tmp_path_factory.mktemp("scale") / "straight"
    res = run("train_a3.py", tiny_data, out, *EXTRA, nproc=2, port=29581)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def copy_run(straight, out):
    """A run folder stopped at the end of epoch 2 of the straight run."""
    out.mkdir()
    shutil.copy(straight / "prev.pth", out / "last.pth")
    shutil.copy(straight / "metrics.jsonl", out / "metrics.jsonl")


def test_every_rank_resumes_rank0s_checkpoint(tiny_data, tmp_path, straight):
    """Rank 1's --output is another folder (empty): it loads rank 0's choice, and the resumed
    run equals the straight one. Before, rank 1 started from scratch while rank 0 continued
    at epoch 3, and the replicas trained different models until a collective hung. Only rank 0
    lists the data folders (each once) and sends the listing."""
    out = tmp_path / "run"
    copy_run(straight, out)
    other = "\nif RANK == 1:\n    i = sys.argv.index('--output')\n" \
            "    sys.argv[i + 1] = OUT + '-elsewhere'\n"
    res = run("train_a3.py", tiny_data, out, *EXTRA, "--resume", "auto",
              patch=other + COUNT_LISTINGS, nproc=2, port=29582, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "at epoch 3" in res.stdout
    assert rows(out) == rows(straight)
    assert_same_weights(out / "last.pth", straight / "last.pth")
    listed = (tmp_path / "run-listed0").read_text().splitlines()
    assert sorted(listed) == [str(tiny_data / "train"), str(tiny_data / "val")]
    assert not (tmp_path / "run-listed1").exists()


@pytest.mark.parametrize("node1", ["empty", "older"])
def test_a_rank_that_sees_another_checkpoint_stops_every_rank(tiny_data, tmp_path, straight,
                                                             node1):
    """Node-local --output: rank 1 finds no file, or another save, where rank 0 resumes. Every
    rank stops with the same line (unless torchrun stops it first), exit 2. Before, rank 1
    picked its own (or none) and the run went on with replicas at different epochs."""
    out = tmp_path / "run"
    copy_run(straight, out)
    local = tmp_path / "run-node1"
    local.mkdir()
    if node1 == "older":  # another save of the run, as a node's stale copy would be
        ckpt = torch.load(straight / "prev.pth", weights_only=True)
        ckpt.update(elapsed_s=ckpt["elapsed_s"] - 1, next=(1, 0), epoch=0)
        torch.save(ckpt, local / "last.pth")
    res = run("train_a3.py", tiny_data, out, *EXTRA, "--resume", "auto", patch=NODE_LOCAL,
              nproc=2, port=29583 if node1 == "empty" else 29584, timeout=180)
    assert res.returncode != 0
    why = "does not exist" if node1 == "empty" else "another save than rank 0's"
    line = (f"error: rank 1: cannot resume from {out / 'last.pth'}, the checkpoint rank 0 "
            f"continues: ")
    # every rank raises it; torchrun may stop one before it prints (SIGTERM when another exits)
    errors = [x for x in res.stderr.replace("error: ", "\nerror: ").splitlines()
              if x.startswith("error: ")]
    assert errors and all(x.startswith(line) and why in x for x in errors), res.stderr[-3000:]
    assert "every node must see the same --output folder" in errors[0]
    assert "exitcode  : 2" in res.stderr  # the error, not a hang or a crash


# ---- every rank waits for rank 0's save ---------------------------------------------------------

SLOW_RANK0_SAVE = """
import io, time
if RANK == 0:
    real_save = torch.save
    def slow_save(obj, f, *a, **k):  # the real bytes, 2 s late
        time.sleep(2.0)
        real_save(obj, f, *a, **k)
    torch.save = slow_save
if RANK == 1:  # what last.pth holds when rank 1's checkpoint() returns
    import json
    real_checkpoint = common.checkpoint
    def recorded(*a, **k):
        real_checkpoint(*a, **k)
        ckpt = torch.load(OUT + "/last.pth", weights_only=True)
        open(OUT + "-after-save1", "a").write(json.dumps(list(ckpt["next"])) + "\\n")
    common.checkpoint = recorded
    real_aug, calls = common.augment_batch, [0]
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == 5:  # epoch 2, step 2 of 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_aug(*a, **k)
    common.augment_batch = wrapped
"""


def test_ranks_exit_after_rank0s_save(tiny_data, tmp_path):
    """SIGTERM to rank 1 alone, rank 0's save slow: rank 1 leaves each checkpoint() only once
    rank 0's last.pth is written, then exits 75. Before, rank 1 returned at once and exited;
    torchrun then stops the others (SIGTERM, SIGKILL 30 s later), which can cut rank 0's
    write."""
    out = tmp_path / "run"
    res = run("train_a3.py", tiny_data, out, *EXTRA, patch="import signal\n" + SLOW_RANK0_SAVE,
              nproc=2, port=29585, timeout=240)
    assert "stopped by a signal at epoch 2, step 2 of 3" in res.stderr, res.stderr[-3000:]
    saved = [json.loads(x) for x in (tmp_path / "run-after-save1").read_text().splitlines()]
    assert saved == [[1, 0], [1, 2]]  # the end of epoch 1, then the stop's save
    assert tuple(torch.load(out / "last.pth", weights_only=True)["next"]) == (1, 2)
    assert f"exitcode  : {common.EXIT_STOPPED}" in res.stderr, res.stderr[-3000:]


# ---- no save of non-finite weights ---------------------------------------------------------

@pytest.mark.parametrize("how", ["signal", "save_every"])
def test_a_save_inside_an_epoch_checks_the_loss_first(tiny_data, tmp_path, how):
    """A nan loss at epoch 2's step 1, then a stop signal or a --save-every-minutes save at
    that step, between two loss reads: the run ends on the nan (exit 2) and last.pth keeps the
    end of epoch 1. Before, the mid-epoch save wrote the nan weights to last.pth, and prev.pth
    got the good ones."""
    out = tmp_path / "run"
    patch = bad_loss("nan", 4, 0)
    extra = ["--epochs", "2", "--log-interval", "100"]
    if how == "signal":  # SIGTERM to this process as epoch 2's first step begins
        patch += ("import signal\nreal_aug, n = common.augment_batch, [0]\n"
                  "def aug(*a, **k):\n    n[0] += 1\n"
                  "    if n[0] == 4:\n        os.kill(os.getpid(), signal.SIGTERM)\n"
                  "    return real_aug(*a, **k)\ncommon.augment_batch = aug\n")
    else:  # a save due after every step (a step takes longer than 6 ms)
        extra += ["--save-every-minutes", "0.0001"]
    res = run("train_a3.py", tiny_data, out, *extra, patch=patch)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "training loss became nan/inf in epoch 2" in res.stderr
    assert f"{out / 'last.pth'} holds the last good checkpoint (the end of epoch 1)" in res.stderr
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert tuple(ckpt["next"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ---- an unexpected error ends the process, loader workers and all --------------------------------

def test_an_unexpected_error_exits_with_its_traceback_and_leaves_no_workers(tiny_data,
                                                                            tmp_path):
    """A RuntimeError inside a step with 2 persistent loader workers: exit status 1 and the
    traceback, in seconds. Before, main() re-raised it; Python kept the exception, and through
    it the loaders, alive past exit, where multiprocessing waited forever for workers that
    ignore SIGTERM."""
    patch = ("real_aug, n = common.augment_batch, [0]\n"
             "def aug(*a, **k):\n    n[0] += 1\n"
             "    if n[0] == 2:\n        raise RuntimeError('CUDA out of memory (injected)')\n"
             "    return real_aug(*a, **k)\ncommon.augment_batch = aug\n")
    res = run("train_a3.py", tiny_data, tmp_path / "run", "--epochs", "1", "--workers", "2",
              patch=patch, timeout=120)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" in res.stderr and "CUDA out of memory (injected)" in res.stderr


# ---- the EMA recipes decode the val set once an epoch ------------------------------------------

def test_model_and_ema_are_scored_on_one_decode(tiny_data, tmp_path):
    """B (EMA): each val image is decoded once an epoch, for the model and its EMA. Before,
    evaluate ran twice, decoding the val set twice."""
    patch = """
    real_call, calls = common.EvalTransform.__call__, [0]
    def counted(self, img):
        calls[0] += 1
        return real_call(self, img)
    common.EvalTransform.__call__ = counted
    import atexit
    atexit.register(lambda: open(OUT + "-decodes", "w").write(str(calls[0])))
    """
    out = tmp_path / "b"
    res = run("train_b.py", tiny_data, out, "--epochs", "2", "--ema-decay", "0.9", patch=patch)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int((tmp_path / "b-decodes").read_text()) == 2 * 16
    assert all("ema_top1" in r for r in rows(out))


# ---- host memory: the sample list is shared by the workers --------------------------------------

def test_sample_list_is_numpy_and_equals_the_listing(tiny_data):
    """The ImageFolder listing as NumPy arrays (no per-sample Python objects for the forked
    workers to copy), item for item the listing of find_images."""
    listing, classes = common.find_images(tiny_data / "train")
    table, found = common.list_folder(tiny_data / "train")
    assert found == classes and list(table) == listing and len(table) == len(listing)
    assert table.names.dtype == "uint8" and table.targets.dtype == "int64"
    assert table.names.nbytes == sum(len(os.fsencode(os.path.relpath(p, tiny_data / "train")))
                                     for p, _ in listing)  # no padding to the longest path
    ds = common.ImageFolder(tiny_data / "train", common.to_uint8)
    assert isinstance(ds.samples, common.SampleTable)


# ---- signals under torchrun ----------------------------------------------------------------------

def torchrun_handles_signals():
    import torch.distributed.run as launcher
    return "--signals-to-handle" in Path(launcher.__file__).read_text()


@pytest.mark.skipif(not torchrun_handles_signals(), reason="torchrun before torch 2.9 has no "
                    "--signals-to-handle: SIGUSR1 kills it (README: the batch-script trap)")
def test_sigusr1_to_torchrun_with_signals_to_handle_stops_with_a_checkpoint(tiny_data, tmp_path,
                                                                             straight):
    """SLURM's --signal=USR1@N without B: reaches torchrun, which forwards to its ranks only the
    signals of --signals-to-handle (default SIGTERM, SIGINT, SIGHUP, SIGQUIT; torch 2.9 on;
    it overwrites TORCHELASTIC_SIGNALS_TO_HANDLE with its value). With SIGUSR1 added, the
    ranks stop after a step with a checkpoint, and the run resumes to the straight run's
    weights. Without it, SIGUSR1 kills torchrun and its ranks run on, orphaned."""
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "--master_port", "29586", "--signals-to-handle",
           "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", str(ROOT / "train_a3.py"), "--data",
           str(tiny_data), "--output", str(out), *SMALL, *EXTRA]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # to torchrun only
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:  # never leave torchrun and its ranks behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped by a signal" in stderr, stderr[-3000:]
    assert tuple(torch.load(out / "last.pth", weights_only=True)["next"]) < (3, 0)
    res = subprocess.run(cmd + ["--resume", "auto"], cwd=ROOT, capture_output=True, text=True,
                         timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert rows(out) == rows(straight)
    assert_same_weights(out / "last.pth", straight / "last.pth")
