"""RMSpropTF, AdamP, AGC, tv weight-decay groups and create_optimizer against timm (float64)."""
import math

import pytest
import timm.optim
import timm.utils.agc
import torch
import torch.nn.functional as F
from timm.models import model_parameters

import common
from common import AdamP, RMSpropTF, agc, create_optimizer, head_excluded, tv_param_groups

TOL = dict(rtol=1e-9, atol=1e-12)  # float64 throughout; observed differences are ~1e-15


def _tensors(seed=0):
    """A ResNet-ish parameter set: 4-D convs, 1-D BN weights/biases, fc weight and bias."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (8,), (8,), (16, 8, 3, 3), (16,), (16,), (16, 8, 1, 1), (5, 16), (5,)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _pair(seed=0):
    """The same parameters twice (ours, reference), with and without weight decay groups."""
    base = _tensors(seed)
    a = [torch.nn.Parameter(t.clone()) for t in base]
    b = [torch.nn.Parameter(t.clone()) for t in base]
    return a, b


def _groups(params, wd):
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=wd),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]


def _views(p, g):
    """Which view timm's AdamP projects in for this (param, grad): 'channel', 'layer' or None."""
    for name, view in (("channel", lambda x: x.reshape(x.size(0), -1)),
                       ("layer", lambda x: x.reshape(1, -1))):
        cos = F.cosine_similarity(view(g), view(p), dim=1, eps=1e-8).abs()
        if cos.max() < 0.1 / math.sqrt(view(p).size(1)):
            return name
    return None


def _with_cos(g, p, c, rows):
    """g turned, per row of the (rows, -1) view, to cosine c with p (keeping its norm)."""
    gv, pv = g.reshape(rows, -1), p.reshape(rows, -1)
    ortho = gv - pv * (gv * pv).sum(1, keepdim=True) / pv.square().sum(1, keepdim=True)
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    out = (math.sqrt(1 - c * c) * unit(ortho) + c * unit(pv)) * gv.norm(dim=1, keepdim=True)
    return out.reshape(g.shape)


def _adamp_grads(params, step, gen):
    """Random gradients, some turned nearly orthogonal to their weight per channel (projected in
    the channel view) or only over the whole tensor (layer view), some just either side of the
    thresholds delta / sqrt(fan-in) and delta / sqrt(numel), the rest generic (neither).
    Returns the gradients and the view timm must take for each: 'channel', 'layer' or None."""
    grads, want = [], []
    for i, p in enumerate(params):
        p = p.detach()
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        view = None
        if i == 0:  # conv followed by BN: gradient orthogonal to each filter
            g, view = _with_cos(g, p, 0.0, p.shape[0]), "channel"
        elif i == 3 and step % 2 == 0:  # orthogonal only as a whole
            g, view = _with_cos(g, p, 0.0, 1), "layer"
        elif i == 3:  # whole-tensor cos 0.01: below 0.1 / sqrt(fan-in 72), above 0.1 / sqrt(576)
            g = _with_cos(g, p, 0.01, 1)
        elif i == 6 and step % 2:  # every channel at cos 0.02 < 0.1 / sqrt(fan-in 8) = 0.035
            g, view = _with_cos(g, p, 0.02, p.shape[0]), "channel"
        grads.append(g)
        want.append(view if p.ndim > 1 else "1-D")
    return grads, want


