"""Every recipe script against ../shared/RECIPES.md, value by value, and README's table against
the scripts. The expected values below are transcribed from RECIPES.md and the papers by hand,
not computed from the scripts, so a typo in a script fails here."""
import json
import re
import subprocess
import sys

import pytest

import common
from conftest import ROOT

CANONICAL = ["recipe", "model", "epochs", "warmup_epochs", "batch_size", "train_size",
             "eval_size", "eval_resize", "interpolation", "opt", "lr", "weight_decay",
             "momentum", "nesterov", "opt_eps", "sched", "warmup_lr", "min_lr", "decay_rate",
             "decay_epochs", "lr_noise", "loss", "label_smoothing", "bce_target_thresh",
             "dropout", "drop_path", "repeated_aug", "clip", "auto_augment", "mixup", "cutmix",
             "reprob", "recount", "ema_decay", "amp", "paper_top1"]

RSB_A = dict(model="resnet50", warmup_epochs=5, batch_size=2048, eval_size=224, eval_resize=235,
             interpolation="bicubic", opt="lamb", momentum=None, nesterov=None, opt_eps=1e-6,
             sched="cosine", warmup_lr=1e-4, min_lr=1e-6, decay_rate=None, decay_epochs=None,
             lr_noise=None, loss="bce", bce_target_thresh=0.2, dropout=0.0, clip=None,
             cutmix=1.0, reprob=0.0, ema_decay=None, amp=True)
C = dict(model="resnet50", epochs=800, warmup_epochs=5, batch_size=2048, train_size=224,
         eval_size=224, opt="sgd", lr=0.88, weight_decay=1e-5, momentum=0.9, nesterov=True,
         sched="cosine", decay_rate=None, lr_noise=None, loss="ce", label_smoothing=0.1,
         dropout=0.25, drop_path=0.1, auto_augment="rand-m7-n3-mstd1.0", mixup=0.2, cutmix=1.0,
         reprob=0.4, recount=1, ema_decay=None)
EXPECTED = {
    ("train_a1.py",): dict(RSB_A, recipe="a1", epochs=600, train_size=224, lr=5e-3,
                           weight_decay=0.01, label_smoothing=0.1, drop_path=0.05,
                           repeated_aug=3, auto_augment="rand-m7-mstd0.5-inc1", mixup=0.2,
                           paper_top1=80.4),
    ("train_a2.py",): dict(RSB_A, recipe="a2", epochs=300, train_size=224, lr=5e-3,
                           weight_decay=0.02, label_smoothing=0.0, drop_path=0.05,
                           repeated_aug=3, auto_augment="rand-m7-mstd0.5-inc1", mixup=0.1,
                           paper_top1=79.8),
    ("train_a3.py",): dict(RSB_A, recipe="a3", epochs=100, train_size=160, lr=8e-3,
                           weight_decay=0.02, label_smoothing=0.0, drop_path=0.0,
                           repeated_aug=0, auto_augment="rand-m6-mstd0.5-inc1", mixup=0.1,
                           paper_top1=78.1),
    ("train_b.py",): dict(recipe="b", model="resnet50", epochs=600, warmup_epochs=5,
                          batch_size=2048, train_size=224, eval_size=224, opt="rmsproptf",
                          lr=0.18, weight_decay=7e-6, momentum=0.9, opt_eps=1e-3, sched="step",
                          decay_rate=0.988, decay_epochs=1, lr_noise=[0.45, 1.0], loss="ce",
                          label_smoothing=0.1, dropout=0.2, drop_path=0.1, repeated_aug=0,
                          clip=None, auto_augment="rand-m8-n2-mstd1.0", mixup=0.2, cutmix=0.0,
                          reprob=0.35, recount=3, ema_decay=0.9999, paper_top1=79.4),
    ("train_c.py", "--variant", "c1"): dict(C, recipe="c1", repeated_aug=0,
                                            clip={"mode": "agc", "value": 0.025},
                                            paper_top1=79.8),
    ("train_c.py",): dict(C, recipe="c2", repeated_aug=3, clip={"mode": "agc", "value": 0.05},
                          paper_top1=80.0),
    ("train_d.py",): dict(recipe="d", model="resnet50", epochs=600, warmup_epochs=5,
                          batch_size=384, train_size=224, eval_size=224, opt="adamp", lr=0.0033,
                          weight_decay=0.01, opt_eps=1e-8, opt_betas=[0.9, 0.999],
                          sched="cosine", loss="bce", label_smoothing=0.1, dropout=0.1,
                          drop_path=0.05, repeated_aug=0, clip=None,
                          auto_augment="rand-m7-n3-mstd1.0", mixup=0.2, cutmix=1.0, reprob=0.35,
                          recount=1, ema_decay=None, paper_top1=79.8),
    ("train_tv.py",): dict(recipe="tv", model="resnet50", epochs=600, warmup_epochs=5,
                           batch_size=1024, train_size=176, eval_size=224, eval_resize=232,
                           interpolation="bilinear", opt="sgd", lr=0.5, weight_decay=2e-5,
                           momentum=0.9, nesterov=False, sched="cosine", warmup_lr=None,
                           min_lr=None, warmup_factor=0.01, loss="ce", label_smoothing=0.1,
                           dropout=0.0, drop_path=0.0, repeated_aug=4, clip=None,
                           auto_augment="ta_wide", mixup=0.2, cutmix=1.0, reprob=0.1,
                           ema_decay=0.99998, ema_every=32, paper_top1=80.858),
    ("train_rs.py",): dict(recipe="rs", model="resnetrs50", epochs=350, warmup_epochs=5,
                           batch_size=4096, train_size=160, eval_size=160, eval_resize=182,
                           opt="sgd", lr=0.1 * 4096 / 256, weight_decay=4e-5, momentum=0.9,
                           sched="cosine", min_lr=0.0, loss="ce", label_smoothing=0.1,
                           dropout=0.25, drop_path=0.0, auto_augment="rand-m10-n2",
                           ema_decay=0.9999, paper_top1=78.8),
    # RS Table 8 rows (resolution, RandAugment magnitude, drop path, dropout), Table 7 top-1
    ("train_rs.py", "--model", "resnetrs101"): dict(
        train_size=192, eval_size=192, auto_augment="rand-m15-n2-mmax15", drop_path=0.0,
        dropout=0.25, paper_top1=81.2),
    ("train_rs.py", "--model", "resnetrs200"): dict(
        train_size=256, eval_size=256, drop_path=0.1, dropout=0.25, paper_top1=83.4),
    ("train_rs.py", "--model", "resnetrs420"): dict(
        train_size=320, eval_size=320, eval_resize=365, drop_path=0.1, dropout=0.4,
        paper_top1=84.4),
    # an explicit flag beats the Table 8 row
    ("train_rs.py", "--model", "resnetrs420", "--dropout", "0.3"): dict(dropout=0.3,
                                                                         train_size=320),
}


