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


def test_recipe_resolved_as_the_script_resolves_it_variants_and_per_model_values_included():
    c1 = compare.resolved_recipe("train_c.py", ["--variant", "c1", "--batch-size", "64"])
    assert c1["recipe"] == "c1" and c1["repeated_aug"] == 0
    flags = " ".join(compare.timm_args(c1))
    for part in ("--opt sgd --lr 0.0275", "--clip-grad 0.025 --clip-mode agc", "--drop 0.25",
                 "--drop-path 0.1", "--interpolation bicubic"):
        assert part in flags, part
    assert compare.resolved_recipe("train_rs.py", ["--model", "resnet101"])["train_size"] == 160
    assert compare.resolved_recipe("train_rs.py", ["--model", "resnet101", "--train-size",
                                                   "128"])["train_size"] == 128


def test_tv_flags_of_recipe_tv_and_refusal_of_timm_recipes():
    k, script, overrides = compare.COMPARISONS["tv"]
    r = compare.resolved_recipe(script, ["--batch-size", "64", "--train-size", "28",
                                         "--eval-size", "32", "--eval-resize", "33"])
    flags = " ".join(compare.tv_args(r))
    for part in ("--model resnet50 --epochs 600 -b 64", "--train-crop-size 28 --val-crop-size 32"
                 " --val-resize-size 33 --interpolation bilinear", "--opt sgd --lr 0.03125 "
                 "--momentum 0.9 --wd 2e-05", "--norm-weight-decay 0", "--lr-scheduler "
                 "cosineannealinglr --lr-min 0 --lr-warmup-epochs 5 --lr-warmup-method linear "
                 "--lr-warmup-decay 0.01", "--label-smoothing 0.1 --mixup-alpha 0.2 "
                 "--cutmix-alpha 1.0 --random-erase 0.1", "--auto-augment ta_wide",
                 "--ra-sampler --ra-reps 4", "--model-ema --model-ema-steps 32 "
                 "--model-ema-decay 0.99998"):
        assert part in flags, part
    assert "--bias-weight-decay" not in flags and "--clip-grad-norm" not in flags
    # the blog's baseline decays every parameter: tv's train.py without --norm-weight-decay
    assert "--norm-weight-decay" not in compare.tv_args(dict(r, wd_groups="all"))
    for script in ("train_a3.py", "train_b.py", "train_d.py"):
        with pytest.raises(common.UserError, match="torchvision's train.py has no equivalent"):
            compare.tv_args(compare.resolved_recipe(script, []))


def test_tv_rows_from_a_log_in_the_format_of_its_metric_logger():
    log = []
    for epoch, (lr, top1, ema) in enumerate([(0.0003125, 10.165, 9.5), (0.03125, 42.308, 11.0)]):
        for i, extra in ((0, ""), (19, "")):
            log.append(f"Epoch: [{epoch}]  [{i:2d}/20]  eta: 0:00:01  lr: {lr if i == 0 else 9}"
                       f"  img/s: 351.2  loss: 3.7495 (3.6304)  acc1: 10.9 (11.9)  time: 0.2001"
                       f"  data: 0.0063{extra}")
        log.append("Test:   [0/6]  eta: 0:00:01  loss: 2.3 (2.3)  acc1: 9.3 (9.3)  time: 0.1")
        log.append(f"Test:  Acc@1 {top1:.3f} Acc@5 50.000")
        log.append(f"Test: EMA Acc@1 {ema:.3f} Acc@5 50.000")
    assert compare.tv_rows(None, "\n".join(log)) == [(10.165, 9.5, 0.0003125),
                                                     (42.308, 11.0, 0.03125)]


FAKE_TV_TRAIN = '''
import json, os, random, sys
import numpy as np, torch, torch.distributed as dist
import utils
from sampler import RASampler
cuda = torch.cuda.is_available()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # as tv's init_distributed_mode
dist.init_process_group(backend="nccl", init_method="env://",
                        world_size=int(os.environ["WORLD_SIZE"]), rank=int(os.environ["RANK"]))
model = torch.nn.parallel.DistributedDataParallel(
    torch.nn.Linear(2, 2).to("cuda" if cuda else "cpu"), device_ids=[0])
print(json.dumps(dict(
    ra=RASampler(range(8)).seed, ds=torch.utils.data.distributed.DistributedSampler(range(8)).seed,
    backend=dist.get_backend(), total=utils.reduce_across_processes([3.0]).tolist(),
    draws=[random.random(), float(np.random.rand()), torch.rand(1).item()], argv=sys.argv[1:])))
'''
FAKE_TV_FILES = {  # the parts of tv's utils.py and sampler.py the launcher touches, as tv has them
    "utils.py": "import torch, torch.distributed as dist\n"
                "def reduce_across_processes(val):\n"
                "    t = torch.tensor(val, device='cuda')\n"
                "    dist.barrier()\n    dist.all_reduce(t)\n    return t\n",
    "sampler.py": "class RASampler:\n"
                  "    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True,"
                  " seed=0, repetitions=3):\n        self.seed = seed\n",
    "train.py": FAKE_TV_TRAIN}


