"""What a GPU run takes, run on the CPU: the faults found by reading the CUDA / DDP paths
(issue 12), AMP (bf16, fp16 + grad scaler with an injected overflow), channels_last,
torch.compile alone and under 2-process torchrun with accumulation, and DDP == one process."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import common
from bench_gpu import runner
from conftest import ROOT
from test_train import SMALL, rows

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")


def run(script, data, out, *extra, patch="", nproc=1, port=29541, timeout=600):
    """A train_*.py run in a subprocess; `patch` is Python run in each process first
    (bench_gpu.runner: after `import torch, common`, with RANK and OUT defined), to inject
    faults or record internals."""
    cmd = [sys.executable] if nproc == 1 else [*TORCHRUN[:-1], str(nproc), "--master_port",
                                               str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = runner(script, textwrap.dedent(patch), out)
    return subprocess.run([*cmd, script, "--data", str(data), "--output", str(out), *SMALL,
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


# a loss that is nan / inf at its n-th call on the given rank; grad=False keeps its gradient
# finite (only the value the loop sums is bad)
BAD_LOSS = """
calls = [0]
def bad(fn, value, at, rank, grad=True):
    def wrapped(*a, **k):
        calls[0] += 1
        loss = fn(*a, **k)
        if calls[0] != at or RANK != rank:
            return loss
        if grad:
            return loss * float(value)
        return loss + (loss.detach() * float(value) - loss.detach())
    return wrapped
"""


def bad_loss(value, at, rank, grad=True):
    return BAD_LOSS + (f"common.binary_cross_entropy = bad(common.binary_cross_entropy, "
                       f"{value!r}, {at}, {rank}, {grad})\n")


# ---- fault 1: the EMA starts from the weights every rank trains ---------------------------------

def test_ema_under_ddp_starts_from_the_weights_every_rank_trains(tiny_data, tmp_path):
    """2 gloo processes, B's EMA: every rank's EMA begins equal to the model DDP trains (rank 0's
    broadcast weights). Before the fix, ranks seeded with seed + rank built their EMAs from
    their own random weights before DDP's broadcast."""
    out = tmp_path / "ema"
    patch = """
    class Recording(common.EMA):
        def __init__(self, model, *a, **k):
            super().__init__(model, *a, **k)
            torch.save(dict(ema=self.module.state_dict(), model=model.state_dict()),
                       f"{OUT}-ema{RANK}.pth")
    common.EMA = Recording
    """
    res = run("train_b.py", tiny_data, out, "--epochs", "1", patch=patch, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(f"{out}-ema{r}.pth", weights_only=True) for r in (0, 1))
    for k in r0["ema"]:
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
        assert torch.equal(r0["ema"][k], r0["model"][k]), k
        assert torch.equal(r1["model"][k], r0["model"][k]), k


# ---- fault 2: a non-finite loss stops every rank together ---------------------------------------

def test_nonfinite_loss_on_one_rank_stops_both_without_a_hang(tiny_data, tmp_path):
    """Rank 1 alone sees a NaN loss at its 1st step (gradients finite, so rank 0's losses stay
    finite): both ranks stop at the check after step 2 with the one-line error, well within the
    timeout. Before, rank 1 left the loop alone and rank 0 waited in DDP's next all-reduce."""
    out = tmp_path / "nan1"
    res = run("train_a3.py", tiny_data, out, "--epochs", "2", "--log-interval", "2",
              "--batch-size", "4", patch=bad_loss("nan", 1, 1, grad=False), nproc=2,
              port=29543, timeout=240)
    assert res.returncode != 0
    assert res.stderr.lower().count("training loss became nan") == 2, res.stderr[-3000:]
    assert not (out / "last.pth").exists()


def test_fp16_overflow_is_a_skipped_step_not_a_fatal_nan(tiny_data, tmp_path):
    """--amp-dtype fp16 on the CPU: an injected inf loss is a step GradScaler skips (its scale
    halves); the run goes on and reports it. The same inf in float32 stops the run."""
    out = tmp_path / "fp16"
    patch = bad_loss("inf", 2, 0)
    res = run("train_a3.py", tiny_data, out, "--epochs", "1", "--log-interval", "1",
              "--amp-dtype", "fp16", patch=patch)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "precision fp16 autocast + grad scaler" in res.stdout
    row = rows(out)[0]
    assert row["skipped_steps"] == 1 and row["grad_scale"] <= 2.0 ** 15
    assert torch.load(out / "last.pth", weights_only=True)["scaler"]["scale"] <= 2.0 ** 15

    res = run("train_a3.py", tiny_data, tmp_path / "fp32", "--epochs", "1", "--log-interval",
              "1", patch=patch)
    assert res.returncode == 2 and "training loss became nan/inf in epoch 1" in res.stderr


def test_fp16_unscales_before_clipping_and_agc(tiny_data, tmp_path):
    """C2 (SGD + AGC) and A3 with norm clipping under fp16 on the CPU: the clip sees the true
    gradients, not the scaled ones (scale 65536)."""
    patch = """
    seen = []
    clip = common.clip_gradients
    def recording(model, spec):
        seen.append(max(p.grad.abs().max().item() for p in model.parameters()
                        if p.grad is not None))
        clip(model, spec)
    common.clip_gradients = recording
    import atexit, json
    atexit.register(lambda: open(OUT + "-grads.json", "w").write(json.dumps(seen)))
    """
    for script, extra in (("train_c.py", ()), ("train_a3.py", ("--clip",
                                                              '{"mode": "norm", "value": 1}'))):
        out = tmp_path / script
        res = run(script, tiny_data, out, "--epochs", "1", "--amp-dtype", "fp16", *extra,
                  patch=patch)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "precision fp16 autocast + grad scaler" in res.stdout
        grads = json.loads(Path(f"{out}-grads.json").read_text())
        assert grads and max(grads) < 100, grads


