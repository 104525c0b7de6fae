"""The papers' ablation tables as runnable ladders: each table below is written as its rows,
one a line (the label as printed, the recipe keys the row changes, the published number, where
the values come from), and this script resolves, runs and reports them beside the paper.

    python ladders.py list
    python ladders.py show tv-blog                 # each row's resolved changes
    python ladders.py run tv-blog --data /imagenet [--rows 0-4] [--seeds 3] [-- --workers 8]
    python ladders.py run tv-blog --data /imagenet --print-commands [--gpus 8] [--slurm]
    python ladders.py report tv-blog runs/ladders/tv-blog [--plot tv-blog.png]

Additive ladders (the blog, RS Table 1) accumulate: a row's keys change the row before, its
number is compared with the row before. One-factor tables (RSB Tables 6-9, RS Table 2) change
the base script: each row's keys change the script's recipe, its number is compared with the
table's reference row. Evaluation rows (the blog's inference resize, RSB Table 9) train
nothing: they evaluate the last checkpoint of the trained row before them (or the base run).

`run` starts each (row, seed) in its own folder with `--resume auto`: an interrupted ladder
continues where it stopped and a finished run is skipped; a row whose resolved recipe is an
earlier row's shares that row's runs. Anything after `--` goes to every training command
(`-- --model resnet18 --batch-size 64`: --batch-size alone scales each row's lr linearly, as
the scripts do); `--epochs-scale F` multiplies every epoch count of every row (epochs, warmup,
step decay) and `--size-scale F` every image size (train, eval, eval resize), so that a
scaled-down ladder keeps its shape (the blog's 224 -> 176 train crop, 600 against 90 epochs).
`report` says in its header how the runs differ from the paper's settings.

Protocols (how each paper reports a number): RSB the final epoch of seed 0; RS the mean of 2
runs, final epoch; the blog the best of 3 runs at the best epoch. A run's number is its EMA's
where the row keeps an EMA, else the plain model's (`report --weights model`: the model's
throughout, for runs too short for an EMA). `report` gives the paper's statistic and the mean
+- std over the seeds run.
"""
import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import common
import compare

ROOT = Path(__file__).resolve().parent

# label as printed; the keys the row sets; the published number; where the values come from
# ("table" where the paper's table gives them); eval_only: evaluates a trained checkpoint
Row = namedtuple("Row", "label changes published source eval_only", defaults=("table", False))
Ladder = namedtuple("Ladder", "title script base additive column protocol rows reference notes")
PROTOCOLS = {
    "rsb": ("seed 0, final epoch (RSB §4.2)", 1),
    "rsb-seeds": ("mean (std) over 10 seeds, final epoch (RSB Table 9)", 10),
    "rs": ("mean of 2 runs, final epoch (RS)", 2),
    "blog": ("best of 3 runs, best epoch (TorchVision blog)", 3),
}
# keys that name a run rather than change it
IGNORED = {"recipe", "paper_top1", "top1_source"}
# keys derived from others when a row changes them (common.resolve)
DERIVED = {"eval_resize": {"crop_pct"}, "crop_pct": {"eval_resize"},
           "eval_size": {"eval_resize", "crop_pct"}}
EPOCH_KEYS = ("epochs", "warmup_epochs", "decay_epochs")
SIZE_KEYS = ("train_size", "eval_size", "eval_resize")


# ==================================================================================================
# The tables
# ==================================================================================================

# TorchVision blog, "Break down of key accuracy improvements". Row 0 is tv's earlier ResNet-50
# recipe (the blog's baseline command), written as its changes from train_tv.py
TV_BASELINE = dict(
    epochs=90, warmup_epochs=0, batch_size=256,  # 8 GPUs x 32
    lr=0.1, sched="step", decay_rate=0.1, decay_epochs=30, warmup_factor=None,
    warmup_prefix=False,
    weight_decay=1e-4, wd_groups="all",  # no --norm-weight-decay: every parameter decays
    train_size=224, eval_resize=256,
    label_smoothing=0.0, auto_augment=None, mixup=0.0, cutmix=0.0, reprob=0.0,
    repeated_aug=0, ema_decay=None)
