"""Clip transforms split between the loader and the device: one random decision per tracklet, every frame alike.

Loader workers decode each frame straight to the model's size as uint8 (:func:`load_frame`) and draw a tracklet's
augmentation parameters (:meth:`TrackletTransform.draw`); the device turns the uint8 batch into normalised floats
and applies the augmentations batched (:meth:`TrackletTransform.augment`, :func:`normalize_clip`), called from
``DetReIDXDataModule.on_after_batch_transfer``. uint8 clips are a quarter of the bytes of float32 ones through
the worker queues, the pinned buffers and the host-to-device copy.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ERASE_SCALE = (0.02, 0.33)  # erased share of the image area
_ERASE_RATIO = (0.3, 3.3)  # erased box height / width
_ERASE_ATTEMPTS = 10
# Columns of the per-tracklet augmentation parameters drawn in the loader (B, NUM_PARAMS).
FLIP, SHIFT_Y, SHIFT_X, BRIGHTNESS, CONTRAST, SATURATION, TOP, LEFT, HEIGHT, WIDTH = range(10)
NUM_PARAMS = 10


def load_frame(path: str, size: tuple[int, int]) -> np.ndarray:
    """Decode one frame and resize it to ``size`` = (height, width): (H, W, 3) uint8 RGB.

    JPEGs at least twice the size are first decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's ``draft``),
    never below ``size``; then PIL's bilinear resize, antialiased when shrinking, as ``torch`` interpolation with
    ``antialias=True``. The full decode is forced here, so a truncated file fails here, not later.
    """
    height, width = size
    with Image.open(path) as image:
        image.draft("RGB", (width, height))
        image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def normalize_clip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 RGB frames (..., 3, H, W) -> float32 normalised with CLIP's mean and std, on their device."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"normalize_clip expects uint8 frames (..., 3, H, W), got {frames.dtype}")
    return _normalize01(frames.contiguous().float().div_(255.0))  # contiguous: see TrackletTransform.augment


def _normalize01(x: torch.Tensor) -> torch.Tensor:
    """Float frames (..., 3, H, W) in [0, 1] -> normalised with CLIP's mean and std, in place."""
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma of (..., 3, H, W) -> (..., 1, H, W) (ITU-R 601 weights). Three scaled adds of channel planes: an
    `einsum` over the channel axis permuted and copied the whole clip first (5x slower on the CPU)."""
    red, green, blue = x.unbind(-3)
    return (red * 0.299).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(-3)


def _shift_flip(frames: torch.Tensor, p: torch.Tensor, sliced: bool | None = None) -> torch.Tensor:
    """out[y, x] = in[y + sy, x + sx] of each tracklet's (optionally flipped) frames, zero outside: (B, T, 3, H, W).

    On the CPU one slice copy per tracklet; elsewhere one batched gather through a per-tracklet (H * W) source map
    shared by all frames and channels (no host synchronisation). Both give the same uint8 pixels; `sliced`
    overrides the choice.
    """
    b, t, c, h, w = frames.shape
    if frames.device.type == "cpu" if sliced is None else sliced:
        out = torch.zeros_like(frames)
        for i, (flip, dy, dx) in enumerate(p[:, [FLIP, SHIFT_Y, SHIFT_X]].long().tolist()):
            source = frames[i].flip(-1) if flip else frames[i]
            top, bottom, left, right = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
            if top < bottom and left < right:
                out[i, :, :, top:bottom, left:right] = source[:, :, top + dy : bottom + dy, left + dx : right + dx]
        return out
    ys = torch.arange(h, device=frames.device)[None] + p[:, SHIFT_Y, None].long()  # (B, H)
    xs = torch.arange(w, device=frames.device)[None] + p[:, SHIFT_X, None].long()  # (B, W)
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]  # (B, H, W)
    xs = torch.where(p[:, FLIP, None] > 0, w - 1 - xs, xs)
    source = ys.clamp(0, h - 1)[:, :, None] * w + xs.clamp(0, w - 1)[:, None, :]  # (B, H, W)
    pixels = frames.reshape(b, t * c, h * w)  # (B, T, 3, H, W) -> (B, T*3, H*W)
    moved = pixels.gather(2, source.view(b, 1, h * w).expand(b, t * c, h * w))
    return moved.view(b, t, c, h, w).mul_(inside[:, None, None])  # (B, H, W) -> (B, 1, 1, H, W)


def _erase(x: torch.Tensor, p: torch.Tensor, sliced: bool | None = None) -> torch.Tensor:
    """Zero each tracklet's (top, left, height, width) box in all its frames, in place: slices on the CPU, one
    broadcast mask elsewhere (no host synchronisation); `sliced` overrides the choice."""
    h, w = x.shape[-2:]
    if x.device.type == "cpu" if sliced is None else sliced:
        for i, (top, left, height, width) in enumerate(p[:, [TOP, LEFT, HEIGHT, WIDTH]].long().tolist()):
            if height > 0 and width > 0:
                x[i, :, :, top : top + height, left : left + width] = 0.0
        return x
    top, left, eh, ew = (p[:, i, None] for i in (TOP, LEFT, HEIGHT, WIDTH))  # (B, 1) each
    ys = torch.arange(h, device=x.device)[None]
    xs = torch.arange(w, device=x.device)[None]
    box = ((ys >= top) & (ys < top + eh))[:, :, None] & ((xs >= left) & (xs < left + ew))[:, None, :]
    return x.masked_fill_(box[:, None, None], 0.0)  # (B, H, W) -> (B, 1, 1, H, W)


class TrackletTransform:
    """Resize, augment and normalise the frames of tracklets.

    Training applies, in order: resize, horizontal flip, zero-pad + random crop, colour jitter (brightness,
    contrast, saturation), CLIP normalisation, random erasing (with 0, the mean colour after normalisation).
    Each decision (flip, crop offset, jitter factors, erase box) is drawn once per tracklet (:meth:`draw`, in the
    loader, from the item's generator) and applied to all its frames (:meth:`augment`, on the device), so the clip
    stays temporally consistent. Test mode only resizes and normalises.

    Args:
        image_size: output (height, width) in pixels.
        training: augment if True; deterministic otherwise.
        flip_p: probability of a horizontal flip.
        erase_p: probability of erasing one random box.
        pad: zero padding in pixels on each side before the random crop (0 disables).
        color_jitter: jitter strength s; factors drawn from [1 - s, 1 + s] (0 disables).
    """

    def __init__(
        self,
        image_size: tuple[int, int] = (256, 128),
        training: bool = False,
        flip_p: float = 0.5,
        erase_p: float = 0.5,
        pad: int = 10,
        color_jitter: float = 0.0,
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

    # ---------------------------------------------------------------------------------------- loader side
    def load(self, path: str) -> np.ndarray:
        """One frame at the output size, (H, W, 3) uint8 (see :func:`load_frame`)."""
        return load_frame(path, self.image_size)

    def draw(self, rng: random.Random) -> torch.Tensor:
        """One tracklet's augmentation parameters, (NUM_PARAMS,) float32 (identity values when not training)."""
        params = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
        if not self.training:
            return torch.tensor(params)
        params[FLIP] = float(rng.random() < self.flip_p)
        if self.pad > 0:
            params[SHIFT_Y], params[SHIFT_X] = rng.randint(-self.pad, self.pad), rng.randint(-self.pad, self.pad)
        if self.color_jitter > 0:
            s = self.color_jitter
            params[BRIGHTNESS : SATURATION + 1] = [rng.uniform(1 - s, 1 + s) for _ in range(3)]
        if rng.random() < self.erase_p:
            params[TOP : WIDTH + 1] = self._erase_box(rng)
        return torch.tensor(params)

    def _erase_box(self, rng: random.Random) -> list[float]:
        """(top, left, height, width) of one random box, or zeros if none fits."""
        height, width = self.image_size
        area = height * width
        for _ in range(_ERASE_ATTEMPTS):
            target = rng.uniform(*_ERASE_SCALE) * area
            ratio = math.exp(rng.uniform(math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])))
            h, w = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < h < height and 0 < w < width:
                return [rng.randint(0, height - h), rng.randint(0, width - w), h, w]
        return [0.0, 0.0, 0.0, 0.0]

    # ---------------------------------------------------------------------------------------- device side
    def augment(self, frames: torch.Tensor, params: torch.Tensor, batched: bool | None = None) -> torch.Tensor:
        """Apply each tracklet's parameters to its frames, batched, and normalise.

        Args:
            frames: (B, T, 3, H, W) uint8.
            params: (B, NUM_PARAMS) from :meth:`draw`.
            batched: all tracklets in each op (the default off the CPU) or one tracklet at a time (the default on
                the CPU, where its clip stays in cache); the results are the same.

        Returns:
            (B, T, 3, H, W) float32, normalised.
        """
        b, t, c, h, w = frames.shape
        if b > 1 and not (frames.device.type != "cpu" if batched is None else batched):
            # One tracklet at a time on the CPU: its float clip (3 MB at 8 x 256 x 128) stays in the core's cache
            # through the dozen passes below; the whole batch at once ran at half the speed per clip.
            out = torch.empty(frames.shape, dtype=torch.float32)
            for i in range(b):
                out[i] = self.augment(frames[i : i + 1], params[i : i + 1], batched=True)[0]
            return out
        # The loader's clips are (T, H, W, 3) arrays seen as (T, 3, H, W): one uint8 copy to the standard layout
        # makes every float pass below contiguous (2.3x faster per clip on the CPU).
        frames = frames.contiguous()
        p = params.to(device=frames.device, dtype=torch.float32)
        if self.flip_p > 0 or self.pad > 0:
            frames = _shift_flip(frames, p)
        if self.color_jitter > 0:
            # Brightness x * f (folded into the uint8 -> [0, 1] scaling), then contrast and saturation as
            # (x - m) * f + m = lerp(x, m, 1 - f) with m the frame's mean grey or the pixel's grey, each clamped.
            f = p[:, BRIGHTNESS : SATURATION + 1, None, None, None, None]  # (B, 3, 1, 1, 1, 1)
            x = frames.float().mul_(f[:, 0] / 255.0).clamp_(0.0, 1.0)
            mean_grey = _grey(x).mean(dim=(-2, -1), keepdim=True)  # (B, T, 1, 1, 1)
            x.lerp_(mean_grey.expand_as(x), 1 - f[:, 1]).clamp_(0.0, 1.0)
            x.lerp_(_grey(x).expand_as(x), 1 - f[:, 2]).clamp_(0.0, 1.0)
        else:
            x = frames.float().div_(255.0)
        x = _normalize01(x)
        if self.erase_p > 0:
            x = _erase(x, p)
        return x

    def __call__(self, images: list[np.ndarray | Image.Image], rng: random.Random | None = None) -> torch.Tensor:
        """Transform one tracklet in one call (tools and tests; the loader splits this across processes).

        Args:
            images: T frames, (h, w, 3) uint8 arrays or PIL images of any size.
            rng: source of every random decision; required in training mode.

        Returns:
            Float32 tensor (T, 3, H, W), normalised.
        """
        if not images:
            raise ValueError("TrackletTransform got an empty list of frames")
        if self.training and rng is None:
            raise ValueError("TrackletTransform(training=True) needs an rng")
        height, width = self.image_size
        arrays = []
        for image in images:
            image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
            if image.size != (width, height):
                image = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(image.convert("RGB")))
        clip = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)
        params = self.draw(rng) if self.training else None
        if params is None:
            return normalize_clip(clip)
        return self.augment(clip[None], params[None])[0]  # (1, T, 3, H, W) -> (T, 3, H, W)
