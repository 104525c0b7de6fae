"""Optim and schedule sections against timm.optim.Lamb and timm's CosineLRScheduler."""
import math

import pytest
import timm.optim
from timm.optim._param_groups import param_groups_weight_decay
import timm.scheduler
import torch

import common


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, bias=True), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))


@pytest.mark.parametrize("grad_scale", [1e-3, 1e3])  # below and above the global clip norm 1
def test_lamb_equals_timm(grad_scale):
    """common.Lamb == timm.optim.Lamb (same param groups: no decay on ndim <= 1), 12 steps,
    parameters and moments equal to 1e-6."""
    ours_model, ref_model = _model(), _model()
    ref_model.load_state_dict(ours_model.state_dict())
    ours = common.Lamb(common.param_groups(ours_model, 0.02), lr=8e-3)
    ref = timm.optim.Lamb(param_groups_weight_decay(ref_model, 0.02),
                          lr=8e-3)
    torch.manual_seed(1)
    for step in range(12):
        x = torch.randn(4, 3, 8, 8)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            (model(x).square().mean() * grad_scale).backward()
            if step == 3:  # a tensor with zero gradient: trust ratio falls back to 1
                model[3].bias.grad.zero_()
            opt.step()
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"],
                                   atol=1e-6, rtol=1e-5)


def test_lamb_no_decay_groups_are_biases_and_norms():
    groups = common.param_groups(_model(), 0.02)
    assert groups[0]["weight_decay"] == 0 and groups[1]["weight_decay"] == 0.02
    assert all(p.ndim <= 1 for p in groups[0]["params"])
    assert all(p.ndim > 1 for p in groups[1]["params"])


def test_lamb_state_dict_roundtrip():
    model = _model()
    opt = common.Lamb(common.param_groups(model, 0.02), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    other = common.Lamb(common.param_groups(model, 0.02), lr=1e-3)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["step"] == 1


def _a3(**kw):
    from train_a3 import RECIPE
    return common.resolve(common.full_recipe(dict(RECIPE, **kw)))


@pytest.mark.parametrize("epochs,warmup", [(100, 5), (12, 1), (7, 0)])
def test_cosine_per_epoch_equals_timm(epochs, warmup):
    """lr of every epoch == timm CosineLRScheduler(t_initial=epochs, warmup_t, warmup_lr_init,
    lr_min) as timm train.py builds and steps it (per epoch), to 1e-12."""
    recipe = _a3(epochs=epochs, warmup_epochs=warmup)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe["lr"])
    sched = timm.scheduler.CosineLRScheduler(
        opt, t_initial=epochs, lr_min=recipe["min_lr"], warmup_t=warmup,
        warmup_lr_init=recipe["warmup_lr"], t_in_epochs=True)
    for epoch in range(epochs):
        if epoch > 0:
            sched.step(epoch)
        assert common.lr_at(epoch, recipe) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)


def test_cosine_per_step_equals_timm_on_updates():
    """sched_per_step: lr at epoch + i / steps == timm's scheduler stepped on updates."""
    recipe = _a3(epochs=4, warmup_epochs=1)
    steps = 10
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe["lr"])
    sched = timm.scheduler.CosineLRScheduler(
        opt, t_initial=4 * steps, lr_min=recipe["min_lr"], warmup_t=steps,
        warmup_lr_init=recipe["warmup_lr"], t_in_epochs=False)
    for update in range(4 * steps):
        sched.step_update(update)
        assert common.lr_at(update / steps, recipe) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-9)


def test_warmup_starts_at_warmup_lr_and_cosine_ends_near_min():
    recipe = _a3()
    assert common.lr_at(0, recipe) == recipe["warmup_lr"]
    assert common.lr_at(5, recipe) == pytest.approx(recipe["lr"] * 0.5 * (1 + math.cos(math.pi * 5 / 100)))
    assert recipe["min_lr"] < common.lr_at(99, recipe) < 1e-5
