"""A map-style dataset of tracklet clips: frame selection, robust decoding, unreadable tracklets, dense rows."""

from __future__ import annotations

import os
import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from farreid.data.geometry import FileNameGeometry, Geometry
from farreid.data.sampling import frame_indices
from farreid.data.tracklets import Tracklet
from farreid.data.transforms import TrackletTransform

# What PIL raises on missing, unidentifiable, truncated or otherwise corrupt files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableTrackletError(RuntimeError):
    """No frame of a tracklet could be decoded."""


class TooManyUnreadableError(RuntimeError):
    """More than ``max_unreadable`` of a dataset's tracklets have no decodable frame."""


def relabel(tracklets: Sequence[Tracklet]) -> list[int]:
    """Contiguous training labels 0..N-1 by sorted PID, one per tracklet."""
    label_of = {pid: i for i, pid in enumerate(sorted({t.pid for t in tracklets}))}
    return [label_of[t.pid] for t in tracklets]


class TrackletDataset(Dataset):
    """Tracklets -> uint8 clips of T frames (normalised and augmented later, on the device).

    Items are dicts: ``frames`` (T, 3, H, W) uint8, ``mask`` (T,) bool (False on padding repeats), ``valid``
    bool, ``label`` int (-1 without labels), ``pid`` int, ``camid`` int, ``index`` int (the tracklet's position in
    ``tracklets``), ``item`` int (the row; equals ``index`` unless ``dense``), ``geometry`` (3,) float32
    normalised altitude, distance, pitch and ``geometry_known`` (3,) bool (:mod:`farreid.data.geometry`) and, when
    training, ``aug``
    (NUM_PARAMS,) float32, the tracklet's augmentation parameters for :meth:`TrackletTransform.augment`.

    An item key is a row ``i`` or a pair ``(i, seed)``: with a seed the item's generator is ``random.Random(seed)``
    (the training sampler draws one per item, so randomness does not depend on the worker). Training items without
    a seed draw one from torch's generator (per worker and epoch, following ``seed_everything``); test items are
    deterministic.

    Unreadable data: a frame that cannot be decoded is replaced by the nearest readable frame of the same tracklet
    (warned the first time the file fails; ``skipped_frames`` counts replacements in this process). A tracklet
    with no decodable frame is marked in ``unreadable`` (shared between the DataLoader workers) and warned once;
    training substitutes another tracklet of the same identity (``valid`` False, zero frames, if it has none),
    evaluation returns zero frames with ``valid`` False. More than ``max_unreadable`` x len(tracklets) marked
    tracklets raise :class:`TooManyUnreadableError` listing them.

    Args:
        tracklets: the tracklets, e.g. from :func:`~farreid.data.index_cache.read_split`.
        num_frames: T, frames per clip.
        training: random frames per block and augmentation parameters if True.
        transform: a :class:`TrackletTransform` (its ``load`` and ``draw`` run here).
        labels: training label per tracklet (same length as ``tracklets``), or None for -1.
        seed: mixed into every per-item seed that is not given.
        dense: evaluation only: one row per chunk of T consecutive frames of every tracklet (the last chunk
            padded by repeating its last frame) instead of one row of T evenly spaced frames.
        max_unreadable: share of tracklets allowed to be unreadable before the error.
        geometry: the tracklets' :class:`~farreid.data.geometry.Geometry` (row i for tracklet i); None parses it from
            the DetReIDX frame names (aerial: altitude, distance, pitch; ground: unknown).
    """

    def __init__(
        self,
        tracklets: Sequence[Tracklet],
        num_frames: int,
        training: bool,
        transform: TrackletTransform,
        labels: Sequence[int] | None = None,
        seed: int = 0,
        dense: bool = False,
        max_unreadable: float = 0.01,
        geometry: Geometry | None = None,
    ) -> None:
        self.tracklets = list(tracklets)
        self.geometry = FileNameGeometry().geometry(self.tracklets) if geometry is None else geometry
        if len(self.geometry) != len(self.tracklets):
            raise ValueError(f"geometry has {len(self.geometry)} rows but there are {len(self.tracklets)} tracklets")
        if labels is not None and len(labels) != len(self.tracklets):
            raise ValueError(f"labels has {len(labels)} entries but there are {len(self.tracklets)} tracklets")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if dense and training:
            raise ValueError("dense rows are for evaluation; a training dataset samples T frames per tracklet")
        if not 0.0 <= max_unreadable <= 1.0:
            raise ValueError(f"max_unreadable must be a share in [0, 1], got {max_unreadable}")
        self.labels = [int(x) for x in labels] if labels is not None else [-1] * len(self.tracklets)
        self.num_frames = num_frames
        self.training = training
        self.transform = transform
        self.seed = seed
        self.max_unreadable = max_unreadable
        self.skipped_frames = 0
        self._unreadable_files: set[str] = set()
        # One flag per tracklet in shared memory: DataLoader workers (fork or spawn) mark, the main process counts.
        self.unreadable = torch.zeros(len(self.tracklets), dtype=torch.bool).share_memory_()
        self._same_label: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(self.labels):
            self._same_label[label].append(i)
        # Dense rows: (tracklet index, first frame) per row, as flat arrays; None means one row per tracklet.
        self._rows: tuple[np.ndarray, np.ndarray] | None = None
        if dense:
            chunks = np.array([-(-len(t.frames) // num_frames) for t in self.tracklets], dtype=np.int64)
            index = np.repeat(np.arange(len(self.tracklets)), chunks)
            first = (np.arange(len(index)) - np.repeat(np.cumsum(chunks) - chunks, chunks)) * num_frames
            self._rows = (index, first)

    def __len__(self) -> int:
        return len(self.tracklets) if self._rows is None else len(self._rows[0])

    @property
    def num_unreadable(self) -> int:
        """Tracklets found unreadable so far, in any process."""
        return int(self.unreadable.sum())

    def unreadable_tracklets(self) -> list[str]:
        """The folders of the tracklets found unreadable so far."""
        return [_folder(self.tracklets[i]) for i in torch.nonzero(self.unreadable).flatten().tolist()]

    def _rng(self, item: int) -> random.Random:
        if self.training:
            draw = int(torch.randint(0, 2**62, (1,)).item())
            return random.Random(draw ^ (self.seed * 1_000_003 + item))
        return random.Random(self.seed * 1_000_003 + item)

    def _try_load(self, path: str) -> np.ndarray | None:
        if path in self._unreadable_files:
            return None
        try:
            return self.transform.load(path)
        except DECODE_ERRORS as err:
            self._unreadable_files.add(path)
            warnings.warn(f"skipping unreadable frame {path}: {type(err).__name__}: {err}", stacklevel=4)
            return None

    def _load(self, tracklet: Tracklet, index: int) -> np.ndarray:
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
        raise UnreadableTrackletError(
            f"no frame of tracklet {tracklet.name} ({_folder(tracklet)}, {len(frames)} frames) could be decoded; "
            f"first failing file: {frames[index]}"
        )

    def _clip(self, tracklet: Tracklet, indices: list[int]) -> torch.Tensor:
        """The frames ``indices`` of ``tracklet`` as (T, 3, H, W) uint8."""
        cache: dict[int, np.ndarray] = {}
        for i in indices:
            if i not in cache:
                cache[i] = self._load(tracklet, i)
        clip = np.stack([cache[i] for i in indices])  # (T, H, W, 3)
        return torch.from_numpy(clip).permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)

    def _choose(self, index: int, first: int | None, rng: random.Random) -> tuple[list[int], list[bool]]:
        length = len(self.tracklets[index].frames)
        if first is None:
            return frame_indices(length, self.num_frames, self.training, rng)
        stop = min(first + self.num_frames, length)
        pad = self.num_frames - (stop - first)
        return list(range(first, stop)) + [stop - 1] * pad, [True] * (stop - first) + [False] * pad

    def _mark(self, index: int, err: UnreadableTrackletError) -> None:
        """Record an unreadable tracklet (warned once), and stop when too many are."""
        if not bool(self.unreadable[index]):
            self.unreadable[index] = True
            action = "substituting another tracklet of its identity" if self.training else "marking it invalid"
            warnings.warn(f"{err}; {action}", stacklevel=4)
        if self.num_unreadable > self.max_unreadable * len(self.tracklets):
            listed = self.unreadable_tracklets()
            raise TooManyUnreadableError(
                f"{len(listed)} of {len(self.tracklets)} tracklets have no decodable frame, more than "
                f"data.max_unreadable={self.max_unreadable}: {', '.join(listed)}"
            )

    def _substitutes(self, index: int, rng: random.Random) -> list[int]:
        others = [i for i in self._same_label[self.labels[index]] if i != index and not bool(self.unreadable[i])]
        rng.shuffle(others)
        return others

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        item, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple | list) else (int(key), None)
        index, first = (item, None) if self._rows is None else (int(self._rows[0][item]), int(self._rows[1][item]))
        rng = random.Random(seed) if seed is not None else self._rng(item)
        source, frames, mask, valid = index, None, None, True
        candidates = [index]
        while frames is None:
            indices, mask = self._choose(source, first, rng)
            try:
                frames = self._clip(self.tracklets[source], indices)
            except UnreadableTrackletError as err:
                self._mark(source, err)
                if self.training and len(candidates) == 1:
                    candidates += self._substitutes(index, rng)
                candidates.pop(0)
                if not candidates:  # evaluation, or an identity without any readable tracklet
                    height, width = self.transform.image_size
                    frames = torch.zeros(self.num_frames, 3, height, width, dtype=torch.uint8)
                    source, valid = index, False
                else:
                    source = candidates[0]
        tracklet = self.tracklets[source]
        out = {
            "frames": frames,
            "mask": torch.tensor(mask, dtype=torch.bool),
            "valid": valid,
            "label": self.labels[source],
            "pid": tracklet.pid,
            "camid": tracklet.camid,
            "index": index,
            "item": item,
            "geometry": torch.from_numpy(self.geometry.values[source]),
            "geometry_known": torch.from_numpy(self.geometry.known[source]),
        }
        if self.training:
            out["aug"] = self.transform.draw(rng)
        return out


def _folder(tracklet: Tracklet) -> str:
    return os.path.dirname(tracklet.frames[0]) if len(tracklet.frames) else tracklet.name
