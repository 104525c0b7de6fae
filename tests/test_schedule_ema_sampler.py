"""lr schedules against timm's schedulers and torch's SequentialLR (tv's recipe), the EMA against
timm's ModelEmaV2/V3 and tv's AveragedModel recipe, the repeated-augmentation sampler against
timm's RepeatAugSampler."""
import collections
import math
import warnings

import pytest
import timm.scheduler
import timm.utils
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from timm.scheduler.scheduler_factory import create_scheduler_v2

from common import UserError
from common import EMA, RepeatedAugSampler, lr_at, tv_ema_decay

# ==================================================================================================
# Schedule
# ==================================================================================================

# procedure B's schedule keys (RECIPES.md, timm train.py defaults for the rest)
B = dict(lr=0.18, epochs=600, warmup_epochs=5, sched="step", warmup_lr=1e-4, warmup_factor=None,
         warmup_prefix=False, min_lr=None, decay_rate=0.988, decay_epochs=1,
         lr_noise=[0.45, 1.0], lr_noise_pct=0.67, lr_noise_std=1.0)


def _timm_lrs(recipe, seed, **sched_kw):
    """lr of every epoch as timm's train.py gets it: create_scheduler_v2 from the args, the
    constructor's lr for the first epoch, then step(epoch + 1) after each epoch."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe["lr"])
    kw = dict(sched=recipe["sched"], num_epochs=recipe["epochs"],
              warmup_epochs=recipe["warmup_epochs"], warmup_lr=recipe["warmup_lr"],
              warmup_prefix=recipe["warmup_prefix"], min_lr=recipe["min_lr"] or 0.0,
              decay_rate=recipe["decay_rate"] or 0.1, decay_epochs=recipe["decay_epochs"] or 30,
              noise=recipe["lr_noise"], noise_pct=recipe["lr_noise_pct"],
              noise_std=recipe["lr_noise_std"], noise_seed=seed)
    kw.update(sched_kw)
    sched, _ = create_scheduler_v2(opt, **kw)
    lrs = []
    for epoch in range(recipe["epochs"]):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(epoch + 1)
    return lrs


@pytest.mark.parametrize("prefix", [False, True])
def test_step_decay_with_noise_equals_timm(prefix):
    """Procedure B: StepLRScheduler, 0.988 every epoch after a 5-epoch warmup from warmup_lr,
    noise over [45%, 100%) of 600 epochs, seed 42: every epoch equal to 1e-12 (relative)."""
    recipe = dict(B, warmup_prefix=prefix)
    ref = _timm_lrs(recipe, 42)
    ours = [lr_at(e, recipe, noise_seed=42) for e in range(600)]
    assert ours == pytest.approx(ref, rel=1e-12, abs=0)
    # the noise is on where it should be, and only there
    clean = [lr_at(e, dict(recipe, lr_noise=None)) for e in range(600)]
    noisy = [e for e in range(600) if ours[e] != clean[e]]
    assert noisy[0] == 270 and noisy[-1] == 599 and len(noisy) > 250
    assert all(abs(o / c - 1) < 0.67 for o, c in zip(ours, clean))
    assert ours[5] == pytest.approx(0.18 * 0.988 ** (0 if prefix else 5), rel=1e-12)
    # another seed draws other noise
    assert lr_at(300, recipe, noise_seed=43) != ours[300]


def test_noise_during_warmup_and_not_at_epoch_0_as_timm():
    """A noise range from 0 covers the warmup too; timm never steps epoch 0, so it has none."""
    recipe = dict(B, epochs=20, lr_noise=[0.0, 0.6], lr_noise_pct=0.5)
    ref = _timm_lrs(recipe, 7)
    ours = [lr_at(e, recipe, noise_seed=7) for e in range(20)]
    assert ours == pytest.approx(ref, rel=1e-12, abs=0)
    assert ours[0] == recipe["warmup_lr"]
    assert ours[2] != lr_at(2, dict(recipe, lr_noise=None))


def _cosine(**kw):
    recipe = dict(lr=8e-3, epochs=100, warmup_epochs=5, sched="cosine", warmup_lr=1e-4,
                  warmup_factor=None, warmup_prefix=False, min_lr=1e-6, decay_rate=None,
                  decay_epochs=None, lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0)
    recipe.update(kw)
    return recipe


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("noise", [None, [0.3, 0.8]])
def test_cosine_equals_timm(prefix, noise):
    """CosineLRScheduler per epoch. With warmup_prefix the cosine spans epochs - warmup after the
    warmup: timm's t_initial is then epochs - warmup (its train.py would add the warmup on top)."""
    recipe = _cosine(warmup_prefix=prefix, lr_noise=noise)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe["lr"])
    sched = timm.scheduler.CosineLRScheduler(
        opt, t_initial=100 - 5 if prefix else 100, lr_min=1e-6, warmup_t=5, warmup_lr_init=1e-4,
        warmup_prefix=prefix, noise_range_t=[n * 100 for n in noise] if noise else None,
        noise_seed=3)
    for epoch in range(100):
        if epoch > 0:
            sched.step(epoch)
        assert lr_at(epoch, recipe, noise_seed=3) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-12, abs=0), epoch
    assert (lr_at(50, dict(recipe, lr_noise=None)) == lr_at(50, _cosine())) != prefix
    if noise:
        assert lr_at(50, recipe, noise_seed=3) != lr_at(50, dict(recipe, lr_noise=None))


