"""Temporal pooling with padding masks, and the BNNeck head."""

import pytest
import torch

from farreid.models.heads import BNNeck
from farreid.models.pooling import MeanPooling, TemporalAttentionPooling

MASK = torch.tensor([[True, True, True, True], [True, True, False, False], [True, False, False, False]])


def masked_mean_loop(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[b][mask[b]].mean(dim=0) for b in range(len(x))])


def poolers() -> list[torch.nn.Module]:
    return [MeanPooling(6), TemporalAttentionPooling(6), TemporalAttentionPooling(6, hidden=5)]


@pytest.mark.parametrize("index", range(3))
def test_masked_mean_at_init_and_padding_ignored(index):
    torch.manual_seed(0)
    pool = poolers()[index]
    x = torch.randn(3, 4, 6)
    pooled, weights = pool(x, MASK)
    torch.testing.assert_close(pooled, masked_mean_loop(x, MASK))
    torch.testing.assert_close(weights, MASK.float() / MASK.sum(1, keepdim=True))
    unmasked, _ = pool(x, None)
    torch.testing.assert_close(unmasked, x.mean(dim=1))


@pytest.mark.parametrize("index", range(3))
def test_changing_a_padded_frame_changes_nothing(index):
    torch.manual_seed(0)
    pool = poolers()[index]
    with torch.no_grad():  # a trained-looking score, so attention pooling is no longer the mean
        for param in pool.parameters():
            param.normal_()
    x = torch.randn(3, 4, 6)
    changed = x.clone()
    changed[~MASK] = torch.randn(int((~MASK).sum()), 6) * 100.0
    pooled, weights = pool(x, MASK)
    pooled_changed, _ = pool(changed, MASK)
    torch.testing.assert_close(pooled_changed, pooled, rtol=0, atol=0)
    assert torch.equal(weights[~MASK], torch.zeros(int((~MASK).sum())))


def test_attention_pooling_matches_softmax_reference():
    torch.manual_seed(0)
    pool = TemporalAttentionPooling(6)
    with torch.no_grad():
        pool.score.weight.normal_()
        pool.score.bias.fill_(0.3)
    x = torch.randn(3, 4, 6)
    with torch.no_grad():
        pooled, weights = pool(x, MASK)
    for b in range(3):
        scores = torch.tensor([float(pool.score.weight.detach()[0] @ x[b, t]) + 0.3 for t in range(4) if MASK[b, t]])
        expected = scores.exp() / scores.exp().sum()
        torch.testing.assert_close(weights[b][MASK[b]], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[b], (expected[:, None] * x[b][MASK[b]]).sum(0), rtol=1e-5, atol=1e-6)


def test_attention_score_learns_at_init_and_bad_masks_fail():
    torch.manual_seed(0)
    pool = TemporalAttentionPooling(6)
    x = torch.randn(3, 4, 6)
    pooled, _ = pool(x, MASK)
    (pooled * torch.randn_like(pooled)).sum().backward()
    assert pool.score.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no real frame"):
        pool(x, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        pool(x, MASK[:, :3])


def test_bnneck_shapes_init_and_frozen_bias():
    torch.manual_seed(0)
    head = BNNeck(32, 50)
    x = torch.randn(8, 32) * 3.0 + 1.0
    features, logits = head(x)
    assert features.shape == (8, 32) and logits.shape == (8, 50)
    assert head.classifier.bias is None and not head.bn.bias.requires_grad
    assert 0.0008 < float(head.classifier.weight.detach().std()) < 0.0012  # normal init, std 0.001 (1600 samples)
    # training mode: batch statistics (biased variance), affine weight 1, frozen bias 0
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + head.bn.eps)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, features @ head.classifier.weight.T)
    (features.sum() + logits.sum()).backward()
    assert head.bn.bias.grad is None and head.bn.weight.grad is not None
