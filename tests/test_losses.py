"""Losses against closed forms, hand-computed fixtures and brute-force loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from farreid.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropy, SupConLoss


def test_label_smoothing_closed_form():
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 6, 3, 1])
    eps = 0.1
    log_p = logits.log_softmax(dim=1)
    target = torch.full((5, 7), eps / 7) + (1 - eps) * F.one_hot(labels, 7)
    expected = -(target * log_p).sum(dim=1).mean()
    torch.testing.assert_close(LabelSmoothingCrossEntropy(eps)(logits, labels), expected)
    torch.testing.assert_close(LabelSmoothingCrossEntropy(0.0)(logits, labels), F.cross_entropy(logits, labels))
    # uniform logits: the loss is log C whatever the smoothing
    torch.testing.assert_close(
        LabelSmoothingCrossEntropy(eps)(torch.zeros(2, 7), labels[:2]), torch.tensor(math.log(7))
    )
    with pytest.raises(ValueError, match="epsilon"):
        LabelSmoothingCrossEntropy(1.0)


def test_triplet_hand_computed_euclidean():
    # a0=(0,0), a1=(1,0) are identity 0; b0=(0,2), b1=(3,0) identity 1. Anchors of identity 0 satisfy the margin;
    # each anchor of identity 1 has hardest positive sqrt(13) and hardest negative 2.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    expected = 2 * (0.3 + math.sqrt(13) - 2) / 4
    torch.testing.assert_close(BatchHardTripletLoss(0.3, "euclidean")(x, labels), torch.tensor(expected))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_triplet_matches_brute_force(metric):
    torch.manual_seed(0)
    x = torch.randn(9, 5)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # identity 3 has no positive: left out

    def dist(i: int, j: int) -> float:
        if metric == "cosine":
            return 1.0 - float(x[i] @ x[j] / (x[i].norm() * x[j].norm()))
        return float((x[i] - x[j]).norm())

    terms = []
    for i in range(9):
        pos = [dist(i, j) for j in range(9) if j != i and labels[j] == labels[i]]
        neg = [dist(i, j) for j in range(9) if labels[j] != labels[i]]
        if pos and neg:
            terms.append(max(0.0, 0.3 + max(pos) - min(neg)))
    loss = BatchHardTripletLoss(0.3, metric)(x.requires_grad_(), labels)
    torch.testing.assert_close(loss, torch.tensor(sum(terms) / len(terms)), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_triplet_without_any_valid_anchor_is_zero_and_differentiable():
    x = torch.randn(3, 4, requires_grad=True)
    loss = BatchHardTripletLoss()(x, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros(3, 4))


def test_supcon_hand_computed_fixture():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # logits rows [1, 0, 1] and [0, 1, 1]; row 0's positives are columns 0 and 2, row 1's column 1:
    # every positive has log-probability 1 - log(1 + 2e).
    loss = SupConLoss()(a, b, torch.tensor([0, 1]), torch.tensor([0, 1, 0]))
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + 2 * math.e) - 1))


def test_supcon_matches_brute_force_and_rejects_unmatched_rows():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3), torch.randn(6, 3)
    labels_a, labels_b = torch.tensor([0, 1, 1, 2, 0]), torch.tensor([1, 0, 2, 2, 1, 3])
    rows = []
    for i in range(5):
        logits = [float(a[i] @ b[j]) for j in range(6)]
        log_z = math.log(sum(math.exp(v) for v in logits))
        pos = [logits[j] - log_z for j in range(6) if labels_b[j] == labels_a[i]]
        rows.append(-sum(pos) / len(pos))
    loss = SupConLoss()(a, b, labels_a, labels_b)
    torch.testing.assert_close(loss, torch.tensor(sum(rows) / 5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no match"):
        SupConLoss()(a, b, torch.tensor([0, 1, 1, 2, 9]), labels_b)
