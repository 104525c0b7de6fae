"""compare.py's pieces that run without the reference code: the statistics against numbers
computed by hand, and the translation of a recipe into timm train.py flags."""
import math

import pytest

import common
import compare


def test_difference_of_means_with_welch_interval():
    diff, half, effect = compare.difference([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    # equal variances 1: Welch df = 4, t(0.975, 4) = 2.776, se = sqrt(1/3 + 1/3)
    assert diff == -1.0 and effect == -1.0
    assert half == pytest.approx(2.776 * math.sqrt(2 / 3), rel=1e-3)
    assert compare.t975(1000) == pytest.approx(1.962, abs=1e-3)


def test_timm_flags_of_recipe_b_and_refusal_of_tv():
    r = compare.resolved_recipe("train_b.py", ["--model", "resnet18", "--batch-size", "64"])
    flags = " ".join(compare.timm_args(r))
    for part in ("--opt rmsproptf", "--lr 0.005625", "--sched step --warmup-epochs 5",
                 "--decay-rate 0.988 --decay-epochs 1", "--lr-noise 0.45 1.0",
                 "--smoothing 0.1", "--reprob 0.35 --remode pixel --recount 3",
                 "--momentum 0.9 --opt-eps 0.001", "--aa rand-m8-n2-mstd1.0",
                 "--model-ema --model-ema-decay 0.9999", "--crop-pct 0.95"):
        assert part in flags, part
    assert "--bce-loss" not in flags
    tv = compare.resolved_recipe("train_tv.py", ["--train-size", "224"])
    with pytest.raises(common.UserError, match="no equivalent"):
        compare.timm_args(tv)
