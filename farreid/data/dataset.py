"""A map-style dataset of tracklet clips: frame selection, robust decoding and the tracklet transform."""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from farreid.data.detreidx import Tracklet
from farreid.data.sampling import frame_indices

# What PIL raises on missing, unidentifiable, truncated or otherwise corrupt files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableTrackletError(RuntimeError):
    """No frame of a tracklet could be decoded."""


def load_frame(path: str) -> Image.Image:
    """Decode one frame to RGB, forcing the full decode so truncated files fail here, not later."""
    with Image.open(path) as image:
        return image.convert("RGB")


def relabel(tracklets: Sequence[Tracklet]) -> list[int]:
    """Contiguous training labels 0..N-1 by sorted PID, one per tracklet."""
    label_of = {pid: i for i, pid in enumerate(sorted({t.pid for t in tracklets}))}
    return [label_of[t.pid] for t in tracklets]


class TrackletDataset(Dataset):
    """Tracklets -> clips of T frames.

    Items are dicts: ``frames`` (T, 3, H, W) float32, ``mask`` (T,) bool (False on padding repeats),
    ``label`` int (-1 without labels), ``pid`` int, ``camid`` int, ``index`` int (position in ``tracklets``).

    Training items keyed ``(index, seed)`` (what :class:`~farreid.data.sampling.IdentityBatchSampler` yields)
    draw frames and augmentations from ``random.Random(seed)``, so they do not depend on the worker; keyed by a
    bare index they draw from a generator seeded from torch's, which differs per DataLoader worker and per
    epoch (and follows ``seed_everything``). Test items are deterministic. A frame that cannot be decoded is
    replaced by the nearest readable frame of the same tracklet, with a warning the first time the file fails;
    ``skipped_frames`` counts the replacements in this process.

    Args:
        tracklets: the tracklets, e.g. from :func:`~farreid.data.detreidx.read_split`.
        num_frames: T, frames per clip.
        training: random frames per block and random augmentation if True.
        transform: list of PIL images (+ rng) -> tensor (T, 3, H, W), e.g. a ``TrackletTransform``.
        labels: training label per tracklet (same length as ``tracklets``), or None for -1.
        seed: mixed into every per-item seed.
    """

    def __init__(
        self,
        tracklets: Sequence[Tracklet],
        num_frames: int,
        training: bool,
        transform: Callable[[list[Image.Image], random.Random], torch.Tensor],
        labels: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        self.tracklets = list(tracklets)
        if labels is not None and len(labels) != len(self.tracklets):
            raise ValueError(f"labels has {len(labels)} entries but there are {len(self.tracklets)} tracklets")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.labels = [int(x) for x in labels] if labels is not None else [-1] * len(self.tracklets)
        self.num_frames = num_frames
        self.training = training
        self.transform = transform
        self.seed = seed
        self.skipped_frames = 0
        self._unreadable: set[str] = set()

    def __len__(self) -> int:
        return len(self.tracklets)

    def _rng(self, index: int) -> random.Random:
        if self.training:
            draw = int(torch.randint(0, 2**62, (1,)).item())
            return random.Random(draw ^ (self.seed * 1_000_003 + index))
        return random.Random(self.seed * 1_000_003 + index)

    def _try_load(self, path: str) -> Image.Image | None:
        if path in self._unreadable:
            return None
        try:
            return load_frame(path)
        except DECODE_ERRORS as err:
            self._unreadable.add(path)
            warnings.warn(f"skipping unreadable frame {path}: {type(err).__name__}: {err}", stacklevel=3)
            return None

    def _load(self, tracklet: Tracklet, index: int) -> Image.Image:
        """Frame ``index`` of ``tracklet``, or the nearest readable one (later frames first on ties)."""
        frames = tracklet.frames
        image = self._try_load(frames[index])
        if image is not None:
            return image
        self.skipped_frames += 1
        for offset in range(1, len(frames)):
            for candidate in (index + offset, index - offset):
                if 0 <= candidate < len(frames):
                    image = self._try_load(frames[candidate])
                    if image is not None:
                        return image
        folder = os.path.dirname(frames[0]) or tracklet.name
        raise UnreadableTrackletError(
            f"no frame of tracklet {tracklet.name} ({folder}, {len(frames)} frames) could be decoded; "
            f"first failing file: {frames[index]}"
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``key``: a dataset index, or ``(index, seed)`` from a sampler that seeds every draw itself."""
        if isinstance(key, tuple):
            index, seed = key
            rng = random.Random(seed)
        else:
            index = key
            rng = self._rng(index)
        tracklet = self.tracklets[index]
        indices, mask = frame_indices(len(tracklet.frames), self.num_frames, self.training, rng)
        cache: dict[int, Image.Image] = {}
        for i in indices:
            if i not in cache:
                cache[i] = self._load(tracklet, i)
        frames = self.transform([cache[i] for i in indices], rng)
        return {
            "frames": frames,
            "mask": torch.tensor(mask, dtype=torch.bool),
            "label": self.labels[index],
            "pid": tracklet.pid,
            "camid": tracklet.camid,
            "index": index,
        }
