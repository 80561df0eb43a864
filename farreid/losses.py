"""ReID losses: label-smoothed cross-entropy, batch-hard triplet and the supervised contrastive term of CLIP-ReID.

References: Szegedy et al. 2016 (label smoothing); Hermans et al., "In Defense of the Triplet Loss" 2017
(batch-hard mining); Khosla et al., "Supervised Contrastive Learning" 2020, as used by Li et al., CLIP-ReID 2023.

Precision: autocast overrides ``.float()`` on the inputs of a matmul, so under bf16 autocast a cosine distance
would carry errors up to ~4e-3 and a logit at scale 100 a relative gradient error of ~0.5%. Every distance and
logit product here therefore runs inside :func:`full_precision` (autocast off, float32 inputs); these are
(B, B) or (B, C) products, negligible beside the backbone. Nothing here reads values back to the host during
training (mining is masked arithmetic), except SupCon's input check on CPU tensors (see farreid.models.checks).
"""

from contextlib import AbstractContextManager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from farreid.models.checks import value_checks


def full_precision(x: torch.Tensor) -> AbstractContextManager:
    """A context in which matmuls on ``x``'s device run in the dtype of their inputs (autocast off)."""
    return torch.autocast(x.device.type, enabled=False)


def scaled_logits(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Float32 ``scale * a @ b.T`` for (Na, D) and (Nb, D) inputs, also under autocast -> (Na, Nb)."""
    with full_precision(a):
        return scale * (a.float() @ b.float().T)


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy against targets smoothed to (1 - epsilon) on the label plus epsilon / C spread over all C.

    Args:
        epsilon: smoothing mass in [0, 1).
    """

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"LabelSmoothingCrossEntropy.epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch of logits (B, C) with integer labels (B,) in [0, C); a scalar."""
        log_probs = logits.float().log_softmax(dim=1)  # (B, C)
        nll = -log_probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)  # (B, 1) -> (B,)
        uniform = -log_probs.mean(dim=1)  # (B,)
        return ((1.0 - self.epsilon) * nll + self.epsilon * uniform).mean()


def pairwise_distance(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances (B, B) between the rows of x (B, D): 1 - cosine similarity, or Euclidean distance."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    with full_precision(x):
        x = x.float()
        if metric == "cosine":
            x = F.normalize(x, dim=1)
            return 1.0 - x @ x.T
        squared = x.pow(2).sum(dim=1)
        d2 = squared[:, None] + squared[None, :] - 2.0 * (x @ x.T)
        return d2.clamp_min(1e-12).sqrt()  # the clamp keeps the gradient finite on the diagonal


class BatchHardTripletLoss(nn.Module):
    """For every anchor: max(0, margin + d(hardest positive) - d(hardest negative)), averaged over anchors.

    Anchors with no positive (other than themselves) or no negative in the batch are left out of the mean; the
    P x K identity sampler makes that rare. If no anchor qualifies the loss is 0 (with a graph, so backward works).

    Args:
        margin: triplet margin (in distance units).
        metric: "cosine" (1 - cosine similarity) or "euclidean".
    """

    def __init__(self, margin: float = 0.3, metric: Literal["cosine", "euclidean"] = "cosine") -> None:
        super().__init__()
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"BatchHardTripletLoss.metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.margin = margin
        self.metric = metric

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of features (B, D) with identity labels (B,); a scalar."""
        dist = pairwise_distance(features, self.metric)  # (B, B)
        same = labels[:, None] == labels[None, :]  # (B, B)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive, negative = same & ~eye, ~same
        hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(dim=1)  # (B,)
        hardest_negative = dist.masked_fill(~negative, float("inf")).amin(dim=1)  # (B,)
        valid = (positive.any(dim=1) & negative.any(dim=1)).float()  # (B,)
        # A masked mean, not boolean indexing: no host sync, and 0 (with a graph) when no anchor qualifies.
        losses = F.relu(self.margin + hardest_positive - hardest_negative) * valid  # no anchor: relu(-inf) = 0
        return losses.sum() / valid.sum().clamp_min(1.0)


class SupConLoss(nn.Module):
    """Supervised contrastive loss from the rows of `features_a` to the rows of `features_b` (CLIP-ReID).

    logits = a @ b.T (the caller normalises and scales, e.g. by CLIP's logit scale); for each row i of `a`, the
    loss is -mean over the positives j (labels_b[j] == labels_a[i]) of log softmax_j(logits[i]). Rows of `a`
    without a positive in `b` are an error: CLIP-ReID always pairs every image with its identity's text.
    """

    def forward(
        self, features_a: torch.Tensor, features_b: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor
    ) -> torch.Tensor:
        """Loss of features_a (Ba, D), features_b (Bb, D), labels_a (Ba,), labels_b (Bb,); a scalar."""
        logits = scaled_logits(features_a, features_b)  # (Ba, Bb) float32
        positive = (labels_a[:, None] == labels_b[None, :]).float()  # (Ba, Bb)
        counts = positive.sum(dim=1)  # (Ba,)
        if value_checks(counts) and bool((counts == 0).any()):
            raise ValueError(f"SupConLoss: {int((counts == 0).sum())} rows of labels_a have no match in labels_b")
        log_prob = logits.log_softmax(dim=1)  # (Ba, Bb)
        return -((positive * log_prob).sum(dim=1) / counts).mean()