@pytest.mark.parametrize("argv", list(EXPECTED), ids=" ".join)
def test_print_recipe_matches_recipes_md(argv):
    out = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:], "--print-recipe"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    recipe = json.loads(out.stdout)
    assert set(CANONICAL) <= set(recipe)
    want = EXPECTED[argv]
    assert {k: recipe[k] for k in want} == want


def test_scripts_use_known_keys_and_resolve_to_every_key_in_one_order():
    """A script lists only what its recipe sets; DEFAULTS fills the rest, in one order."""
    recipes = common.script_recipes(ROOT)
    assert len(recipes) == 9
    for script, r in recipes:
        assert list(r) == list(common.DEFAULTS), script
    with pytest.raises(common.UserError, match="unknown recipe key 'mixupp'; did you mean "
                                                "'mixup'"):
        common.full_recipe(dict(recipe="x", model="resnet18", epochs=1, batch_size=8,
                                opt="sgd", lr=0.1, mixupp=0.2))
    with pytest.raises(common.UserError, match="the recipe sets no lr"):
        common.full_recipe(dict(recipe="x", model="resnet18", epochs=1, batch_size=8,
                                opt="sgd"))


def test_start_line_says_what_differs_from_the_script(tiny_data, tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train_a3.py"), "--data", str(tiny_data),
                          "--output", str(tmp_path / "run"), "--model", "resnet18",
                          "--train-size", "32", "--eval-size", "32", "--batch-size", "16",
                          "--lr", "8e-3", "--epochs", "1", "--workers", "0", "--quiet",
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == (
        'recipe a3 (train_a3.py) with model "resnet18" (script: "resnet50"), epochs 1 (script: '
        '100), batch_size 16 (script: 2048), train_size 32 (script: 160), eval_size 32 '
        f'(script: 224), eval_resize 33 (script: 235); every key in {tmp_path / "run"}'
        '/recipe.json')


def test_readme_recipe_table_is_generated_from_the_scripts():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- recipes:begin[^>]*-->\n(.*?)<!-- recipes:end -->", readme, re.S)
    assert m, "README lacks the <!-- recipes:begin --> ... <!-- recipes:end --> block"
    assert m.group(1) == common.recipe_table(ROOT), "run: python -m common recipes"


def test_variant_and_by_model_in_process():
    from train_c import C1, C2
    from train_rs import RECIPE, TABLE8
    _, r = common.parse_args(C2, ["--variant", "c1"], variants=dict(c1=C1, c2=C2))
    assert r["recipe"] == "c1" and r["clip"]["value"] == 0.025
    _, r = common.parse_args(RECIPE, ["--model", "resnetrs152", "--demo"], by_model=TABLE8)
    assert r["train_size"] == 224 and r["eval_resize"] == 256
