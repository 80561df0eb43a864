"""BNNeck identity head (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person ReID", 2019)."""

import torch
from torch import nn


class BNNeck(nn.Module):
    """BatchNorm1d whose shift stays at zero, followed by a bias-free identity classifier.

    The triplet loss reads the features before the BN, the identity loss the logits after it, and retrieval
    usually the BN features. Freezing the BN bias keeps the normalised features centred for cosine retrieval.

    Args:
        dim: feature width D.
        num_classes: number of training identities.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        if dim <= 0 or num_classes <= 0:
            raise ValueError(f"BNNeck needs dim > 0 and num_classes > 0, got {dim=}, {num_classes=}")
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map features (B, D) to (bn_features (B, D), logits (B, num_classes))."""
        if x.dim() != 2:
            raise ValueError(f"BNNeck expects features of shape (B, D), got {tuple(x.shape)}")
        bn_features = self.bn(x)
        return bn_features, self.classifier(bn_features)
