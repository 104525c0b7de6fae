"""Model families beyond the plain ResNet (ResNet-D, SE-ResNet, ResNeXt, Wide ResNet, ResNet-RS)
against timm's and torchvision's (test-only references, random init, nothing downloaded).

Layout-only checks (keys, shapes, parameter counts, drop path rates, name detection) build on the
meta device, which costs no memory and no init, so even ResNet-RS-420 (192M parameters) is
cheap there; logits are compared in float64 after randomising timm's BN statistics and gammas (its
zero-initialised last gammas would make every residual branch vanish and the comparison pass for
any block)."""
import functools

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common import (MODELS, BasicBlock, Bottleneck, ResNet, SqueezeExcite, UserError,
                       create_model, load_weights, model_name_from_state_dict)

NEW = ["resnet50d", "seresnet50", "resnext50_32x4d", "wide_resnet50_2", "resnetrs50",
       "resnetrs101", "resnetrs152", "resnetrs200", "resnetrs270", "resnetrs350", "resnetrs420"]
# RS-200 to RS-420 only differ from RS-152 in blocks per stage, which the layout checks pin;
# building and running them as well would add ~15 s to a ~30 s file on 2 threads
DEEP_RS = {"resnetrs200", "resnetrs270", "resnetrs350", "resnetrs420"}
TORCHVISION = ["resnet50", "resnext50_32x4d", "wide_resnet50_2"]


def on_meta(build, *args, **kwargs):
    with torch.device("meta"):
        return build(*args, **kwargs)


# built once per run: the layout tests below share them
@functools.lru_cache(maxsize=None)
def meta_ours(name):
    return on_meta(create_model, name, drop_path=0.2)


@functools.lru_cache(maxsize=None)
def meta_timm(name):
    return on_meta(timm.create_model, name, pretrained=False, drop_path_rate=0.2)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def loaded_pair(name, ref, **kwargs):
    """ref with random BN, ours with ref's weights (strict), both float64 in eval mode."""
    randomise_bn(ref)
    ours = create_model(name, num_classes=ref.fc.out_features, **kwargs)
    load_weights(ours, ref.state_dict(), f"{name} reference")
    return ours.double().eval(), ref.double().eval()


def blocks(model):
    return [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]


@pytest.mark.parametrize("name", ["resnet50"] + NEW)
def test_keys_shapes_and_parameter_count_equal_timm(name):
    ours, ref = meta_ours(name), meta_timm(name)
    own, theirs = ours.state_dict(), ref.state_dict()
    assert list(own) == list(theirs)
    assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in theirs.items()}
    assert n_params(ours) == n_params(ref)
    print(f"{name}: {n_params(ours):,} parameters")


def test_resnetrs50_has_the_published_size():
    """Bello et al. 2021 (Revisiting ResNets) list ResNet-RS-50 at 35.7M parameters."""
    assert round(n_params(on_meta(create_model, "resnetrs50")) / 1e6, 1) == 35.7