TV_BLOG = [
    Row("ResNet50 Baseline", TV_BASELINE, 76.130, "blog: the baseline command"),
    Row("+ LR optimizations", dict(batch_size=1024, lr=0.5, sched="cosine", decay_rate=None,
        decay_epochs=None, warmup_epochs=5, warmup_factor=0.01, warmup_prefix=True), 76.494),
    Row("+ TrivialAugment", dict(auto_augment="ta_wide"), 76.806),
    Row("+ Long Training", dict(epochs=600), 78.606),
    Row("+ Random Erasing", dict(reprob=0.1), 78.796),
    Row("+ Label Smoothing", dict(label_smoothing=0.1), 79.114),
    Row("+ Mixup", dict(mixup=0.2), 79.232),
    Row("+ Cutmix", dict(cutmix=1.0), 79.510),
    Row("+ Weight Decay tuning", dict(weight_decay=2e-5, wd_groups="tv"), 80.036),
    Row("+ FixRes mitigations", dict(train_size=176), 80.196),
    Row("+ EMA", dict(ema_decay=0.99998), 80.450,  # every 32 steps, tv's adjusted decay
        "blog; tv train.py defaults for the steps (32) and decay (0.99998)"),
    Row("+ Inference Resize tuning *", dict(eval_resize=232), 80.674, eval_only=True),
    Row("+ Repeated Augmentation **", dict(repeated_aug=4), 80.858),
]

# ResNet-RS Table 1, additive study on ResNet-200 at 256 px; the values the table does not give
# are Table 8's for ResNet-RS-200 (its last row is Table 7's RS-200 at 256, 83.4)
RS_BASELINE = dict(
    model="resnet200", train_size=256, eval_size=256, epochs=90,
    sched="step", decay_rate=0.1, decay_epochs=30,  # [inferred] the 90-epoch standard
    weight_decay=1e-4,  # RS §5.2: "the default weight decay of 1e-4"
    label_smoothing=0.0, drop_path=0.0, auto_augment=None, dropout=0.0, ema_decay=None)
RS_TABLE1 = [
    Row("ResNet-200", RS_BASELINE, 79.0,
        "table; step milestones [inferred]: x0.1 every 30 epochs; lr, batch, warmup: the "
        "script's (0.1 x B / 256 at 4096, 5 epochs) [inferred]"),
    Row("+ Cosine LR Decay", dict(sched="cosine", decay_rate=None, decay_epochs=None), 79.3),
    Row("+ Increase training epochs", dict(epochs=350), 78.8),
    Row("+ EMA of weights", dict(ema_decay=0.9999), 79.1, "table; decay 0.9999: Table 8"),
    Row("+ Label Smoothing", dict(label_smoothing=0.1), 80.4, "table; 0.1: Table 8"),
    Row("+ Stochastic Depth", dict(drop_path=0.1), 80.6, "[inferred] Table 8, RS-200 at 256"),
    Row("+ RandAugment", dict(auto_augment="rand-m15-n2-mmax15"), 81.0,
        "[inferred] Table 8, RS-200 at 256: 2 layers, magnitude 15"),
    Row("+ Dropout on FC", dict(dropout=0.25), 80.7, "[inferred] Table 8, RS-200"),
    Row("+ Decrease weight decay", dict(weight_decay=4e-5), 82.2, "table; 4e-5: Table 8"),
    Row("+ Squeeze-and-Excitation", dict(model="seresnet200_rs"), 82.9,
        "table; SE ratio 1/4 (RS §4.1), plain stem and shortcuts"),
    Row("+ ResNet-D", dict(model="resnetrs200"), 83.4),
]

# ResNet-RS Table 2 (minival, mean of 2 runs): weight decay x regularisation. The table states
# no setup: the script's (350 epochs, EMA, cosine) with Table 8 / App. E strengths [inferred]
RS_R50 = dict(model="resnet50", train_size=224, eval_size=224, label_smoothing=0.0,
              drop_path=0.0, dropout=0.0, auto_augment=None)
RS_R200 = dict(RS_R50, model="resnet200", train_size=256, eval_size=256)
RA_LS = dict(auto_augment="rand-m15-n2-mmax15", label_smoothing=0.1)  # App. E: 15 at 224-320
RA = "RA 15 [inferred] App. E (224-320 px), LS 0.1 [inferred] Table 8"
RS_TABLE2 = [
    Row("ResNet-50, None, wd 1e-4", dict(RS_R50, weight_decay=1e-4), 79.7),
    Row("ResNet-50, None, wd 4e-5", dict(RS_R50, weight_decay=4e-5), 78.7),
    Row("ResNet-50, RA-LS, wd 1e-4", dict(RS_R50, **RA_LS, weight_decay=1e-4), 82.4, RA),
    Row("ResNet-50, RA-LS, wd 4e-5", dict(RS_R50, **RA_LS, weight_decay=4e-5), 82.3, RA),
    Row("ResNet-50, RA-LS-DO, wd 1e-4", dict(RS_R50, **RA_LS, dropout=0.25, weight_decay=1e-4),
        82.2, RA + "; DO 0.25 [inferred] Table 8"),
    Row("ResNet-50, RA-LS-DO, wd 4e-5", dict(RS_R50, **RA_LS, dropout=0.25, weight_decay=4e-5),
        82.7, RA + "; DO 0.25 [inferred] Table 8"),
    Row("ResNet-200, None, wd 1e-4", dict(RS_R200, weight_decay=1e-4), 82.5),
    Row("ResNet-200, None, wd 4e-5", dict(RS_R200, weight_decay=4e-5), 81.7),
    Row("ResNet-200, RA-LS, wd 1e-4", dict(RS_R200, **RA_LS, weight_decay=1e-4), 85.2, RA),
    Row("ResNet-200, RA-LS, wd 4e-5", dict(RS_R200, **RA_LS, weight_decay=4e-5), 84.9, RA),
    Row("ResNet-200, RA-LS-SD-DO, wd 1e-4", dict(RS_R200, **RA_LS, drop_path=0.1, dropout=0.25,
        weight_decay=1e-4), 85.3, RA + "; SD 0.1, DO 0.25 [inferred] Table 8, RS-200"),
    Row("ResNet-200, RA-LS-SD-DO, wd 4e-5", dict(RS_R200, **RA_LS, drop_path=0.1, dropout=0.25,
        weight_decay=4e-5), 85.5, RA + "; SD 0.1, DO 0.25 [inferred] Table 8, RS-200"),
]