@pytest.mark.parametrize("momentum,eps", [(0.9, 1e-3), (0.0, 1e-10), (0.9, 1e-10)])
def test_rmsproptf_equals_timm(momentum, eps):
    """Same groups (decay on ndim > 1 only), 10 steps with an lr change half way (lr lives in
    the momentum buffer): parameters and state equal to 1e-9."""
    ours_p, ref_p = _pair()
    ours = RMSpropTF(_groups(ours_p, 1e-2), lr=0.05, alpha=0.9, eps=eps, momentum=momentum)
    ref = timm.optim.RMSpropTF(_groups(ref_p, 1e-2), lr=0.05, alpha=0.9, eps=eps,
                               momentum=momentum)
    gen = torch.Generator().manual_seed(1)
    for step in range(10):
        if step == 5:
            for opt in (ours, ref):
                for group in opt.param_groups:
                    group["lr"] = 0.02
        for p, q in zip(ours_p, ref_p):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, **TOL)
        torch.testing.assert_close(ours.state[p]["square_avg"], ref.state[q]["square_avg"], **TOL)
        if momentum:
            torch.testing.assert_close(ours.state[p]["momentum_buffer"],
                                       ref.state[q]["momentum_buffer"], **TOL)
    assert not torch.equal(ours_p[0], _tensors()[0])


@pytest.mark.parametrize("nesterov", [True, False])
def test_adamp_equals_timm(nesterov):
    """timm's factory settings (wd_ratio 0.01, delta 0.1, eps 1e-8): channel-view, layer-view
    and unprojected weights all occur; one tensor without a gradient for two steps (per-tensor
    step counts); parameters and moments equal to 1e-9."""
    ours_p, ref_p = _pair()
    ours = AdamP(_groups(ours_p, 0.05), lr=0.01, eps=1e-8, wd_ratio=0.01, delta=0.1,
                 nesterov=nesterov)
    ref = timm.optim.AdamP(_groups(ref_p, 0.05), lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                           wd_ratio=0.01, delta=0.1, nesterov=nesterov)
    gen = torch.Generator().manual_seed(2)
    seen = set()
    for step in range(10):
        grads, want = _adamp_grads(ours_p, step, gen)
        for i, (p, q, g, view) in enumerate(zip(ours_p, ref_p, grads, want)):
            if i == 7 and step in (2, 3):  # fc weight: no gradient these steps
                p.grad = q.grad = None
                continue
            p.grad, q.grad = g.clone(), g.clone()
            if p.ndim > 1:
                assert _views(p.detach(), g) == view, (i, step)
            seen.add(view)
        ours.step()
        ref.step()
    assert seen == {"channel", "layer", None, "1-D"}
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, **TOL)
        assert ours.state[p]["step"] == ref.state[q]["step"]
        torch.testing.assert_close(ours.state[p]["exp_avg"], ref.state[q]["exp_avg"], **TOL)
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], **TOL)
    assert ours.state[ours_p[7]]["step"] == 8


def test_adamp_channels_last_weight():
    """A channels_last conv weight (as train.py uses on CUDA) steps like a contiguous one."""
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    g = _with_cos(torch.randn(8, 4, 3, 3, dtype=torch.float64), w, 0.0, 8)
    a = torch.nn.Parameter(w.clone())
    b = torch.nn.Parameter(w.clone().to(memory_format=torch.channels_last))
    a.grad, b.grad = g.clone(), g.clone().to(memory_format=torch.channels_last)
    assert _views(w, g) == "channel"
    for p in (a, b):
        opt = AdamP([p], lr=0.1, weight_decay=0.1)
        opt.step()
        opt.step()
    torch.testing.assert_close(a, b, **TOL)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        # no BN after the biased conv: its bias gradient would be rounding noise, which Adam
        # blows up to full-size steps, so two correct implementations would drift apart
        torch.nn.Conv2d(8, 8, 3, bias=True), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)).double()


def _recipe(**kw):
    return dict(dict(opt="sgd", lr=0.1, weight_decay=0.01, momentum=0.9, nesterov=None,
                     opt_eps=None, opt_betas=None, wd_groups="timm"), **kw)