def test_cosine_a3_recipe_unchanged():
    """The A3 recipe through the new lr_at: timm's per-epoch values, as before."""
    import common
    from train_a3 import RECIPE
    recipe = common.resolve(common.full_recipe(RECIPE))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe["lr"])
    sched = timm.scheduler.CosineLRScheduler(opt, t_initial=100, lr_min=recipe["min_lr"],
                                             warmup_t=5, warmup_lr_init=recipe["warmup_lr"])
    for epoch in range(100):
        if epoch > 0:
            sched.step(epoch)
        assert lr_at(epoch, recipe) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)


def test_tv_recipe_equals_sequential_linear_cosine():
    """tv's train.py: SequentialLR(LinearLR(start_factor=0.01, total_iters=5),
    CosineAnnealingLR(T_max=epochs - 5), milestones=[5]) stepped per epoch, 600 epochs."""
    recipe = _cosine(lr=0.5, epochs=600, warmup_lr=None, warmup_factor=0.01, warmup_prefix=True,
                     min_lr=None)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's step(0) of the second scheduler
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=600 - 5)], milestones=[5])
        for epoch in range(600):
            assert lr_at(epoch, recipe) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), \
                epoch
            opt.step()
            sched.step()
    assert lr_at(0, recipe) == pytest.approx(0.005) and lr_at(5, recipe) == 0.5


def test_rs_per_step_warmup_from_zero_then_cosine_to_zero():
    """ResNet-RS (TF TPU code): lr = base * step / warmup_steps, then
    0.5 * base * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps)))."""
    recipe = _cosine(lr=1.6, epochs=20, warmup_lr=0.0, warmup_prefix=True, min_lr=0.0)
    steps, warm, total = 7, 5 * 7, 20 * 7
    for step in range(total):
        if step < warm:
            want = 1.6 * step / warm
        else:
            want = 0.5 * 1.6 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert lr_at(step / steps, recipe) == pytest.approx(want, rel=1e-9, abs=1e-15), step
    assert lr_at(0.0, recipe) == 0.0 and lr_at(20, recipe) == 0.0


def test_missing_optional_keys_take_defaults():
    recipe = dict(lr=1.0, epochs=10, warmup_epochs=2, sched="cosine", warmup_lr=0.1)
    assert lr_at(1, recipe) == pytest.approx(0.55)
    assert lr_at(2, recipe) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 10)))
    assert lr_at(10, recipe) == 0.0
    assert lr_at(1, dict(recipe, warmup_lr=None, warmup_factor=0.1)) == pytest.approx(0.55)
    with pytest.raises(UserError):
        lr_at(0, dict(recipe, warmup_lr=None))
    with pytest.raises(UserError):
        lr_at(5, dict(recipe, sched="step"))


def test_noise_keys_default_and_std_scales_the_draw():
    """Absent lr_noise_pct / lr_noise_std: timm's 0.67 / 1.0. A std other than 1 scales the
    normal draw (timm's own _calculate_noise ignores --lr-noise-std)."""
    bare = {k: v for k, v in B.items() if k not in ("lr_noise_pct", "lr_noise_std")}
    assert [lr_at(e, bare, 42) for e in range(260, 600, 7)] == \
        [lr_at(e, B, 42) for e in range(260, 600, 7)]
    clean = lr_at(400, dict(B, lr_noise=None))
    z = torch.randn(1, generator=torch.Generator().manual_seed(42 + 400)).item()
    assert abs(z) < 6.7
    assert lr_at(400, dict(B, lr_noise_std=0.1), 42) == pytest.approx(clean * (1 + 0.1 * z))


# ==================================================================================================
# EMA
# ==================================================================================================

def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))


def _train_step(model, opt, gen):
    """Moves the weights and the BN statistics (and num_batches_tracked)."""
    model.train()
    opt.zero_grad()
    x = torch.randn(8, 3, 6, 6, generator=gen) * 2 + 1
    model(x).square().mean().backward()
    opt.step()


