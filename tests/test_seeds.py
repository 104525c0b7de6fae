"""Independent seeds (issue 15): every random stream of a run is seeded from (seed, stream,
epoch, rank or batch) through SeedSequence, so --seed s and --seed s + 1 share no data order;
a run's batches do not depend on the loader workers or on how the global batch is split."""
import json

import torch

import common
from test_resume import TIMING
from common import SEED_BATCH, SEED_NOISE, SEED_ORDER, TrainSampler, seed_for
from test_train import rows, train


def orders(seed, epochs, sampler=TrainSampler, **kw):
    s = sampler(40, **kw, seed=seed_for(seed, SEED_ORDER), batch_seed=seed_for(seed, SEED_BATCH))
    out = []
    for epoch in range(epochs):
        s.set_epoch(epoch)
        out.append(tuple(s))
    return out


def test_seeds_share_no_epoch_order():
    """Seeds 0..7 over 30 epochs: 240 different orders (and batch seeds). With the old rule,
    seed + epoch, --seed 1 replayed --seed 0's orders one epoch late."""
    seen = [o for seed in range(8) for o in orders(seed, 30, batch=4)]
    assert len({tuple(i for i, _ in o) for o in seen}) == len(seen)
    assert len({key for o in seen for _, key in o}) == len(seen) * 10  # 10 batches an epoch
    # the old rule, for contrast: the permutation of base 0 at epoch 1 is base 1's at epoch 0
    old = [TrainSampler(40, 4, seed=s) for s in (0, 1)]
    old[0].set_epoch(1)
    assert [i for i, _ in old[0]] == [i for i, _ in old[1]]


def test_same_seed_same_order_and_lr_noise():
    assert orders(3, 5, batch=4) == orders(3, 5, batch=4)
    b = dict(lr=1.0, epochs=100, warmup_epochs=0, sched="step", decay_rate=1.0, decay_epochs=1,
             lr_noise=[0.0, 1.0], lr_noise_pct=0.67, lr_noise_std=1.0)
    lrs = {s: [common.lr_at(e, b, seed_for(s, SEED_NOISE)) for e in range(1, 40)]
           for s in range(4)}
    assert lrs[0] == [common.lr_at(e, b, seed_for(0, SEED_NOISE)) for e in range(1, 40)]
    for s in range(3):  # no shifted copies of each other's noise
        assert lrs[s][1:] != lrs[s + 1][:-1]


def test_world_size_and_accumulation_keep_the_global_order():
    """The documented rule: global batch k is order[k G:(k + 1) G], G = world x accum x batch;
    rank r takes the r-th block of accum x batch. 2 ranks x 1 step = 1 rank x 2 steps, keys
    (index, batch seed) included; one batch of 8 reads the same order in other chunks."""
    one = orders(5, 2, batch=4, accum=2)
    ranks = [orders(5, 2, batch=4, world=2, rank=r) for r in (0, 1)]
    for epoch in range(2):
        merged = []
        for k in range(len(ranks[0][epoch]) // 4):
            merged += ranks[0][epoch][4 * k:4 * k + 4] + ranks[1][epoch][4 * k:4 * k + 4]
        assert tuple(merged) == one[epoch]
        plain = orders(5, 2, batch=8)[epoch]
        assert [i for i, _ in plain] == [i for i, _ in one[epoch]]  # same order, other chunks
    assert len(one[0]) == 40 // 8 * 8


def test_repeated_aug_sampler_sends_one_seed_per_batch():
    s = common.RepeatedAugSampler(40, 3, world=2, rank=1, seed=7, batch=4, batch_seed=9)
    keys = list(s)
    assert [i for i, _ in keys] == list(common.RepeatedAugSampler(40, 3, 2, 1, 7))
    per_batch = [{seed for _, seed in keys[j:j + 4]} for j in range(0, len(keys), 4)]
    assert all(len(b) == 1 for b in per_batch)
    assert len(set.union(*per_batch)) == len(per_batch)


def test_loader_workers_do_not_change_the_run(tiny_data, tmp_path):
    """Each batch reseeds the augmentation streams from its own seed: 0 and 2 loader workers
    give the same run, rows and weights bit for bit (RandAugment, Mixup/CutMix on)."""
    for workers in ("0", "2"):
        res = train(tiny_data, tmp_path / workers, "--epochs", "2", "--workers", workers)
        assert res.returncode == 0, res.stderr
    strip = [{k: v for k, v in r.items() if k not in TIMING}
             for r in rows(tmp_path / "0")]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING}
                     for r in rows(tmp_path / "2")]
    w0, w2 = (torch.load(tmp_path / w / "last.pth", weights_only=True)["model"] for w in "02")
    assert all(torch.equal(w0[k], w2[k]) for k in w0)
    other = train(tiny_data, tmp_path / "seed1", "--epochs", "1", "--seed", "1")
    assert other.returncode == 0
    assert json.loads((tmp_path / "seed1" / "metrics.jsonl").read_text().splitlines()[0]) \
        != rows(tmp_path / "0")[0]


def test_seed_all_gives_python_numpy_and_torch_streams_of_their_own():
    """After seed_all(s) the three generators draw unrelated numbers. Seeded with one value,
    Python's random and NumPy's global RandomState were one MT19937 stream (both seed through
    init_by_array on the value's 32-bit words): the crop draws and RandAugment's op draws of a
    batch came from the same numbers. Pearson correlation of 2,000 draws: |r| < 0.1 (4.5
    standard errors), for 20 batch seeds."""
    for b in range(20):
        common.seed_all(seed_for(0, SEED_BATCH, 0, b), cpu_only=True)
        draws = torch.tensor([[common.random.random() for _ in range(2000)],
                              common.np.random.random_sample(2000).tolist(),
                              torch.rand(2000, dtype=torch.float64).tolist()])
        r = torch.corrcoef(draws)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert abs(r[i, j]) < 0.1, (b, i, j, float(r[i, j]))


def test_first_draws_of_the_batches_of_a_run_are_uniform_and_never_repeat():
    """The per-batch reseeding over 3 epochs of 1,500 batches: each batch's first Python,
    NumPy and torch draws (the first crop scale, RandAugment op, flip) are all distinct across
    the run and uniform on [0, 1) (Kolmogorov-Smirnov, D < 1.95 / sqrt(n): level 0.001). A
    reseed that repeats or a seed shared between batches fails it."""
    firsts = []
    for epoch in range(3):
        for b in range(1500):
            common.seed_all(seed_for(0, SEED_BATCH, epoch, b), cpu_only=True)
            firsts.append((common.random.random(), float(common.np.random.random_sample()),
                           float(torch.rand(1, dtype=torch.float64))))
    n = len(firsts)
    for k in range(3):
        u = sorted(f[k] for f in firsts)
        assert len(set(u)) == n
        d = max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(u))
        assert d < 1.95 / n ** 0.5, (k, d)