@pytest.mark.parametrize("name", ["resnet50"] + [n for n in NEW if n not in DEEP_RS])
def test_timm_weights_load_strict_and_give_same_logits(name):
    """float64 at assert_close's float64 tolerances (rtol 1e-7, atol 1e-7); 40 px makes the
    stage 3 and 4 shortcuts of the avg-down models pool odd maps (5x5 and 3x3)."""
    torch.manual_seed(0)
    ours, ref = loaded_pair(name, timm.create_model(name, pretrained=False, num_classes=10))
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, ref(x))
        # the comparison sees the residual branches: a 10% change of one gamma shows
        blocks(ours)[0].bn3.weight.mul_(1.1)
        assert not torch.allclose(ours(x), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_weights_load_strict_and_give_same_logits(name):
    build = getattr(torchvision.models, name)
    assert n_params(on_meta(build)) == n_params(on_meta(create_model, name))
    torch.manual_seed(0)
    ours, ref = loaded_pair(name, build(weights=None, num_classes=10))
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_model_name_from_state_dict_round_trips(name):
    """From ours, timm's (where timm has the model: not RS Table 1's seresnet200_rs) and
    torchvision's (where it has it, with 7 classes)."""
    assert model_name_from_state_dict(meta_ours(name).state_dict()) == name
    if timm.is_model(name):
        assert model_name_from_state_dict(meta_timm(name).state_dict()) == name
    else:
        assert name == "seresnet200_rs"
    if hasattr(torchvision.models, name):
        tv = on_meta(getattr(torchvision.models, name), num_classes=7)
        assert model_name_from_state_dict(tv.state_dict()) == name


@pytest.mark.parametrize("options", [
    dict(se_ratio=0.25),                   # SE-ResNet-50 with the RS ratio: SE shapes differ
    dict(stem="deep"),                     # ResNet-50-C: deep stem, plain shortcuts
    dict(stem="deep", stem_pool="conv", avg_down=True),  # ResNet-RS-50 without SE
    dict(groups=32, base_width=8),         # ResNeXt-50 32x8d: conv2 shapes differ
    dict(base_width=128, se_ratio=1 / 16),
])
def test_model_name_from_state_dict_refuses_near_misses(options):
    sd = on_meta(ResNet, Bottleneck, (3, 4, 6, 3), **options).state_dict()
    with pytest.raises(UserError) as e:
        model_name_from_state_dict(sd)
    assert "\n" not in str(e.value) and "resnet50d" in str(e.value)


@pytest.mark.parametrize("name", ["resnet50s", "seresnext50_32x4d", "ecaresnet50d", "resnet26d"])
def test_model_name_from_state_dict_refuses_other_timm_resnets(name):
    with pytest.raises(UserError):
        model_name_from_state_dict(on_meta(timm.create_model, name, pretrained=False).state_dict())


@pytest.mark.parametrize("name", NEW)
def test_drop_path_rates_per_block_as_timm(name):
    ref_rates = [b.drop_path.drop_prob if b.drop_path is not None else 0.0
                 for b in blocks(meta_timm(name))]
    rates = [b.drop_path_rate for b in blocks(meta_ours(name))]
    assert rates == pytest.approx(ref_rates)
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("channels, ratio", [(256, 1 / 16), (64, 1 / 16), (200, 0.25),
                                             (116, 0.25), (2048, 0.25)])
def test_squeeze_excite_width_and_output_as_timm(channels, ratio):
    """timm rounds channels * ratio to the nearest multiple of 8, at least 8 (64 / 16 -> 8,
    200 / 4 -> 48, 116 / 4 -> 32); every model in MODELS lands on a multiple already."""
    torch.manual_seed(0)
    ref = timm.layers.SEModule(channels, rd_ratio=ratio).double()
    ours = SqueezeExcite(channels, ratio).double()
    load_weights(ours, ref.state_dict(), "timm SEModule")
    x = torch.randn(2, channels, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("name", ["resnet50d", "seresnet50", "resnext50_32x4d", "resnetrs50"])
def test_zero_init_of_the_last_bn_as_timm(name):
    ours = create_model(name)
    for b in blocks(ours):
        assert torch.count_nonzero(b.bn3.weight) == 0
        assert torch.all(b.bn1.weight == 1) and torch.all(b.bn2.weight == 1)
        if b.se is not None:  # SE keeps its kaiming weights: a zero gate input would be 0.5
            assert b.se.fc1.weight.abs().sum() > 0 and b.se.fc2.weight.abs().sum() > 0
    # the same BN gammas are zero in timm's init (stem, shortcut and stem-pool BNs stay at one)
    own = ours.state_dict()
    ref = timm.create_model(name, pretrained=False).state_dict()
    # and every conv, SE's included, has timm's kaiming fan_out scale (std within 15%; the
    # smallest, the stem's first conv, has 864 weights: ~2.4% sampling error)
    for k, v in own.items():
        if v.ndim == 4:
            assert abs(v.std().item() / ref[k].std().item() - 1) < 0.15, k
    bn = [k[:-len(".running_var")] for k in own if k.endswith(".running_var")]
    assert [k for k in bn if torch.all(own[f"{k}.weight"] == 0)] == \
        [k for k in bn if torch.all(ref[f"{k}.weight"] == 0)] == \
        [f"layer{i + 1}.{j}.bn3" for i, n in enumerate(MODELS[name][1]) for j in range(n)]


def test_training_forward_with_drop_path_equals_timm():
    """Same seed, same masks: pins the rates, the mask draws and SE before drop path (the SE of
    a rescaled branch differs)."""
    torch.manual_seed(0)
    ref = timm.create_model("resnetrs50", pretrained=False, num_classes=10, drop_path_rate=0.3)
    ours, ref = loaded_pair("resnetrs50", ref, drop_path=0.3)
    ours.train()
    ref.train()
    x = torch.randn(4, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)
        out = ours(x)
        torch.manual_seed(1)
        torch.testing.assert_close(out, ref(x))
        torch.manual_seed(2)
        assert not torch.allclose(ours(x), out)


def test_avg_down_pool_averages_only_the_pixels_inside_an_odd_map():
    model = create_model("resnet50d")
    assert isinstance(model.layer1[0].downsample[0], nn.Identity)  # stride 1: conv only
    pool = model.layer3[0].downsample[0]
    x = torch.randn(1, 512, 9, 9)
    y = pool(x)
    assert y.shape[-2:] == (5, 5)  # as the main path's strided 3x3 conv: 9 -> 5
    torch.testing.assert_close(y[..., 0, 0], x[..., :2, :2].mean((-2, -1)))
    torch.testing.assert_close(y[..., 4, 0], x[..., 8, :2].mean(-1))  # edge pair: / 2, not / 4
    torch.testing.assert_close(y[..., 4, 4], x[..., 8, 8])  # lone corner: / 1, not / 4
    # PyTorch clips ceil_mode's edge windows to the input before taking the divisor, so at
    # padding 0 count_include_pad=False (kept, as timm) changes nothing; the divisor is what matters
    assert torch.equal(F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=True), y)


def test_odd_maps_are_where_the_edge_divisor_shows_in_the_logits():
    """A shortcut pool that divides edge windows by 4 (zero padding counted) gives timm's logits
    at 32 px (maps 8, 4, 2: even) and other logits at 40 px (maps 10, 5, 3)."""
    torch.manual_seed(0)
    ours, ref = loaded_pair("resnet50d", timm.create_model("resnet50d", num_classes=10))
    odd = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    even = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(odd), ref(odd))
        for stage in (ours.layer2, ours.layer3, ours.layer4):
            stage[0].downsample[0] = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                                   nn.AvgPool2d(2, 2))
        torch.testing.assert_close(ours(even), ref(even))
        assert not torch.allclose(ours(odd), ref(odd), rtol=1e-6, atol=1e-6)