# ResNet strikes back Table 6: A2 with BCE / CE x lr x weight decay x repeated augmentation
CE = dict(loss="ce", bce_target_thresh=None)  # CE: A2's other settings [UNSPEC], kept
NO_RA = dict(repeated_aug=0)
RSB_TABLE6 = [
    Row("BCE, lr 2e-3, wd 0.02, RA", dict(lr=2e-3), 78.24),
    Row("BCE, lr 2e-3, wd 0.03, RA", dict(lr=2e-3, weight_decay=0.03), 78.47),
    Row("BCE, lr 3e-3, wd 0.02, RA", dict(lr=3e-3), 79.16),
    Row("BCE, lr 3e-3, wd 0.03, RA", dict(lr=3e-3, weight_decay=0.03), 79.28),
    Row("BCE, lr 5e-3, wd 0.01, RA", dict(weight_decay=0.01), 79.66),
    Row("BCE, lr 5e-3, wd 0.02, RA (A2)", dict(), 79.85),
    Row("BCE, lr 5e-3, wd 0.03, RA", dict(weight_decay=0.03), 79.73),
    Row("BCE, lr 8e-3, wd 0.02, RA", dict(lr=8e-3), 79.63),
    Row("BCE, lr 3e-3, wd 0.02, no RA", dict(lr=3e-3, **NO_RA), 78.74),
    Row("BCE, lr 5e-3, wd 0.02, no RA", dict(NO_RA), 79.57),
    Row("BCE, lr 5e-3, wd 0.03, no RA", dict(NO_RA, weight_decay=0.03), 79.58),
    Row("CE, lr 2e-3, wd 0.02, RA", dict(CE, lr=2e-3), 77.37),
    Row("CE, lr 3e-3, wd 0.02, RA", dict(CE, lr=3e-3), 78.22),
    Row("CE, lr 5e-3, wd 0.02, RA", dict(CE), 79.18),
    Row("CE, lr 5e-3, wd 0.03, RA", dict(CE, weight_decay=0.03), 79.23),
    Row("CE, lr 5e-3, wd 0.05, RA", dict(CE, weight_decay=0.05), 79.31),
    Row("CE, lr 8e-3, wd 0.03, RA", dict(CE, lr=8e-3, weight_decay=0.03), 79.12),
    Row("CE, lr 3e-3, wd 0.02, no RA", dict(CE, lr=3e-3, **NO_RA), 77.71),
    Row("CE, lr 5e-3, wd 0.01, no RA", dict(CE, weight_decay=0.01, **NO_RA), 78.93),
    Row("CE, lr 5e-3, wd 0.02, no RA", dict(CE, **NO_RA), 79.00),
    Row("CE, lr 5e-3, wd 0.03, no RA", dict(CE, weight_decay=0.03, **NO_RA), 78.62),
    Row("CE, lr 8e-3, wd 0.02, no RA", dict(CE, lr=8e-3, **NO_RA), 78.72),
]


# ResNet strikes back Table 7: stochastic depth and label smoothing, a column a procedure; the
# numbers A1 / A2 / A3
RSB_TABLE7 = [
    ("drop-factor 0", dict(drop_path=0.0), (79.94, 79.79, 78.06)),
    ("drop-factor 0.05", dict(drop_path=0.05), (80.38, 79.85, 77.57)),
    ("drop-factor 0.1", dict(drop_path=0.1), (80.12, 79.62, 77.32)),
    ("smoothing off", dict(label_smoothing=0.0), (80.22, 79.85, 78.06)),
    ("smoothing on", dict(label_smoothing=0.1), (80.38, 79.58, 77.99)),
]