# each: our recipe, then what timm's train.py hands create_optimizer_v2 for it
CASES = {
    "rmsproptf": (_recipe(opt="rmsproptf", lr=0.01, weight_decay=1e-3, opt_eps=1e-3),
                  dict(opt="rmsproptf", lr=0.01, weight_decay=1e-3, momentum=0.9, eps=1e-3)),
    "rmsproptf-default-eps": (_recipe(opt="rmsproptf", lr=0.01, weight_decay=1e-3),
                              dict(opt="rmsproptf", lr=0.01, weight_decay=1e-3, momentum=0.9)),
    "adamp": (_recipe(opt="adamp", lr=0.01, weight_decay=0.05, momentum=None, nesterov=True,
                      opt_eps=1e-8, opt_betas=[0.9, 0.999]),
              dict(opt="adamp", lr=0.01, weight_decay=0.05, momentum=0.9, eps=1e-8,
                   betas=(0.9, 0.999))),
    "sgd-nesterov": (_recipe(opt="sgd", nesterov=True),
                     dict(opt="sgd", lr=0.1, weight_decay=0.01, momentum=0.9)),
    "lamb": (_recipe(opt="lamb", lr=5e-3, weight_decay=0.02, opt_eps=1e-6,
                     opt_betas=[0.9, 0.999]),
             dict(opt="lamb", lr=5e-3, weight_decay=0.02, momentum=0.9, eps=1e-6,
                  betas=(0.9, 0.999))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_create_optimizer_equals_timm_factory(case):
    """create_optimizer(recipe) vs timm.optim.create_optimizer_v2 with the same values
    (filter_bias_and_bn): same per-parameter weight decay and hyper-parameters, and the same
    trajectory over 8 forward/backward steps (BN in train mode: AdamP projects the convs)."""
    recipe, timm_kw = CASES[case]
    ours_model, ref_model = _model(), _model()
    ours = create_optimizer(ours_model, recipe)
    ref = timm.optim.create_optimizer_v2(ref_model, filter_bias_and_bn=True, **timm_kw)
    assert type(ours).__name__ == type(ref).__name__

    def per_param(opt, model):
        index = {id(p): n for n, p in model.named_parameters()}
        keys = ("lr", "weight_decay", "momentum", "nesterov", "eps", "alpha", "betas",
                "wd_ratio", "delta")
        return {index[id(p)]: {k: g[k] for k in keys if k in g}
                for g in opt.param_groups for p in g["params"]}

    a, b = per_param(ours, ours_model), per_param(ref, ref_model)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].items() <= b[name].items(), (name, a[name], b[name])
    assert a["0.weight"]["weight_decay"] == recipe["weight_decay"]
    assert a["3.bias"]["weight_decay"] == 0 and a["1.weight"]["weight_decay"] == 0
    assert a["6.weight"]["weight_decay"] == recipe["weight_decay"]
    torch.manual_seed(1)
    for _ in range(8):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            model(x).square().mean().backward()
            if model is ref_model:  # scale-invariant conv before BN: AdamP's channel view
                assert _views(model[0].weight.detach(), model[0].weight.grad) == "channel"
            opt.step()
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def test_create_optimizer_sgd_takes_nesterov_from_recipe_and_rejects_unknown():
    model = _model()
    assert create_optimizer(model, _recipe(nesterov=False)).param_groups[0]["nesterov"] is False
    assert create_optimizer(model, _recipe(nesterov=True)).defaults["foreach"] is True
    assert create_optimizer(model, _recipe(opt="adamp", momentum=None)).defaults["nesterov"]
    for bad in (dict(opt="adamw"), dict(wd_groups="none"), dict(momentum=None)):
        with pytest.raises(common.UserError) as e:
            create_optimizer(model, _recipe(**bad))
        assert "\n" not in str(e.value)


def _agc_tensors():
    """Weights and gradients whose unit ratios |g| / (0.05 max(|w|, 1e-3)) straddle 1: rows
    scaled over four decades, a zero weight (eps floor), a zero gradient row."""
    params = [torch.nn.Parameter(t) for t in _tensors(3)]
    params[4].data.zero_()
    gen = torch.Generator().manual_seed(4)
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        scale = torch.logspace(-3, 1, p.shape[0] if p.ndim > 1 else 1, dtype=torch.float64)
        p.grad = g * (scale.view(-1, *[1] * (p.ndim - 1)) if p.ndim > 1 else scale)
    params[3].grad[2].zero_()
    params[8].grad = None
    return params


def test_agc_equals_timm_with_clipped_and_unclipped_units():
    ours, ref = _agc_tensors(), _agc_tensors()
    before = [None if p.grad is None else p.grad.clone() for p in ours]
    agc(ours, 0.05)
    timm.utils.agc.adaptive_clip_grad(ref, 0.05)
    clipped = kept = 0
    for p, q, g0 in zip(ours, ref, before):
        if g0 is None:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, q.grad, **TOL)
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        changed = (p.grad != g0).flatten(1).any(1) if p.ndim > 1 else (p.grad != g0).any()[None]
        clipped += int(changed.sum())
        kept += int((~changed).sum())
        if dims is not None:  # clipped units end exactly at the max
            mx = torch.linalg.vector_norm(p.detach(), dim=dims).clamp(min=1e-3) * 0.05
            torch.testing.assert_close(torch.linalg.vector_norm(p.grad, dim=dims)[changed],
                                       mx[changed], **TOL)
    assert clipped > 5 and kept > 5