def _assert_state_close(a, b, skip=()):
    assert a.keys() == b.keys()
    for k in a:
        if not k.endswith(skip):
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("version", ["v2", "v3", "v3_step"])
def test_ema_equals_timm(version):
    """timm style: fixed decay at every update, parameters and buffers. v3_step is what
    current timm train.py does (update(model, step=num_updates)): its first update copies,
    which is copy_first=True here."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = (timm.utils.ModelEmaV2 if version == "v2" else timm.utils.ModelEmaV3)(model, decay=0.9)
    ours = EMA(model, 0.9, copy_first=version == "v3_step")
    gen = torch.Generator().manual_seed(1)
    for n in range(1, 7):
        _train_step(model, opt, gen)
        if version == "v3_step":
            ref.update(model, step=n)
        else:
            ref.update(model)
        assert ours.update(model) == (0.0 if version == "v3_step" and n == 1 else 0.9)
    # V2 lerps num_batches_tracked as a float and truncates it back; V3 and we copy it
    _assert_state_close(ours.module.state_dict(), ref.module.state_dict(),
                        "num_batches_tracked" if version == "v2" else ())
    # it averaged: neither the model nor the initial copy
    assert not torch.allclose(ours.module[0].weight, model[0].weight)
    assert not torch.allclose(ours.module[1].running_mean, _net()[1].running_mean)
    assert ours.module[1].num_batches_tracked == model[1].num_batches_tracked == 6
    assert not ours.module.training
    assert not any(p.requires_grad for p in ours.module.parameters())


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """torchvision references/classification/utils.py ExponentialMovingAverage, verbatim."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(avg_model_param, model_param, num_averaged):
            return decay * avg_model_param + (1 - decay) * model_param

        super().__init__(model, device, ema_avg, use_buffers=True)


@pytest.mark.parametrize("warmup", [0, 1])
def test_ema_equals_tv_averaged_model(warmup):
    """tv's train_one_epoch: after optimizer.step() at loader index i, update when
    i % model_ema_steps == 0, and zero n_averaged during the warmup epochs (the next update
    copies, the first one after the warmup included)."""
    epochs, steps, every = 3, 5, 2
    decay = tv_ema_decay(0.99, 1, 4, every, epochs)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = ExponentialMovingAverage(model, decay)
    ours = EMA(model, decay, copy_first=True)
    gen = torch.Generator().manual_seed(2)
    used = []
    for epoch in range(epochs):
        for i in range(steps):
            _train_step(model, opt, gen)
            if i % every == 0:
                ref.update_parameters(model)
                if epoch < warmup:
                    ref.n_averaged.fill_(0)
                used.append(ours.update(model, copy=epoch < warmup))
    # tv averages num_batches_tracked as a float and truncates it back; we copy it
    _assert_state_close(ours.module.state_dict(), ref.module.state_dict(), "num_batches_tracked")
    assert ours.module[1].num_batches_tracked == epochs * steps
    copies = 1 + 3 * warmup  # the first update, or the warmup epoch's 3 and the one after
    assert used == [0.0] * copies + [decay] * (9 - copies)
    assert not torch.allclose(ours.module[4].weight, model[4].weight)


def test_tv_ema_decay():
    """tv's train.py with the blog's values (8 GPUs x 128, every 32 steps, 600 epochs)."""
    adjust = 8 * 128 * 32 / 600
    alpha = 1.0 - 0.99998
    assert tv_ema_decay(0.99998, 8, 128, 32, 600) == 1.0 - min(1.0, alpha * adjust)
    assert tv_ema_decay(0.99998, 8, 128, 32, 600) == pytest.approx(1 - 2e-5 * 8 * 128 * 32 / 600)
    assert tv_ema_decay(0.9, 8, 128, 32, 600) == 0.0  # alpha clamped at 1: a copy


def test_ema_tf_warmup_decay_sequence():
    """tf.train.ExponentialMovingAverage(decay, num_updates=global_step): the n-th update
    (n = 1, 2, ...) uses min(decay, (1 + n) / (10 + n))."""
    model = torch.nn.Linear(3, 2).double()
    ema = EMA(model, 0.9999, tf_warmup=True)
    want = model.weight.detach().clone()
    for n in range(1, 30):
        with torch.no_grad():
            model.weight.fill_(float(n))
        d = min(0.9999, (1 + n) / (10 + n))
        assert ema.update(model) == d
        want = d * want + (1 - d) * n
        torch.testing.assert_close(ema.module.weight, want, rtol=1e-12, atol=1e-12)
    assert ema.decay_at(1) == 2 / 11 and ema.decay_at(89990) == pytest.approx(0.9999)
    assert ema.decay_at(10 ** 6) == 0.9999 and ema.decay_at(1000) < 0.9999
    assert EMA(model, 0.9999).decay_at(1) == 0.9999


