"""A tiny random stand-in of the ``aerialgeometry`` interface (farreid.data.geometry_predictor): a local checkpoint
file -> a module mapping (B, 3, H, W) images in [0, 1] to (altitude m, distance m, angle deg), each (B,)."""

from pathlib import Path

import torch
from torch import nn


class TinyGeometryNet(nn.Module):
    """Conv -> global pool -> 3 outputs squashed into 0-120 m, 0-120 m, 0-90 deg (a ResNet-50's outputs, in small)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.calls += 1
        out = torch.sigmoid(self.head(self.features(images)))  # (B, 3) in (0, 1)
        return out[:, 0] * 120, out[:, 1] * 120, out[:, 2] * 90


def save(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(TinyGeometryNet().state_dict(), path)
    return path


def load(checkpoint: str) -> TinyGeometryNet:
    """The loader farreid calls with the user's checkpoint path."""
    net = TinyGeometryNet()
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    return net.eval()