def test_head_excluded_equals_timm_and_is_the_fc():
    model = common.create_model("resnet18", num_classes=7)
    ours = head_excluded(model)
    ref = model_parameters(model, exclude_head=True)
    assert [id(p) for p in ours] == [id(p) for p in ref]
    left = {id(p) for p in model.parameters()} - {id(p) for p in ours}
    assert left == {id(model.fc.weight), id(model.fc.bias)}


def test_tv_param_groups_exempt_norm_layers_only():
    """tv set_weight_decay(norm_weight_decay=0): BN / GN / LN / InstanceNorm weights and biases
    get 0; conv and fc weights and biases keep the decay."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=True), torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(2, 8),
        torch.nn.InstanceNorm2d(8, affine=True), torch.nn.SyncBatchNorm(8),
        torch.nn.Flatten(), torch.nn.LayerNorm(8 * 6 * 6), torch.nn.Linear(8 * 6 * 6, 5))
    model[3].weight.requires_grad_(False)  # frozen: in no group, as tv
    groups = tv_param_groups(model, 2e-5)
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = {n: wd.get(id(p)) for n, p in model.named_parameters()}
    assert names == {"0.weight": 2e-5, "0.bias": 2e-5, "1.weight": 0.0, "1.bias": 0.0,
                     "2.weight": 0.0, "2.bias": 0.0, "3.weight": None, "3.bias": 0.0,
                     "4.weight": 0.0, "4.bias": 0.0, "6.weight": 0.0, "6.bias": 0.0,
                     "7.weight": 2e-5, "7.bias": 2e-5}
    assert [g["weight_decay"] for g in groups] == [2e-5, 0.0]
    single = tv_param_groups(model, 2e-5, norm_weight_decay=None)
    assert len(single) == 1 and len(single[0]["params"]) == 13
    opt = create_optimizer(model, _recipe(wd_groups="tv", weight_decay=2e-5))
    sizes = [(g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    assert sizes == [(2e-5, 4), (0.0, 9)]
    # wd_groups "all" (tv's train.py without --norm-weight-decay: the blog's baseline): every
    # trainable parameter, norm layers and biases included, with the decay
    opt = create_optimizer(model, _recipe(wd_groups="all", weight_decay=1e-4))
    assert [(g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [(1e-4, 13)]


@pytest.mark.parametrize("cls,kw", [(RMSpropTF, dict(momentum=0.9)), (AdamP, {})])
def test_state_dict_roundtrip(cls, kw):
    model = _model()
    opt = cls(common.param_groups(model, 0.01), lr=1e-3, **kw)
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    other = cls(common.param_groups(model, 0.01), lr=1e-3, **kw)
    other.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(other.state[p][k]), torch.as_tensor(v))