def test_tv_reference_launcher_seeds_the_run_and_runs_distributed_here(tmp_path):
    """tv's train.py has no --seed and its samplers default to seed 0 (+ epoch): the launcher
    seeds everything from --seed, and tv's NCCL / GPU assumptions run on gloo where there is no
    GPU. A fake train.py making tv's calls shows each patch (without one, it raises)."""
    import json
    import subprocess
    import sys
    import torch
    for name, text in FAKE_TV_FILES.items():
        (tmp_path / name).write_text(text)

    def launch(seed):
        out = subprocess.run([sys.executable, str(compare.ROOT / "compare.py"), "tv-reference",
                              str(seed), str(tmp_path / "train.py"), "--epochs", "3"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])
    a, again, b = launch(3), launch(3), launch(4)
    assert a == again
    assert a["argv"] == ["--epochs", "3"] and a["total"] == [3.0]
    assert a["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert a["ra"] == a["ds"] and a["ra"] not in (0, 3)
    assert abs(b["ra"] - a["ra"]) > 1000  # seed + epoch cannot reach the other seed's orders
    assert all(x != y for x, y in zip(a["draws"], b["draws"]))


def test_tv_refusals_warmup_and_an_epoch_the_batch_does_not_divide(tmp_path):
    k, script, overrides = compare.COMPARISONS["tv"]
    for flags in (["--warmup-factor", "0"], ["--warmup-lr", "0.001"]):
        with pytest.raises(common.UserError, match="warmup"):
            compare.tv_args(compare.resolved_recipe(script, flags))
    for i in range(10):
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "a" / f"{i}.png").write_bytes(b"")
    r = compare.resolved_recipe(script, ["--repeated-aug", "0", "--batch-size", "5"])
    compare.check_tv_epoch(r, tmp_path)  # 10 images, batch 5: the same steps on both sides
    with pytest.raises(common.UserError, match="last partial batch"):
        compare.check_tv_epoch(dict(r, batch_size=4), tmp_path)
    with pytest.raises(common.UserError, match="epoch of 0 images"):  # RA keeps 10 // 256 * 256
        compare.check_tv_epoch(dict(r, repeated_aug=4), tmp_path)


def test_variance_ratio_f_test_against_tabled_values():
    """F(15, 15): P(F <= 2) = 0.904471, 0.975 quantile 2.862093 (scipy.stats.f, computed
    outside the suite); var ratio of [1, 2, 3, 4, 5, 9] to [2, 3, 3, 4, 4, 5] = 7.27, p 0.0482."""
    assert compare.f_cdf(2.0, 15, 15) == pytest.approx(0.904471186, abs=1e-8)
    assert compare.f_cdf(1.2, 3, 40) == pytest.approx(0.677866234, abs=1e-8)
    assert compare.f_quantile(0.975, 15, 15) == pytest.approx(2.862092530, abs=1e-7)
    assert compare.f_quantile(0.025, 15, 15) == pytest.approx(0.349394714, abs=1e-7)
    ratio, (lo, hi), p = compare.variance_ratio([1, 2, 3, 4, 5, 9], [2, 3, 3, 4, 4, 5])
    assert ratio == pytest.approx(80 / 11) and p == pytest.approx(0.0482182, abs=1e-6)
    assert 1 < lo < ratio < hi  # p < 0.05: the interval leaves out 1
    assert compare.variance_ratio([1, 2, 3], [1, 2, 3])[2] == pytest.approx(1.0)


def test_reference_checkout_runs_our_script_of_another_checkout(tmp_path, monkeypatch):
    """--reference-checkout DIR: the reference side is DIR's copy of the recipe script with our
    flags, its seeds --reference-seed-stride apart, its results read from its metrics.jsonl;
    the report names both seed lists. run_one is replaced: no training."""
    import json
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "train_a3.py").write_text("")
    calls = []

    def fake_run(side, cmd, out, epochs, threads, parse):
        calls.append((side, cmd))
        top1 = 50.0 + len(calls)
        return dict(final=top1, best=top1 + 1, final_ema=None, lr=[0.1] * epochs, seconds=1.0,
                    command=cmd)
    monkeypatch.setattr(compare, "run_one", fake_run)
    compare.main(["a3", "--data", str(tmp_path), "--reference-checkout", str(tmp_path / "old"),
                  "--reference-seed-stride", "1000", "--seeds", "3", "--out",
                  str(tmp_path / "runs")])
    ours = [c for s, c in calls if s == "ours"]
    ref = [c for s, c in calls if s == "reference"]
    assert [c[1] for c in ref] == [str(tmp_path / "old" / "train_a3.py")] * 3
    assert [c[1] for c in ours] == [str(compare.ROOT / "train_a3.py")] * 3
    seed = [c[c.index("--seed") + 1] for c in ref]
    assert seed == ["0", "1000", "2000"]
    assert [c[c.index("--seed") + 1] for c in ours] == ["0", "1", "2"]
    assert ref[0][ref[0].index("--lr") + 1] == "0.004"  # COMPARISONS' a3 overrides, both sides
    assert ref[1][ref[1].index("--output") + 1].endswith("reference-seed1000")
    text = (tmp_path / "runs" / "compare.md").read_text()
    assert "reference seeds 0, 1000, 2000" in text and "F test p" in text
    assert json.loads((tmp_path / "runs" / "compare.json").read_text())["reference_seeds"] == \
        [0, 1000, 2000]
    with pytest.raises(SystemExit):
        compare.main(["a3", "--data", str(tmp_path), "--reference", "x",
                      "--reference-checkout", str(tmp_path / "old")])


def test_random_digits_split_is_the_reviewers():
    """--split random: per class, its indices shuffled by one default_rng(0) in class order,
    the first int(0.8 n) train; on the digits' class sizes 1,433 / 364 images, as the fixed
    split, but other val images."""
    import numpy as np
    sizes = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's load_digits
    random, fixed = compare.digits_split(sizes, "random"), compare.digits_split(sizes, "fixed")
    assert sum(map(len, random)) == sum(map(len, fixed)) == 1433
    assert all(len(r) == int(0.8 * n) for r, n in zip(random, sizes))
    assert random != fixed and fixed[0] == set(range(178 - 36))
    rng = np.random.default_rng(0)
    first = [set(rng.permutation(n)[:int(0.8 * n)].tolist()) for n in sizes[:2]]
    assert random[:2] == first