# ---- fault 3: bf16 only where the GPU has bf16 units ---------------------------------------------

@pytest.mark.parametrize("capability,want", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                             ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_dtype_by_compute_capability(monkeypatch, capability, want):
    """V100 (7.0) and T4 (7.5) report bf16 support through emulation: they get fp16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    cuda = torch.device("cuda", 0)
    assert common.amp_dtype_for(cuda, dict(amp=True)) == want
    assert common.amp_dtype_for(cuda, dict(amp=True), "bf16") == torch.bfloat16
    assert common.amp_dtype_for(cuda, dict(amp=False)) is None
    cpu = torch.device("cpu")
    assert common.amp_dtype_for(cpu, dict(amp=True)) is None  # float32 unless asked for
    assert common.amp_dtype_for(cpu, dict(amp=True), "fp16") == torch.float16


# ---- fault 4: the minimum torch ------------------------------------------------------------------

def test_requirements_floor_has_what_the_code_uses():
    """torch.amp.GradScaler(device) needs 2.3; requirements.txt and the start-up check agree."""
    line = next(x for x in (ROOT / "requirements.txt").read_text().splitlines()
                if x.startswith("torch>="))
    floor = tuple(int(v) for v in line.split(">=")[1].split()[0].split(".")[:2])
    assert floor >= (2, 3) and floor == common.MIN_TORCH
    assert torch.amp.GradScaler("cpu").is_enabled()


# ---- fault 5: loader workers -------------------------------------------------------------------

def test_default_workers_are_the_cores_per_local_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert common.default_workers() == 16  # no cap at 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "128")
    assert common.default_workers() == 1


# ---- fault 6: --device cuda:N under torchrun ---------------------------------------------------

def test_device_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(common.UserError, match="every rank on one GPU"):
        common.setup_device("cuda:1")


# ---- every GPU path on the CPU -------------------------------------------------------------------

def test_bf16_and_channels_last_on_the_cpu(tiny_data, tmp_path):
    """The autocast and channels_last paths of a GPU run, asked for explicitly on the CPU; the
    model's convolutions really run in bf16 and channels_last."""
    patch = """
    seen = set()
    conv = torch.nn.Conv2d._conv_forward
    def recording(self, x, w, b):
        y = conv(self, x, w, b)
        seen.add((str(y.dtype), x.is_contiguous(memory_format=torch.channels_last)))
        return y
    torch.nn.Conv2d._conv_forward = recording
    import atexit, json
    atexit.register(lambda: open(OUT + "-seen.json", "w").write(json.dumps(sorted(seen))))
    """
    out = tmp_path / "bf16"
    res = run("train_a3.py", tiny_data, out, "--epochs", "1", "--amp-dtype", "bf16",
              "--channels-last", patch=patch)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "precision bf16 autocast, channels_last on" in res.stdout
    seen = json.loads(Path(f"{out}-seen.json").read_text())
    assert ["torch.bfloat16", True] in seen
    assert all(cl for _, cl in seen)
    assert rows(out)[0]["train_loss"] > 0


def test_ddp_equals_one_process(tiny_data, tmp_path):
    """2 gloo processes x 8 images and 1 process x 8 images x 2 accumulation steps see the same
    images with the same augmentation (TrainSampler, per-batch seeds) and average the same
    gradients: the same losses and weights to float tolerance. Augmentations that draw per rank
    (Mixup/CutMix, erasing, drop path) are off; BN running stats differ by design (averaged
    over ranks vs accumulated in sequence) and are not compared."""
    common_args = ("--epochs", "2", "--mixup", "0", "--cutmix", "0", "--drop-path", "0")
    one = run("train_a3.py", tiny_data, tmp_path / "one", *common_args, "--device-batch", "8")
    two = run("train_a3.py", tiny_data, tmp_path / "two", *common_args, nproc=2, port=29545)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    assert "8 images per device x 2 accumulation" in one.stdout
    assert "2 process(es)" in two.stdout
    r1, r2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    for a, b in zip(r1, r2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=2e-5)
    w1 = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "two" / "last.pth", weights_only=True)["model"]
    params = dict(common.create_model("resnet18", 4).named_parameters())
    assert params
    for k in params:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k


def test_compile_matches_eager_alone_and_under_torchrun_with_accumulation(tiny_data, tmp_path):
    """--compile (inductor on the CPU) gives the eager run's losses, in one process and in 2
    gloo processes with 2 accumulation steps (no_sync through the compiled DDP module)."""
    args = ("--epochs", "1", "--mixup", "0", "--cutmix", "0")
    eager = run("train_a3.py", tiny_data, tmp_path / "eager", *args)
    compiled = run("train_a3.py", tiny_data, tmp_path / "compiled", *args, "--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    a, b = rows(tmp_path / "eager")[0], rows(tmp_path / "compiled")[0]
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-3)

    # the same micro-batches of 4 as 1 eager process x 4 accumulation steps (TrainSampler)
    ref = run("train_a3.py", tiny_data, tmp_path / "ref", *args, "--device-batch", "4")
    ddp = run("train_a3.py", tiny_data, tmp_path / "ddp", *args, "--compile", "--device-batch",
              "4", nproc=2, port=29547)
    assert ref.returncode == 0 and ddp.returncode == 0, ddp.stderr[-3000:]
    assert "4 images per device x 2 accumulation" in ddp.stdout
    c, d = rows(tmp_path / "ref")[0], rows(tmp_path / "ddp")[0]
    assert d["train_loss"] == pytest.approx(c["train_loss"], abs=1e-4)
    assert d["train_loss"] != pytest.approx(a["train_loss"], abs=1e-4)  # BN over 4, not 16
