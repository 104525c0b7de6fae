"""Model section: ResNet family against timm's and torchvision's (test-only references)."""
import pytest
import timm
import torch
import torchvision

import common


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_state_dict_loads_and_gives_same_logits(name):
    """timm.create_model(name) weights (random init, no download) load strict into ours and
    give the same logits, eval mode, atol 1e-4 on logits of magnitude ~1."""
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=10).eval()
    # make BN non-trivial so a wrong layer order would show
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    ours = common.create_model(name, num_classes=10).eval()
    common.load_weights(ours, ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_torchvision_state_dict_loads_and_gives_same_logits():
    """torchvision.models.resnet50 weights load strict, same logits (atol 1e-4)."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(num_classes=7).eval()
    ours = common.create_model("resnet50", num_classes=7).eval()
    common.load_weights(ours, ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


PLAIN = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"]


@pytest.mark.parametrize("name", PLAIN)  # the other families: test_model_families.py
def test_parameter_count_and_keys_equal_timm(name):
    ours = common.create_model(name).state_dict()
    ref = timm.create_model(name, pretrained=False).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ours)


def test_model_name_from_state_dict():
    for name in PLAIN:
        sd = {k: v for k, v in common.create_model(name, num_classes=3).state_dict().items()}
        assert common.model_name_from_state_dict(sd) == name


def test_zero_init_last_bn_and_kaiming_init_as_timm():
    model = common.create_model("resnet50")
    for block in model.layer1:
        assert torch.count_nonzero(block.bn3.weight) == 0
        assert torch.all(block.bn2.weight == 1)
    basic = common.create_model("resnet18")
    assert torch.count_nonzero(basic.layer2[1].bn2.weight) == 0
    # kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k))
    w = model.layer4[0].conv2.weight
    assert abs(w.std().item() / (2 / (512 * 9)) ** 0.5 - 1) < 0.05


def test_drop_path_rates_are_linear_per_block_as_timm():
    ref = timm.create_model("resnet50", pretrained=False, drop_path_rate=0.1)
    ref_rates = [b.drop_path.drop_prob if b.drop_path is not None else 0.0
                 for stage in (ref.layer1, ref.layer2, ref.layer3, ref.layer4) for b in stage]
    ours = common.create_model("resnet50", drop_path=0.1)
    rates = [b.drop_path_rate for stage in (ours.layer1, ours.layer2, ours.layer3, ours.layer4)
             for b in stage]
    assert rates == pytest.approx(ref_rates)
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.1)


def test_drop_path_keeps_expectation_and_drops_whole_samples():
    torch.manual_seed(0)
    x = torch.ones(20000, 3, 2, 2)
    y = common.drop_path(x, 0.2, training=True)
    per_sample = y.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1.25).all(1))
    assert abs(y.mean().item() - 1.0) < 0.02
    assert torch.equal(common.drop_path(x, 0.2, training=False), x)


def test_dropout_before_classifier_only_in_training():
    model = common.create_model("resnet18", num_classes=5, dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        a = model(x)
        b = model(x)
    assert not torch.allclose(a, b)


def test_wrong_checkpoint_is_one_line_error():
    ours = common.create_model("resnet18")
    other = common.create_model("resnet50").state_dict()
    with pytest.raises(common.UserError) as e:
        common.load_weights(ours, other, "checkpoint x.pth")
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint x.pth does not fit" in msg and "unexpected keys" in msg and "shape mismatch" in msg


def test_module_prefix_is_stripped():
    model = common.create_model("resnet18", num_classes=3)
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    common.load_weights(common.create_model("resnet18", num_classes=3), sd)
