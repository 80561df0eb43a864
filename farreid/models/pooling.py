"""Temporal pooling of per-frame features into one clip feature, ignoring padded frames.

Both poolers take the per-frame features (B, T, D) and a padding mask (B, T) (True = real frame, False = a
repeated copy added to reach T frames) and return the pooled feature (B, D) with the frame weights (B, T).
"""

import torch
from torch import nn

from farreid.models.checks import value_checks


def _check_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate the inputs and return a (B, T) bool mask (all True when `mask` is None)."""
    if x.dim() != 3:
        raise ValueError(f"pooling expects features of shape (B, T, D), got {tuple(x.shape)}")
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"pooling mask must have shape {tuple(x.shape[:2])} (B, T), got {tuple(mask.shape)}")
    if value_checks(mask) and not bool(mask.any(dim=1).all()):  # a host sync: see farreid.models.checks
        raise ValueError("pooling mask has a clip with no real frame (a row of the (B, T) mask is all False)")
    return mask.bool()


def _weighted_sum(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum features (B, T, D) with weights (B, T) over T -> (B, D); float32 under autocast.

    The pooled feature is the retrieval embedding (and the triplet loss's input): a bf16 sum over T frames would
    round it to 3 significant digits for the price of a (B, T, D) product, negligible beside the backbone.
    """
    autocast = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False):
        pooled = torch.einsum("bt,btd->bd", weights.float(), x.float())
    return pooled if autocast else pooled.to(x.dtype)  # without autocast, keep the model's own dtype


class TemporalPooling(nn.Module):
    """Base of farreid's temporal poolings: ``forward(x (B, T, D), mask (B, T) | None) -> ((B, D), weights (B, T))``
    with the weights summing to 1 over the real frames. ``model.pooling`` takes a subclass built from D."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MeanPooling(TemporalPooling):
    """Mean of the real frames.

    Args:
        dim: feature width D (unused; kept so both poolers are built alike from a config).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool (B, T, D) features with a (B, T) bool mask | None -> ((B, D) mean, (B, T) weights)."""
        mask = _check_mask(x, mask)
        weights = mask.float() / mask.sum(dim=1, keepdim=True)  # (B, T), each row sums to 1
        return _weighted_sum(x, weights), weights


class TemporalAttentionPooling(TemporalPooling):
    """Softmax over T of a learned per-frame score, then the weighted sum of the frames.

    The score is a linear map of each frame feature, or a small MLP (D -> hidden -> 1) when `hidden` is given.
    Its last layer starts at zero, so at init every real frame scores the same and the pooling equals the
    masked mean. Padded frames get weight exactly 0.

    Args:
        dim: feature width D.
        hidden: hidden width of the scoring MLP; None for a linear score.
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        last = nn.Linear(hidden if hidden else dim, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.score = last if not hidden else nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), last)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool (B, T, D) features with a (B, T) bool mask | None -> ((B, D) pooled, (B, T) weights)."""
        mask = _check_mask(x, mask)
        scores = self.score(x).squeeze(-1).float()  # (B, T, 1) -> (B, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=1)  # (B, T); padded frames get exactly 0
        return _weighted_sum(x, weights), weights
