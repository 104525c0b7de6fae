"""Loss section against timm.loss (BinaryCrossEntropy, SoftTargetCrossEntropy,
LabelSmoothingCrossEntropy); tolerance 1e-6."""
import pytest
import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import common


@pytest.fixture
def batch():
    torch.manual_seed(0)
    logits = torch.randn(8, 10) * 3
    target = torch.randint(0, 10, (8,))
    soft = torch.softmax(torch.randn(8, 10), -1)
    return logits, target, soft


@pytest.mark.parametrize("smoothing,thresh", [(0.0, None), (0.1, None), (0.0, 0.2), (0.1, 0.2)])
def test_bce_hard_targets(batch, smoothing, thresh):
    logits, target, _ = batch
    ref = BinaryCrossEntropy(smoothing=smoothing, target_threshold=thresh)(logits, target)
    ours = common.binary_cross_entropy(logits, target, smoothing, thresh)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("thresh", [None, 0.2])
def test_bce_soft_targets(batch, thresh):
    logits, _, soft = batch
    ref = BinaryCrossEntropy(target_threshold=thresh)(logits, soft)
    ours = common.binary_cross_entropy(logits, soft, 0.0, thresh)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_bce_threshold_changes_the_loss(batch):
    logits, _, soft = batch
    assert not torch.allclose(common.binary_cross_entropy(logits, soft, 0.0, 0.2),
                              common.binary_cross_entropy(logits, soft, 0.0, None))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_label_smoothing(batch, smoothing):
    logits, target, _ = batch
    if smoothing:
        ref = LabelSmoothingCrossEntropy(smoothing)(logits, target)
    else:
        ref = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(common.cross_entropy(logits, target, smoothing), ref,
                               atol=1e-6, rtol=1e-6)


def test_ce_soft_targets(batch):
    logits, _, soft = batch
    torch.testing.assert_close(common.cross_entropy(logits, soft), SoftTargetCrossEntropy()(logits, soft),
                               atol=1e-6, rtol=1e-6)