def rsb_table7(procedure):
    column = ("a1", "a2", "a3").index(procedure)
    return [Row(label, changes, numbers[column], "table" if procedure == "a1" or
                "label_smoothing" not in changes or not changes["label_smoothing"]
                else "table; eps 0.1 [inferred] A1's value")
            for label, changes, numbers in RSB_TABLE7]

# ResNet strikes back Table 8: A2's augmentation, one or two changes a row
RSB_TABLE8 = [
    Row("A2 (mixup 0.1, RA, RandA 7, BCE target)", dict(), 79.85,
        "table; the BCE target as timm's threshold 0.2 [UNSPEC in the paper]"),
    Row("mixup 0.2, no RA", dict(mixup=0.2, repeated_aug=0), 79.62),
    Row("mixup 0.2, RandA 6", dict(mixup=0.2, auto_augment="rand-m6-mstd0.5-inc1"), 79.61),
    Row("mixup 0.05", dict(mixup=0.05), 79.57),
    Row("no BCE target", dict(bce_target_thresh=None), 79.57,
        "table; BCE on the soft mixed targets (timm without --bce-target-thresh) [inferred]"),
]


# ResNet strikes back Table 9: the test crop ratio, 10 seeds, on the trained A1 / A2 / A3
def rsb_table9(means):
    return [Row(f"crop ratio {c}", dict(crop_pct=c), mean, "table: mean of "
                "10 seeds", eval_only=True) for c, mean in zip((0.875, 0.9, 0.95, 1.0), means)]


LADDERS = {
    "tv-blog": Ladder(
        "TorchVision blog: break-down of key accuracy improvements, ResNet-50, 76.130 -> 80.858",
        "train_tv.py", [], True, "Acc@1", "blog", TV_BLOG, None,
        ["Rows 1 and 8 bundle several changes, as in the blog.",
         "Row 11 is evaluation only, on the final model of row 10; row 12 was trained later, "
         "with every row before it (eval resize 232 included).",
         "Whether the blog's rows 0-2 ran at 90 epochs is not stated; here they do."]),
    "rs-table1": Ladder(
        "ResNet-RS Table 1: additive study, ResNet-200 at 256 px, 79.0 -> 83.4",
        "train_rs.py", ["--model", "resnetrs200"], True, "Top-1", "rs", RS_TABLE1, None,
        ["Rows 9-10 change the architecture: SE-ResNet-200 with the plain stem "
         "(seresnet200_rs), then ResNet-RS-200.",
         "Rows 5-7 take their strengths from Table 8 (the table gives none)."]),
    "rs-table2": Ladder(
        "ResNet-RS Table 2: decrease weight decay with more regularisation",
        "train_rs.py", [], False, "Top-1 (minival)", "rs", RS_TABLE2, None,
        ["Published on minival (2% of train held out), not val: not comparable with runs "
         "evaluated on val, nor with Table 1.",
         "The table's setup (epochs, EMA, strengths) is not stated: the script's, with Table 8 "
         "and App. E values [inferred]."]),
    "rsb-table6": Ladder(
        "ResNet strikes back Table 6: A2, BCE / CE x lr x weight decay x repeated augmentation",
        "train_a2.py", [], False, "A2 top-1", "rsb", RSB_TABLE6, 5,
        ["The CE rows keep A2's other settings (the paper does not say) [UNSPEC].",
         "RA = 3 repeats (timm --aug-repeats 3; RSB gives no count)."]),
    **{f"rsb-table7-{p}": Ladder(
        f"ResNet strikes back Table 7: stochastic depth and smoothing, {p.upper()}",
        f"train_{p}.py", [], False, f"{p.upper()} top-1", "rsb", rsb_table7(p),
        0 if p == "a3" else 1,  # the procedure's default cell (Table 2)
        ["Rows equal to the procedure's default resolve to its script and share its runs.",
         "The A2 / A3 smoothing eps (0.1) is A1's [inferred]."]) for p in ("a1", "a2", "a3")},
    "rsb-table8": Ladder(
        "ResNet strikes back Table 8: A2 augmentation", "train_a2.py", [], False, "A2 top-1",
        "rsb", RSB_TABLE8, 0,
        ["'BCE target' is timm's threshold 0.2 (the paper: every mixed concept -> 1)."]),
    **{f"rsb-table9-{p}": Ladder(
        f"ResNet strikes back Table 9: test crop ratio, {p.upper()}, 10 seeds",
        f"train_{p}.py", [], False, f"{p.upper()} top-1, mean of 10 seeds", "rsb-seeds",
        rsb_table9(means), 2,
        ["Evaluation only: each seed's run is trained once and evaluated at each ratio, "
         "resize floor(224 / ratio).", "Which 10 seeds the paper used is not stated."])
       for p, means in (("a1", (80.18, 80.22, 80.24, 80.15)), ("a2", (79.67, 79.73, 79.68, 79.58)),
                        ("a3", (77.69, 77.86, 78.00, 78.02)))},
}


