"""Every recipe script trains one epoch on tiny generated data on the CPU, with all of its
ingredients on (sampler, erasing, mixing, clipping, EMA, schedule) and only the sizes shrunk."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SHRINK = ["--train-size", "32", "--eval-size", "32", "--crop-pct", "1.0", "--eval-resize",
          "null", "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--workers",
          "0", "--quiet", "--device", "cpu"]
RUNS = [("train_a1.py", "resnet18"), ("train_a2.py", "resnet18"), ("train_a3.py", "resnet18"),
        ("train_b.py", "resnet18"), ("train_c.py", "resnet18", "--variant", "c1"),
        ("train_c.py", "resnet18"), ("train_d.py", "resnet18"), ("train_tv.py", "resnet18"),
        ("train_rs.py", "resnetrs50")]


def run_script(script, data, out, *extra, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(script), "--data", str(data), "--output",
                           str(out), *SHRINK, *extra], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.parametrize("run", RUNS, ids=lambda r: " ".join(r[:1] + r[2:]))
def test_recipe_trains_two_epochs_and_evaluates(run, tiny_data, tmp_path):
    script, model, *extra = run
    out = tmp_path / "run"
    res = run_script(ROOT / script, tiny_data, out, "--model", model, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["batch_size"] == 16 and recipe["model"] == model
    for r in rows:
        assert r["train_loss"] == r["train_loss"] and r["train_loss"] < 1e3  # finite
        assert ("ema_top1" in r) == bool(recipe["ema_decay"])
    if recipe["ema_decay"]:
        # best.pth is judged by the EMA weights, and eval.py evaluates those by default
        best = max(rows, key=lambda r: r["ema_top1"])
        ev = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint",
                             str(out / "best.pth"), "--data", str(tiny_data), "--workers", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert ev.returncode == 0, ev.stderr
        result = json.loads(ev.stdout)
        assert result["weights"] == "ema" and result["top1"] == pytest.approx(best["ema_top1"])
    if script == "train_b.py":  # resume carries the EMA on
        res = run_script(ROOT / script, tiny_data, out, "--model", model, "--epochs", "3",
                         "--resume", "auto", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_copied_script_changed_in_one_line_runs(tiny_data, tmp_path):
    """A researcher's way to make a new recipe: copy a script, edit one line. Nothing else in
    the repo may need to change (the script only imports common)."""
    text = (ROOT / "train_b.py").read_text()
    assert text.count("    lr=0.18,") == 1
    mine = tmp_path / "train_mine.py"
    mine.write_text(text.replace("    lr=0.18,", "    lr=0.09,").replace(
        'recipe="b"', 'recipe="mine"'))
    printed = subprocess.run([sys.executable, str(mine), "--print-recipe"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert printed.returncode == 0, printed.stderr
    recipe = json.loads(printed.stdout)
    assert recipe["lr"] == 0.09 and recipe["recipe"] == "mine" and recipe["opt"] == "rmsproptf"
    res = run_script(mine, tiny_data, tmp_path / "run", "--model", "resnet18", "--epochs", "1",
                     cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "last.pth").exists()