def test_ema_state_dict_roundtrip():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    ema = EMA(model, 0.99, tf_warmup=True)
    for _ in range(3):
        _train_step(model, opt, gen)
        ema.update(model, copy=True)
    other = EMA(_net(), 0.99, tf_warmup=True)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 3 and other.copy_next
    _train_step(model, opt, gen)
    assert ema.update(model) == other.update(model) == 0.0  # the copy after copy=True
    _train_step(model, opt, gen)
    assert ema.update(model) == other.update(model) == min(0.99, 6 / 15)
    _assert_state_close(ema.module.state_dict(), other.module.state_dict())
    plain = EMA(_net(), 0.99)
    plain.load_state_dict(ema.module.state_dict())  # a bare weights dict (timm state_dict_ema)
    _assert_state_close(plain.module.state_dict(), ema.module.state_dict())


# ==================================================================================================
# Repeated-augmentation sampler
# ==================================================================================================

@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [256 * 4 * 2, 1437, 3001])
def test_sampler_equals_timm(world, length):
    """Same indices as timm's RepeatAugSampler, its truncation to a multiple of 256 included
    (1437 images: 1280 samples an epoch, not 1437)."""
    for epoch in (0, 1):
        for rank in range(world):
            ref = RepeatAugSampler(range(length), num_replicas=world, rank=rank, num_repeats=3)
            ours = RepeatedAugSampler(length, 3, world, rank)
            ref.set_epoch(epoch)
            ours.set_epoch(epoch)
            assert len(ours) == len(ref) == length // 256 * 256 // world
            assert list(ours) == list(ref)


@pytest.mark.parametrize("length,world,repeats", [(50, 4, 3), (10, 3, 4), (1, 8, 3), (37, 1, 2)])
def test_sampler_repeats_spread_over_ranks(length, world, repeats):
    """Below 256 images (where timm and tv would yield nothing): before truncation every index
    is there `repeats` times; the ranks share the padded list; each yields ceil(length /
    world), so an epoch has at least len(dataset) samples."""
    samplers = [RepeatedAugSampler(length, repeats, world, r, seed=5) for r in range(world)]
    full = samplers[0].epoch_indices()
    assert len(full) % world == 0 and len(full) - length * repeats < world
    assert collections.Counter(full[:length * repeats]) == {i: repeats for i in range(length)}
    for r, s in enumerate(samplers):
        got = list(s)
        assert len(got) == len(s) == math.ceil(length / world)
        assert got == full[r::world][:len(got)]
    if repeats <= world:  # the copies of one image go to different ranks
        for s in samplers:
            got = list(s)
            assert len(set(got)) == len(got) or len(got) * world > length * repeats


def test_sampler_seeded_by_seed_and_epoch():
    a, b, c = (RepeatedAugSampler(300, 3, 2, 1, seed=s) for s in (0, 0, 1))
    assert list(a) == list(b)
    assert list(a) != list(c)
    b.set_epoch(1)
    assert list(a) != list(b)
    c.set_epoch(0)
    a.set_epoch(1)
    assert list(a) == list(RepeatedAugSampler(300, 3, 2, 1, seed=1))  # seed + epoch


def test_sampler_single_process_and_repeats_one():
    s = RepeatedAugSampler(10, 3)
    got = list(s)
    assert len(got) == len(s) == 10
    assert max(collections.Counter(got).values()) <= 3
    assert list(RepeatedAugSampler(4, 2, shuffle=False)) == [0, 0, 1, 1]
    # one repeat: torch's DistributedSampler(shuffle=True, drop_last=False), same seed + epoch
    for rank in range(3):
        ref = torch.utils.data.DistributedSampler(range(11), num_replicas=3, rank=rank, seed=4)
        ours = RepeatedAugSampler(11, 1, 3, rank, seed=4)
        ref.set_epoch(2)
        ours.set_epoch(2)
        assert list(ours) == list(ref)
    with pytest.raises(UserError):
        RepeatedAugSampler(10, 0)
    with pytest.raises(UserError):
        RepeatedAugSampler(10, 3, world=2, rank=2)


def test_tv_ema_decay_counts_the_global_batch_whatever_the_accumulation():
    """tv's adjustment counts the images between two EMA updates: 2 ranks x 8 and 1 rank x 8
    x 2 accumulation steps are the same run, so the same decay (tv itself has no accumulation)."""
    import types
    import common
    recipe = common.full_recipe(dict(recipe="tv", model="resnet18", epochs=30, batch_size=16,
                                     opt="sgd", lr=0.1, ema_decay=0.99998, ema_every=32,
                                     ema_style="tv"))
    decays = []
    for world, per_device, accum in ((2, 8, 1), (1, 8, 2), (1, 16, 1)):
        run = types.SimpleNamespace(recipe=recipe, world=world, per_device=per_device,
                                    accum=accum, model=_net(), ckpt=None, log=lambda text: None)
        common.make_ema(run)
        decays.append(run.ema.decay)
    assert decays[0] == decays[1] == decays[2] == tv_ema_decay(0.99998, 1, 16, 32, 30)