# ==================================================================================================
# Resolving a row: the script's parser on the row's flags, as the run would see them
# ==================================================================================================

def flag_value(v):
    return v if isinstance(v, str) else json.dumps(v)


def as_flags(changes):
    return [x for k, v in changes.items() for x in (f"--{k.replace('_', '-')}", flag_value(v))]


def parse_extra(extra):
    """`-- --key value ...` as a dict of recipe keys (values parsed as the scripts do) and the
    run options left (--workers 8)."""
    keys, options, i = {}, [], 0
    while i < len(extra):
        flag, value, i = extra[i], None, i + 1
        name, has_inline, inline = flag[2:].partition("=")
        if has_inline:
            value = inline
        elif i < len(extra) and not extra[i].startswith("--"):
            value, i = extra[i], i + 1
        key = name.replace("-", "_")
        if flag.startswith("--") and key in common.DEFAULTS and value is not None:
            keys[key] = common.parse_value(key, value, common.DEFAULTS[key])
        else:
            options += [flag] + ([value] if value is not None and not has_inline else [])
    return keys, options


def scaled(changes, recipe, scale):
    """The row's changes (its resolved recipe: `recipe`) scaled down by `scale`: epoch counts
    x scale.epochs and sizes x scale.sizes (rounded, at least 1 where they were not 0), then
    the extra keys, and the lr scaled linearly when these change the batch but not the lr."""
    out = dict(changes)
    for keys, factor in ((EPOCH_KEYS, scale.epochs), (SIZE_KEYS, scale.sizes)):
        if factor != 1:
            for key in keys:
                if recipe.get(key):
                    out[key] = max(1, round(recipe[key] * factor))
    out.update(scale.keys)
    if "batch_size" in scale.keys and "lr" not in scale.keys:
        out["lr"] = recipe["lr"] * scale.keys["batch_size"] / recipe["batch_size"]
    return out


# a scaled-down ladder: keys set on every row (`-- --model resnet18`), epoch and size factors
Scale = namedtuple("Scale", "keys epochs sizes", defaults=({}, 1.0, 1.0))


def resolve_rows(ladder, scale=Scale()):
    """[(row, its changes from the script, resolved recipe)], the changes cumulative for an
    additive ladder; scaled down as the runs will be."""
    out, acc = [], {}
    for row in ladder.rows:
        changes = dict(acc, **row.changes) if ladder.additive else dict(row.changes)
        if ladder.additive:
            acc = changes
        if scale != Scale():
            full = compare.resolved_recipe(ladder.script, ladder.base + as_flags(changes))
            changes = scaled(changes, full, scale)
        out.append((row, changes, compare.resolved_recipe(ladder.script,
                                                          ladder.base + as_flags(changes))))
    return out


def base_recipe(ladder):
    return compare.resolved_recipe(ladder.script, list(ladder.base))


def differences(a, b):
    """{key: (a's value, b's value)} where two resolved recipes differ (names aside)."""
    return {k: (a[k], b[k]) for k in b if k not in IGNORED and a.get(k) != b[k]}


def expected_keys(changes, before):
    """(the keys a row must change relative to `before`: those it sets to a new value; the
    keys that may change with them: the values derived from those)."""
    must = {k for k, v in changes.items() if before.get(k) != v and k not in IGNORED}
    may = set().union(*(DERIVED.get(k, set()) for k in must)) - must
    return must, may


def parse_rows(text, n):
    if not text:
        return list(range(n))
    rows = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        rows += range(int(lo), int(hi or lo) + 1)
    bad = [r for r in rows if not 0 <= r < n]
    if bad:
        raise common.UserError(f"--rows: no row {bad[0]} (rows 0-{n - 1})")
    return rows


# ==================================================================================================
# list, show
# ==================================================================================================

def cmd_list():
    for name, ladder in LADDERS.items():
        kind = "additive" if ladder.additive else "one-factor"
        evals = sum(r.eval_only for r in ladder.rows)
        print(f"{name:16s} {len(ladder.rows):2d} rows, {kind}, {ladder.script}"
              f"{' ' + ' '.join(ladder.base) if ladder.base else ''}"
              f"{f', {evals} evaluation-only' if evals else ''}: {ladder.title}")


def fmt(v):
    return json.dumps(v) if not isinstance(v, str) else v


