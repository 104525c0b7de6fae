"""Engine end to end: train_a3.py on tiny generated data, eval.py on its checkpoint, resume,
refusal to overwrite, NaN handling, torchrun with 2 CPU processes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT

SMALL = ["--model", "resnet18", "--train-size", "32", "--eval-size", "32", "--crop-pct", "1.0",
         "--batch-size", "16", "--warmup-epochs", "1", "--lr", "8e-3", "--workers", "0",
         "--quiet", "--device", "cpu"]


def train(data, out, *extra, runner=(sys.executable,)):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*runner, str(ROOT / "train_a3.py"), "--data", str(data), "--output",
                           str(out), *SMALL, *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def eval_cli(checkpoint, data, *extra):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(checkpoint),
                           "--data", str(data), "--workers", "0", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_then_eval_then_resume(tiny_data, tmp_path):
    out = tmp_path / "run"
    res = train(tiny_data, out, "--epochs", "2")
    assert res.returncode == 0, res.stderr
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    assert all(r["val_images"] == 16 for r in rows(out))
    assert (out / "last.pth").exists() and (out / "best.pth").exists()
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == "resnet18" and recipe["lr"] == 8e-3

    best = max(rows(out), key=lambda r: r["top1"])
    ev = eval_cli(out / "best.pth", tiny_data)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["images"] == 16 and result["eval_size"] == 32
    assert result["top1"] == pytest.approx(best["top1"]) and result["loss"] == pytest.approx(
        best["val_loss"], abs=1e-4)

    # the same output again without --resume must not overwrite the checkpoint
    again = train(tiny_data, out, "--epochs", "2")
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr

    # --fast-decode goes through train() (its pixels are tested in test_speed_paths.py)
    res = train(tiny_data, out, "--epochs", "3", "--resume", "auto", "--fast-decode")
    assert res.returncode == 0, res.stderr
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3]
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 2


def test_nan_loss_stops_with_one_line_and_keeps_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_data, out, "--epochs", "1").returncode == 0
    before = (out / "last.pth").read_bytes()
    res = train(tiny_data, out, "--epochs", "2", "--resume", "auto", "--lr", "1e30",
                "--warmup-epochs", "0")
    assert res.returncode == 2
    assert "training loss became nan" in res.stderr.lower() and "last.pth" in res.stderr
    assert (out / "last.pth").read_bytes() == before


def test_eval_rejects_checkpoint_of_another_model(tiny_data, tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(common.create_model("resnet50", num_classes=4).state_dict(), path)
    res = eval_cli(path, tiny_data, "--model", "resnet18")
    assert res.returncode == 2 and "does not fit the model" in res.stderr
    assert res.stderr.strip().count("\n") == 0


def test_eval_loads_a_plain_torchvision_state_dict(tiny_data, tmp_path):
    import torchvision
    path = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)
    res = eval_cli(path, tiny_data / "val", "--eval-size", "32")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["model"] == "resnet18" and result["images"] == 16


def test_torchrun_two_processes_gloo(tiny_data, tmp_path):
    """2 CPU processes; a global batch of 15 does not split over 2: run at 14, lr scaled."""
    out = tmp_path / "ddp"
    res = train(tiny_data, out, "--epochs", "1", "--batch-size", "15",
                runner=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "linear scaling" in res.stdout
    row = rows(out)[0]
    assert row["val_images"] == 16  # every val image counted once across the two ranks
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["batch_size"] == 14 and recipe["lr"] == pytest.approx(8e-3 * 14 / 15)


def test_gradient_accumulation_run(tiny_data, tmp_path):
    """--device-batch 8 of a global 16: two accumulation steps per update, the recipe's lr."""
    out = tmp_path / "accum"
    res = train(tiny_data, out, "--epochs", "1", "--device-batch", "8")
    assert res.returncode == 0, res.stderr
    assert "8 images per device x 2 accumulation step(s) = global batch 16" in res.stdout
    assert json.loads((out / "recipe.json").read_text())["lr"] == 8e-3


def _bn_worker(rank, world, port, results):
    import torch.distributed as dist
    from timm.utils import distribute_bn
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(rank)
    ours = common.create_model("resnet18", num_classes=3)
    ours.train()(torch.randn(4, 3, 32, 32))  # rank-specific running stats
    ref = common.create_model("resnet18", num_classes=3)
    ref.load_state_dict(ours.state_dict())
    common.average_bn_stats(ours, world)
    distribute_bn(ref, world, reduce=True)
    results[rank] = {k: v.clone() for k, v in ours.state_dict().items()}, ref.state_dict()
    dist.destroy_process_group()


def test_average_bn_stats_equals_timm_distribute_bn():
    """2 gloo processes with different BN stats: ours == timm.utils.distribute_bn(reduce=True),
    exactly, and both ranks end with the same stats."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_bn_worker, args=(2, 29533, results), nprocs=2)
    (ours0, ref0), (ours1, _) = results[0], results[1]
    for k in ours0:
        assert torch.equal(ours0[k], ref0[k]), k
        if k.endswith(("running_mean", "running_var")):
            assert torch.equal(ours0[k], ours1[k]), k
    assert not torch.equal(ours0["bn1.running_mean"], torch.zeros(64))
