"""CLI section: the recipe literal, --print-recipe, overrides and one-line errors."""
import json
import subprocess
import sys

import pytest

import common
from conftest import ROOT
from test_recipes import CANONICAL
from train_a3 import RECIPE

# ../shared/RECIPES.md, A3 column
A3 = dict(recipe="a3", model="resnet50", epochs=100, warmup_epochs=5, batch_size=2048,
          train_size=160, eval_size=224, eval_resize=235, interpolation="bicubic", opt="lamb",
          lr=8e-3, weight_decay=0.02, momentum=None, nesterov=None, opt_eps=1e-6,
          sched="cosine", warmup_lr=1e-4, min_lr=1e-6, decay_rate=None, decay_epochs=None,
          lr_noise=None, loss="bce", label_smoothing=0.0, bce_target_thresh=0.2, dropout=0.0,
          drop_path=0.0, repeated_aug=0, clip=None, auto_augment="rand-m6-mstd0.5-inc1",
          mixup=0.1, cutmix=1.0, reprob=0.0, recount=1, ema_decay=None, amp=True,
          paper_top1=78.1)


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "train_a3.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_print_recipe_is_canonical_json_with_a3_values():
    out = run("--print-recipe")
    assert out.returncode == 0, out.stderr
    recipe = json.loads(out.stdout)
    assert set(CANONICAL) <= set(recipe)
    assert {k: recipe[k] for k in A3} == A3


def test_overrides_and_types():
    args, recipe = common.parse_args(RECIPE, ["--lr", "4e-3", "--epochs", "12",
                                              "--auto_augment", "null", "--amp=false",
                                              "--opt-betas", "[0.9, 0.99]", "--data", "x"])
    assert recipe["lr"] == 4e-3 and recipe["epochs"] == 12 and recipe["auto_augment"] is None
    assert recipe["amp"] is False and recipe["opt_betas"] == [0.9, 0.99] and args.data == "x"
    _, recipe = common.parse_args(RECIPE, ["--eval-size", "160"])
    assert recipe["eval_resize"] == 168  # re-derived: floor(160 / 0.95)
    _, recipe = common.parse_args(RECIPE, ["--lr", "1"])
    assert isinstance(recipe["lr"], float)


@pytest.mark.parametrize("argv,needle", [
    (["--epochs", "1.5"], "expected int"),
    (["--lr", "fast"], "expected float"),
    (["--lr"], "needs a value"),
    (["--mixupp", "0.2"], "did you mean --mixup"),
    (["--auto-augment", "rand-m6-x9"], "cannot parse"),
    (["--remode", "rand"], "expected \"pixel\""),
    (["--loss", "bcee"], "--loss 'bcee': expected one of 'ce', 'bce'"),
    (["--ema-style", "v3"], "expected one of 'timm', 'tv', 'tf'"),
])
def test_bad_overrides_raise_user_error(argv, needle, tmp_path):
    with pytest.raises(common.UserError, match=needle):
        common.parse_args(RECIPE, argv)


def test_unknown_key_is_one_line_error_exit_2():
    out = run("--lrr", "3")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unknown recipe key" in out.stderr
    assert "--lr" in out.stderr


def test_missing_data_folder_is_one_line_error(tmp_path):
    out = run("--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: data folder {tmp_path / 'nope'} does not exist"


def test_empty_data_folder_is_one_line_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    out = run("--data", str(tmp_path), "--output", str(tmp_path / "o"), "--device", "cpu")
    assert out.returncode == 2 and "has no class folders" in out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_split_batch():
    assert common.split_batch(2048, 4) == (512, 1, 2048)
    assert common.split_batch(2048, 4, device_batch=128) == (128, 4, 2048)
    assert common.split_batch(2048, 3, device_batch=256) == (227, 3, 2043)  # lr scales by 2043/2048
    assert common.split_batch(2048, 8, accum_steps=2) == (128, 2, 2048)
    with pytest.raises(common.UserError):
        common.split_batch(4, 8)


def test_batch_size_override_scales_lr_unless_lr_given_too():
    """README: --batch-size alone scales the recipe's lr linearly; with --lr both are as given."""
    _, r = common.parse_args(RECIPE, ["--batch-size", "512"])
    assert r["batch_size"] == 512 and r["lr"] == pytest.approx(8e-3 * 512 / 2048)
    _, r = common.parse_args(RECIPE, ["--batch-size", "512", "--lr", "1e-3"])
    assert r["lr"] == 1e-3
    _, r = common.parse_args(RECIPE, ["--demo"], demo=dict(batch_size=32, lr=5e-3))
    assert r["lr"] == 5e-3