def cmd_show(name):
    ladder = LADDERS[name]
    base = base_recipe(ladder)
    print(f"{ladder.title}\n  script: {ladder.script} {' '.join(ladder.base)}\n  protocol: "
          f"{PROTOCOLS[ladder.protocol][0]}; column: {ladder.column}")
    for note in ladder.notes:
        print(f"  note: {note}")
    previous = base
    for k, (row, changes, recipe) in enumerate(resolve_rows(ladder)):
        against = previous if ladder.additive else base
        diff = differences(against, recipe)
        tag = " [evaluation only]" if row.eval_only else ""
        print(f"\n{k:2d}  {row.label}{tag}  published {row.published}  ({row.source})")
        what = "the row before" if ladder.additive and k else "the script"
        if not diff:
            print(f"    = {what}")
        for key, (old, new) in diff.items():
            print(f"    {key}: {fmt(old)} -> {fmt(new)}")
        if ladder.additive and k:
            print(f"    ({len(differences(base, recipe))} keys differ from the script)")
        previous = recipe


# ==================================================================================================
# run
# ==================================================================================================

def trained_source(resolved, k):
    """The index of the trained row an evaluation row evaluates (None: the base run)."""
    for j in range(k - 1, -1, -1):
        if not resolved[j][0].eval_only:
            return j
    return None


def run_key(recipe):
    return json.dumps({k: v for k, v in recipe.items() if k not in IGNORED}, sort_keys=True)


def first_runs(resolved):
    """{recipe: the first trained row with it}: a later row with the same recipe shares its
    runs (Table 7's default cells, one run for both halves)."""
    first = {}
    for k, (row, _, recipe) in enumerate(resolved):
        if not row.eval_only:
            first.setdefault(run_key(recipe), k)
    return first


# one command of a ladder: a training, or an evaluation (of `checkpoint`, with `weights`)
Step = namedtuple("Step", "what folder cmd done checkpoint weights", defaults=(None, None))


def plan(ladder, out, data, rows, seeds, scale=Scale(), options=(), gpus=1):
    """[Step] for the rows and seeds, in order: the runs a row shares with an earlier one
    (same resolved recipe) once, the base runs evaluation rows need first."""
    resolved = resolve_rows(ladder, scale)
    first = first_runs(resolved)
    steps, seen = [], set()
    base_changes = scaled({}, base_recipe(ladder), scale)  # the base run of evaluation rows
    base = compare.resolved_recipe(ladder.script, ladder.base + as_flags(base_changes))

    def train(tag, changes, recipe, seed):
        folder = out / f"{tag}-seed{seed}"
        if folder in seen:
            return folder
        seen.add(folder)
        launcher = ["torchrun", f"--nproc_per_node={gpus}"] if gpus > 1 else [sys.executable]
        cmd = [*launcher, str(ROOT / ladder.script), "--data", str(data), "--output", str(folder),
               "--resume", "auto", "--seed", str(seed), *ladder.base, *as_flags(changes),
               *options]
        steps.append(Step(f"{tag} seed {seed}", folder, cmd, finished(folder, recipe)))
        return folder

    for k in rows:
        row, changes, recipe = resolved[k]
        for seed in seeds:
            if row.eval_only:
                j = trained_source(resolved, k)
                if j is None:
                    src = train("base", base_changes, base, seed)
                else:
                    j = first[run_key(resolved[j][2])]
                    src = out / f"row{j:02d}-seed{seed}"
                folder = out / f"row{k:02d}-seed{seed}"
                for weights in ("model", "ema") if recipe["ema_decay"] else ("model",):
                    cmd = [sys.executable, str(ROOT / "eval.py"), "--checkpoint",
                           str(src / "last.pth"), "--data", str(Path(data) / "val"),
                           "--eval-size", str(recipe["eval_size"]), "--eval-resize",
                           str(recipe["eval_resize"]), "--interpolation",
                           recipe["interpolation"], "--weights", weights]
                    steps.append(Step(f"row {k} seed {seed}, {weights} weights (evaluates "
                                      f"{src.name})", folder, cmd,
                                      (folder / f"eval-{weights}.json").exists(),
                                      src / "last.pth", weights))
            else:
                j = first[run_key(recipe)]
                train(f"row{j:02d}", changes, recipe, seed)
    return steps


def finished(folder, recipe):
    """A run is done when its summary (written after the last epoch) covers its epochs."""
    try:
        return json.loads((folder / "summary.json").read_text())["epochs"] == recipe["epochs"]
    except (OSError, ValueError, KeyError):
        return False


