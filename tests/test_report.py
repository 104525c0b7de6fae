"""Results as the papers report them (issue 13): eval.py sweeps of test sizes, batch sizes and
world sizes, ReaL and ImageNet-V2 scoring against hand-made cases, report.py's seed table and
curves, and a run's summary, provenance and TensorBoard scalars."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT
from test_gpu_paths import TORCHRUN
from test_train import SMALL, train


def eval_cli(*args, torchrun=False):
    cmd = [*TORCHRUN, "--master_port", "29571"] if torchrun else [sys.executable]
    return subprocess.run([*cmd, str(ROOT / "eval.py"), "--workers", "0", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def lines(res):
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


@pytest.fixture(scope="module")
def random_resnet(tmp_path_factory):
    """A plain state dict of a randomly initialised 4-class ResNet-18 (BN statistics made
    non-trivial, so that eval mode matters)."""
    torch.manual_seed(0)
    model = common.create_model("resnet18", 4, zero_init_last=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path


def test_eval_same_at_batch_sizes_world_sizes_and_in_a_size_sweep(random_resnet, tiny_data):
    base = ["--checkpoint", random_resnet, "--data", tiny_data, "--model", "resnet18"]
    single = {size: lines(eval_cli(*base, "--eval-size", size))[0] for size in (24, 32, 40)}
    sweep = lines(eval_cli(*base, "--eval-size", 24, 32, 40))
    assert [r["eval_size"] for r in sweep] == [24, 32, 40]
    for r in sweep:
        assert r == single[r["eval_size"]]
    # two checkpoints share each pass over the data: one row per (checkpoint, size)
    other = random_resnet.with_name("copy.pth")
    shutil.copy(random_resnet, other)
    both = lines(eval_cli("--checkpoint", random_resnet, other, *base[2:], "--eval-size", 24,
                          32))
    assert [(r["checkpoint"], r["eval_size"]) for r in both] == [
        (str(random_resnet), 24), (str(other), 24), (str(random_resnet), 32), (str(other), 32)]
    assert [{**r, "checkpoint": None} for r in both[:2]] == [{**single[24], "checkpoint": None}] * 2
    for batch in (1, 7, 64):
        r, = lines(eval_cli(*base, "--eval-size", 32, "--batch-size", batch))
        assert r["top1"] == single[32]["top1"] and r["top5"] == single[32]["top5"]
        assert r["loss"] == pytest.approx(single[32]["loss"], abs=1e-4)
        assert r["images"] == 16
    two, = lines(eval_cli(*base, "--eval-size", 32, "--batch-size", 3, torchrun=True))
    assert two["images"] == 16 and two["top1"] == single[32]["top1"]
    assert two["loss"] == pytest.approx(single[32]["loss"], abs=1e-4)


def constant_model(tmp_path, classes, answer):
    """A ResNet-18 state dict whose top-1 is `answer` for every image."""
    model = common.create_model("resnet18", classes, zero_init_last=False)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[answer] = 10.0
    path = tmp_path / f"constant{answer}.pth"
    torch.save(model.state_dict(), path)
    return path


def test_real_labels_scored_by_file_name_order(tmp_path, tiny_data):
    # 16 val images renamed val_00..val_15 in an order that is not the class-folder order
    val = tmp_path / "val"
    sources = sorted((tiny_data / "val").rglob("*.jpg"))
    names = [(7 * i + 3) % 16 for i in range(16)]  # a permutation of 0..15
    for src, k in zip(sources, names):
        (val / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, val / src.parent.name / f"val_{k:02d}.jpg")
    # ReaL sets for val_00..val_15: the model always answers 2
    real = [[2], [0, 2], [1], [], [0, 1, 3], [], [2, 3], [3], [2], [], [1, 2], [0], [0], [2],
            [], [1]]
    (tmp_path / "real.json").write_text(json.dumps(real))
    counted = [s for s in real if s]  # 12 with labels, 6 of them hold 2
    r, = lines(eval_cli("--checkpoint", constant_model(tmp_path, 4, 2), "--data", tmp_path,
                        "--model", "resnet18", "--eval-size", 32,
                        "--real-labels", tmp_path / "real.json"))
    assert r["real_images"] == len(counted) == 12
    assert r["real_top1"] == pytest.approx(100 * 6 / 12, abs=1e-3)
    assert r["top1"] == pytest.approx(100 * 4 / 16, abs=1e-3)  # the 4 images of class folder 2
    (tmp_path / "short.json").write_text(json.dumps(real[:-1]))
    res = eval_cli("--checkpoint", constant_model(tmp_path, 4, 2), "--data", tmp_path,
                   "--model", "resnet18", "--real-labels", tmp_path / "short.json")
    assert res.returncode == 2 and "15 label sets" in res.stderr


def test_v2_numbered_folders_map_to_their_class_index(tmp_path, tiny_data):
    # folders 0..11 (sorted as strings, "10" would come third); 3 images in "10", 1 elsewhere
    image = sorted((tiny_data / "val").rglob("*.jpg"))[0]
    data = tmp_path / "v2"
    for k in range(12):
        for i in range(3 if k == 10 else 1):
            (data / str(k)).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, data / str(k) / f"{i}.jpg")
    r, = lines(eval_cli("--checkpoint", constant_model(tmp_path, 12, 10), "--data", data,
                        "--model", "resnet18", "--eval-size", 32))
    assert r["images"] == 14 and r["top1"] == pytest.approx(100 * 3 / 14, abs=1e-3)
    (data / "12").mkdir()
    shutil.copy(image, data / "12" / "0.jpg")
    res = eval_cli("--checkpoint", constant_model(tmp_path, 12, 10), "--data", data,
                   "--model", "resnet18")
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: {data} has class folder 12, the model only 12 "
                                  "classes (0..11)")
    (data / "12").rename(data / "cat")
    res = eval_cli("--checkpoint", constant_model(tmp_path, 12, 10), "--data", data,
                   "--model", "resnet18")
    assert res.returncode == 2 and "mixes numbered and named" in res.stderr


def fake_run(folder, recipe, finals, ema=None, epochs=3):
    folder.mkdir(parents=True)
    (folder / "recipe.json").write_text(json.dumps(dict(recipe=recipe, model="resnet50",
                                                        epochs=epochs, paper_top1=78.1)))
    rows = []
    for e in range(epochs):
        row = dict(epoch=e + 1, lr=0.1 / (e + 1), train_loss=2.0 - e / 3,
                   top1=finals - 2 * (epochs - 1 - e) + (3 if e == 1 else 0))
        if ema is not None:
            row["ema_top1"] = ema - (epochs - 1 - e)
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_table_mean_std_min_max(tmp_path, capsys):
    # final top-1 70, 72, 77 -> mean 73, std sqrt(((-3)^2 + (-1)^2 + 4^2) / 2) = sqrt(13);
    # best (epoch 2 is final - 2 + 3) 71, 73, 78 -> mean 74
    for i, final in enumerate((70, 72, 77)):
        fake_run(tmp_path / f"a3-seed{i}", "a3", final)
    fake_run(tmp_path / "b-seed0", "b", 60, ema=65)
    fake_run(tmp_path / "a3-short", "a3", 50, epochs=2)
    (tmp_path / "a3-short" / "recipe.json").write_text(json.dumps(dict(
        recipe="a3", model="resnet50", epochs=3)))  # stopped after 2 of 3 epochs
    load_report().main([str(tmp_path)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| a3") or
            line.startswith("| b")]
    assert rows[0] == (f"| a3 | resnet50 | 3 | model | 3 | 73.00 +- {13 ** 0.5:.2f} | 70.00 | "
                       f"77.00 | 74.00 +- {13 ** 0.5:.2f} | 71.00 | 78.00 | 78.1 |")
    assert rows[1].startswith("| b | resnet50 | 3 | model | 1 | 60.00 +- 0.00 |")
    assert rows[2].startswith("| b | resnet50 | 3 | EMA | 1 | 65.00 +- 0.00 |")
    assert f"not counted, 2 of 3 epochs: {tmp_path / 'a3-short'}" in out


def test_report_plot_is_a_picture(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (requirements-extra.txt)")
    from PIL import Image
    import numpy as np
    for i, final in enumerate((70, 72)):
        fake_run(tmp_path / f"a3-seed{i}", "a3", final, ema=final + 1)
    load_report().main([str(tmp_path), "--plot", str(tmp_path / "curves.png")])
    with Image.open(tmp_path / "curves.png") as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.std() > 10
    # coloured lines, not only black axes on white
    assert (np.abs(pixels.astype(int) - pixels.mean(axis=2, keepdims=True)).max(axis=2)
            > 40).sum() > 500


def test_summary_provenance_and_tensorboard(tiny_data, tmp_path):
    out = tmp_path / "run"
    has_tb = importlib.util.find_spec("tensorboard") is not None
    extra = ["--tensorboard", str(tmp_path / "tb")] if has_tb else []
    res = train(tiny_data, out, "--epochs", "2", *extra)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["data_wait"] <= 1 and r["peak_rss_gb"] > 0.1 and r["bad_images"] == 0
               for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    best = max(rows, key=lambda r: r["top1"])
    assert summary["final_top1"] == rows[-1]["top1"] and summary["best_top1"] == best["top1"]
    assert summary["best_epoch"] == best["epoch"] and summary["epochs"] == 2
    assert summary["paper_top1"] == 78.1 and summary["top1_source"] == "RSB Table 1"
    assert summary["device_hours"] == pytest.approx(summary["hours"], rel=0.01)
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: a3 resnet18, 2 epochs: top-1 ") and "published 78.1" in last

    prov, = json.loads((out / "provenance.json").read_text())
    assert prov["command"][1:3] == [str(ROOT / "train_a3.py"), "--data"]
    assert prov["torch"] == torch.__version__ and prov["world_size"] == 1
    assert prov["device_batch"] == 16 and prov["accum_steps"] == 1
    assert prov["devices"] == [f"cpu ({os.cpu_count()} cores)"]
    assert len(prov["git_commit"] or "x" * 40) == 40 and "pillow" in prov
    # a resumed run appends its own entry
    res = train(tiny_data, out, "--epochs", "3", "--resume", "auto")
    assert res.returncode == 0, res.stderr
    entries = json.loads((out / "provenance.json").read_text())
    assert len(entries) == 2 and entries[1]["start_epoch"] == 3
    assert entries[1]["resumed_from"] == str(out / "last.pth")

    if not has_tb:
        pytest.skip("tensorboard is optional (requirements-extra.txt): scalars not checked")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("top1")] == pytest.approx(
        [r["top1"] for r in rows])
