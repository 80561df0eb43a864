"""Tracklet-level image transforms in plain torch: one random decision per tracklet, applied to every frame."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ERASE_SCALE = (0.02, 0.33)  # erased share of the image area
_ERASE_RATIO = (0.3, 3.3)  # erased box height / width
_ERASE_ATTEMPTS = 10


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor (3, h, w) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (h, w, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)  # (h, w, 3) -> (3, h, w)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma of (T, 3, H, W) -> (T, 1, H, W) (ITU-R 601 weights)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


class TrackletTransform:
    """Resize, augment and normalise the frames of one tracklet.

    Training applies, in order: resize, horizontal flip, zero-pad + random crop, colour jitter (brightness,
    contrast, saturation), CLIP normalisation, random erasing (with 0, the mean colour after normalisation).
    Each decision (flip, crop offset, jitter factors, erase box) is drawn once per call and applied to all
    frames, so the clip stays temporally consistent. Test mode only resizes and normalises.

    Args:
        image_size: output (height, width) in pixels.
        training: augment if True; deterministic otherwise.
        flip_p: probability of a horizontal flip.
        erase_p: probability of erasing one random box.
        pad: zero padding in pixels on each side before the random crop (0 disables).
        color_jitter: jitter strength s; factors drawn from [1 - s, 1 + s] (0 disables).
        mean, std: per-channel normalisation (CLIP's by default).
    """

    def __init__(
        self,
        image_size: tuple[int, int] = (256, 128),
        training: bool = False,
        flip_p: float = 0.5,
        erase_p: float = 0.5,
        pad: int = 10,
        color_jitter: float = 0.0,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
    ) -> None:
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be (height, width) with positive entries, got {image_size}")
        for name, value in (("flip_p", flip_p), ("erase_p", erase_p)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if pad < 0 or (training and pad >= min(image_size)) or not 0.0 <= color_jitter < 1.0:
            raise ValueError(
                f"need 0 <= pad < min(image_size)={min(image_size)} and color_jitter in [0, 1), "
                f"got pad={pad}, color_jitter={color_jitter}"
            )
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.training = training
        self.flip_p, self.erase_p, self.pad, self.color_jitter = flip_p, erase_p, pad, color_jitter
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)  # (3,) -> (1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)  # (3,) -> (1, 3, 1, 1)

    def __call__(self, images: list[Image.Image], rng: random.Random | None = None) -> torch.Tensor:
        """Transform one tracklet.

        Args:
            images: T frames (any sizes).
            rng: source of every random decision; required in training mode.

        Returns:
            Float32 tensor (T, 3, H, W), normalised.
        """
        if not images:
            raise ValueError("TrackletTransform got an empty list of frames")
        x = torch.stack([self._resize(to_tensor(image)) for image in images])  # (T, 3, H, W)
        if self.training:
            if rng is None:
                raise ValueError("TrackletTransform(training=True) needs an rng")
            x = self._augment_colour_space(x, rng)
        x = x.sub_(self.mean).div_(self.std)
        if self.training and rng.random() < self.erase_p:
            x = self._erase(x, rng)
        return x

    def _resize(self, frame: torch.Tensor) -> torch.Tensor:
        """(3, h, w) -> (3, H, W), bilinear with antialiasing when shrinking."""
        if tuple(frame.shape[-2:]) == self.image_size:
            return frame
        out = F.interpolate(frame.unsqueeze(0), size=self.image_size, mode="bilinear", antialias=True)
        return out.squeeze(0).clamp_(0.0, 1.0)  # (1, 3, H, W) -> (3, H, W)

    def _augment_colour_space(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """Flip, pad + crop and colour jitter on (T, 3, H, W) in [0, 1]."""
        if rng.random() < self.flip_p:
            x = x.flip(-1)
        if self.pad > 0:
            height, width = self.image_size
            # Zero-pad by `pad` then crop H×W at a random offset == shift by (sy, sx) in [-pad, pad], zero-filled.
            sy, sx = rng.randint(-self.pad, self.pad), rng.randint(-self.pad, self.pad)
            out = torch.zeros_like(x)
            out[:, :, max(0, -sy) : height - max(0, sy), max(0, -sx) : width - max(0, sx)] = x[
                :, :, max(0, sy) : height - max(0, -sy), max(0, sx) : width - max(0, -sx)
            ]
            x = out
        if self.color_jitter > 0:
            s = self.color_jitter
            brightness, contrast, saturation = (rng.uniform(1 - s, 1 + s) for _ in range(3))
            # In place: x is this call's own buffer, and full-size temporaries dominate the cost.
            x.mul_(brightness).clamp_(0.0, 1.0)
            mean_grey = _grey(x).mean(dim=(2, 3), keepdim=True)  # (T, 1, 1, 1)
            x.sub_(mean_grey).mul_(contrast).add_(mean_grey).clamp_(0.0, 1.0)
            grey = _grey(x)
            x.sub_(grey).mul_(saturation).add_(grey).clamp_(0.0, 1.0)
        return x

    def _erase(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """Zero one random box (the same in every frame) of (T, 3, H, W); no-op if no box fits."""
        height, width = self.image_size
        area = height * width
        for _ in range(_ERASE_ATTEMPTS):
            target = rng.uniform(*_ERASE_SCALE) * area
            ratio = math.exp(rng.uniform(math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])))
            h, w = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < h < height and 0 < w < width:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                x[:, :, top : top + h, left : left + w] = 0.0
                return x
        return x