def run_command(step):
    """One step; an evaluation's JSON line is kept as eval-<weights>.json. Returns the exit
    status."""
    if step.weights is None:
        return subprocess.run(step.cmd).returncode
    proc = subprocess.run(step.cmd, capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode == 0:
        step.folder.mkdir(parents=True, exist_ok=True)
        (step.folder / f"eval-{step.weights}.json").write_text(
            proc.stdout.strip().splitlines()[-1] + "\n")
    return proc.returncode


def print_commands(steps, slurm):
    lines = [shlex.join(step.cmd) for step in steps]
    if not slurm:
        print("\n".join(lines))
        return
    print(f"#!/bin/bash\n#SBATCH --array=0-{len(lines) - 1}%1\n# one step a task, in order (%1: "
          "an evaluation row needs its training row's checkpoint); each training resumes with "
          "--resume auto when the array is resubmitted\nSTEPS=(")
    for line in lines:
        print(f"  {shlex.quote(line)}")
    print(')\nexec bash -c "${STEPS[$SLURM_ARRAY_TASK_ID]}"')


def cmd_run(args, extra):
    ladder = LADDERS[args.ladder]
    keys, options = parse_extra(extra)
    scale = Scale(keys, args.epochs_scale, args.size_scale)
    seeds = range(args.seeds or PROTOCOLS[ladder.protocol][1])
    out = Path(args.out or f"runs/ladders/{args.ladder}")
    steps = plan(ladder, out, args.data, parse_rows(args.rows, len(ladder.rows)), seeds, scale,
                 options, args.gpus)
    if args.print_commands:
        return print_commands(steps, args.slurm)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ladder.json").write_text(json.dumps(dict(
        ladder=args.ladder, extra=extra, epochs_scale=args.epochs_scale,
        size_scale=args.size_scale, seeds=list(seeds)), indent=1) + "\n")
    for step in steps:
        if step.done:
            print(f"{step.what}: finished, skipped", flush=True)
            continue
        if step.checkpoint and not step.checkpoint.exists():
            sys.exit(f"{step.what}: {step.checkpoint.parent.name} has no checkpoint yet; run "
                     "its row first (--rows)")
        print(f"{step.what}: {shlex.join(step.cmd)}", flush=True)
        status = run_command(step)
        if status != 0:
            sys.exit(f"{step.what} stopped with exit {status}; run the same command again to "
                     "continue (finished runs are skipped, the others resume)")


def saved_scale(out, name):
    """The scale a ladder's runs were made with (ladder.json, written by run)."""
    if not out.is_dir():
        raise common.UserError(f"no folder {out}")
    try:
        saved = json.loads((out / "ladder.json").read_text())
    except OSError:
        return Scale()
    if saved["ladder"] != name:
        raise common.UserError(f"{out} holds runs of {saved['ladder']}, not {name}")
    return Scale(parse_extra(saved["extra"])[0], saved["epochs_scale"], saved["size_scale"])


# ==================================================================================================
# report
# ==================================================================================================

def run_number(folder, recipe, epoch, weights="auto"):
    """The number of one run: the top-1 of an evaluation row's eval-<weights>.json, or of the
    run's metrics.jsonl at the final or the best epoch; weights "auto": the EMA's where the
    recipe keeps one, else the model's."""
    which = ("ema" if recipe["ema_decay"] else "model") if weights == "auto" else weights
    if (folder / f"eval-{which}.json").exists():
        return json.loads((folder / f"eval-{which}.json").read_text())["top1"]
    if not (folder / "metrics.jsonl").exists():
        return None
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    if len(rows) < recipe["epochs"]:
        return None  # not finished
    key = "ema_top1" if which == "ema" and "ema_top1" in rows[-1] else "top1"
    values = [r[key] for r in rows]
    return values[-1] if epoch == "final" else max(values)


def statistic(protocol, values):
    """The paper's number from a row's {seed: value}."""
    if protocol == "rsb":
        return values.get(0)
    if protocol == "blog":
        return max(values.values())
    return statistics.mean(values.values())


def report_table(ladder, out, scale=Scale(), weights="auto"):
    """[(k, label, published, ours, mean, std, seeds, published increment, our increment)]."""
    resolved = resolve_rows(ladder, scale)
    first = first_runs(resolved)
    epoch = "best" if ladder.protocol == "blog" else "final"
    table = []
    for k, (row, _, recipe) in enumerate(resolved):
        j = k if row.eval_only else first[run_key(recipe)]
        values = {}
        for folder in sorted(out.glob(f"row{j:02d}-seed*")):
            value = run_number(folder, recipe, epoch, weights)
            if value is not None:
                values[int(folder.name.rsplit("seed", 1)[1])] = value
        ours = statistic(ladder.protocol, values) if values else None
        mean = statistics.mean(values.values()) if values else None
        std = statistics.stdev(values.values()) if len(values) > 1 else None
        table.append([k, row.label, row.published, ours, mean, std, len(values), None, None])
    for line in table:
        ref = (line[0] - 1 if line[0] else None) if ladder.additive else ladder.reference
        if ref is not None and ref != line[0]:
            line[7] = line[2] - table[ref][2]
            if line[3] is not None and table[ref][3] is not None:
                line[8] = line[3] - table[ref][3]
    return table