def test_block_options_the_layouts_do_not_have_are_refused():
    with pytest.raises(ValueError):
        ResNet(BasicBlock, (2, 2, 2, 2), groups=32)
    with pytest.raises(ValueError):
        ResNet(Bottleneck, (3, 4, 6, 3), stem="tiered")
    with pytest.raises(UserError):
        create_model("resnet50e")


def test_zero_init_last_false_keeps_every_gamma_at_one():
    """tv's recipe (zero_init_residual=False) and eval.py, positionally as common.py passes it."""
    model = create_model("resnetrs50", 10, 0.0, 0.0, False)
    gammas = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(g == 1) for g in gammas)


def test_se_resnet200_with_the_plain_stem_is_timms_resnet_with_rs_se():
    """RS Table 1 row 9 (seresnet200_rs): timm's ResNet with Bottleneck (3, 24, 36, 3) and
    resnetrs200's SE (get_attn('se'), rd_ratio 1/4) but the plain stem, max pool and
    shortcuts: the same keys, shapes and parameter count."""
    from timm.layers import get_attn
    from timm.models.resnet import Bottleneck as TimmBottleneck, ResNet as TimmResNet
    ours = on_meta(create_model, "seresnet200_rs")
    ref = on_meta(TimmResNet, block=TimmBottleneck, layers=(3, 24, 36, 3), block_args=dict(
        attn_layer=functools.partial(get_attn("se"), rd_ratio=0.25)))
    own, theirs = ours.state_dict(), ref.state_dict()
    assert list(own) == list(theirs)
    assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in theirs.items()}
    assert n_params(ours) == n_params(ref)
    assert own["conv1.weight"].shape == (64, 3, 7, 7)  # the plain stem
    assert n_params(ours) < n_params(on_meta(create_model, "resnetrs200"))