def scale_note(ladder, scale):
    """How the runs differ from the paper's settings, from the last row's resolved recipes."""
    diff = differences(resolve_rows(ladder)[-1][2], resolve_rows(ladder, scale)[-1][2])
    if not diff:
        return "at the paper's settings"
    factors = "".join(f", {what} x {f:g}" for what, f in (("epochs", scale.epochs),
                                                         ("sizes", scale.sizes)) if f != 1)
    return f"scaled down{factors} (last row, paper -> run): " + ", ".join(
        f"{k} {fmt(a)} -> {fmt(b)}" for k, (a, b) in diff.items())


def cmd_report(args):
    ladder = LADDERS[args.ladder]
    out = Path(args.runs)
    scale = saved_scale(out, args.ladder)
    table = report_table(ladder, out, scale, args.weights)
    ref = "the row before" if ladder.additive else f"row {ladder.reference}"
    weights = {"auto": "the EMA's weights where the row keeps an EMA, else the model's",
               "model": "the model's weights (not the EMA's)", "ema": "the EMA's weights"}
    print(f"{ladder.title}\n{scale_note(ladder, scale)}\n"
          f"ours: {PROTOCOLS[ladder.protocol][0]}, {weights[args.weights]}; mean +- std over "
          f"the seeds run; increments against {ref}\n")
    print(report_markdown(table))
    if args.plot:
        plot(table, ladder, args.plot)


def report_markdown(table):
    def num(v, signed=False):
        return "" if v is None else f"{v:+.2f}" if signed else f"{v:.2f}"
    lines = ["| # | row | published | ours | ours, mean +- std (seeds) | published increment | "
             "our increment |", "|---|---|---|---|---|---|---|"]
    for k, label, pub, ours, mean, std, n, dpub, dours in table:
        spread = f"{num(mean)} +- {num(std)} ({n})" if std is not None else \
            f"{num(mean)} ({n})" if n else "not run"
        lines.append(f"| {k} | {label} | {num(pub)} | {num(ours)} | {spread} | "
                     f"{num(dpub, True)} | {num(dours, True)} |")
    return "\n".join(lines)


def plot(table, ladder, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install matplotlib")
    fig, left = plt.subplots(figsize=(max(6, len(table) * 0.7), 4))
    x = [line[0] for line in table]
    left.plot(x, [line[2] for line in table], "o-", label="published")
    left.set_ylabel(f"published {ladder.column}")
    right = left.twinx()
    right.plot(x, [math.nan if line[3] is None else line[3] for line in table], "s--",
               color="C1", label="ours")
    right.set_ylabel("ours (its own scale)")
    left.set_xticks(x, [line[1] for line in table], rotation=60, ha="right", fontsize=7)
    left.set_title(ladder.title, fontsize=8)
    fig.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the ladders")
    show = sub.add_parser("show", help="each row's resolved differences")
    show.add_argument("ladder", choices=list(LADDERS))
    run = sub.add_parser("run", help="train (and evaluate) the rows, one after another")
    run.add_argument("ladder", choices=list(LADDERS))
    run.add_argument("--data", required=True, help="folder with train/ and val/")
    run.add_argument("--rows", help="rows to run: 0-4 or 1,3,5 (default all)")
    run.add_argument("--seeds", type=int, help="seeds 0..N-1 a row (default: the paper's)")
    run.add_argument("--out", help="folder of the runs (default runs/ladders/<ladder>)")
    run.add_argument("--epochs-scale", type=float, default=1.0,
                     help="multiply every epoch count (epochs, warmup, step decay) by this")
    run.add_argument("--size-scale", type=float, default=1.0,
                     help="multiply every image size (train, eval, eval resize) by this")
    run.add_argument("--print-commands", action="store_true",
                     help="print one command a run instead of running them")
    run.add_argument("--gpus", type=int, default=1, help="with --print-commands: torchrun "
                     "with this many processes a run")
    run.add_argument("--slurm", action="store_true",
                     help="with --print-commands: as a SLURM array script")
    rep = sub.add_parser("report", help="the table: published, ours, increments")
    rep.add_argument("ladder", choices=list(LADDERS))
    rep.add_argument("runs", help="the --out folder of run")
    rep.add_argument("--plot", metavar="PNG", help="also plot it (needs matplotlib)")
    rep.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                     help="auto: the EMA's where the row keeps one (the papers' numbers)")
    args = p.parse_args(argv)
    if args.command == "list":
        return cmd_list()
    if args.command == "show":
        return cmd_show(args.ladder)
    if args.command == "run":
        return cmd_run(args, extra)
    return cmd_report(args)


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        sys.exit(f"error: {e}")
