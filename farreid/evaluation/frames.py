"""Frames for the eyes: the frames the scorer used, decoded into small tiles, a counted placeholder when a file cannot
be read (the figures and the report must not fail where the evaluation did not)."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from farreid.data.sampling import frame_indices
from farreid.data.transforms import load_frame

TILE = (64, 32)  # (height, width) of a drawn frame: the recipe's 2:1 aspect, about 64 px high
_EXAMPLES = 3  # unreadable files named in a report


def scorer_frames(frames: Sequence[str], num_frames: int) -> list[str]:
    """The frames an evaluation clip of ``num_frames`` reads from a tracklet (the first of each of T equal blocks;
    a short tracklet repeats frames), as :class:`~farreid.data.dataset.TrackletDataset` reads them."""
    indices, _mask = frame_indices(len(frames), num_frames, False, random.Random(0))
    return [frames[i] for i in indices]


def placeholder(size: tuple[int, int] = TILE) -> np.ndarray:
    """A grey tile with a red cross: a frame that could not be read."""
    height, width = size
    tile = np.full((height, width, 3), 96, dtype=np.uint8)
    rows = np.arange(height)
    for cols in ((rows * (width - 1)) // max(height - 1, 1), (width - 1) - (rows * (width - 1)) // max(height - 1, 1)):
        tile[rows, cols] = (220, 40, 40)
    return tile


class FrameReader:
    """Decodes frames into (H, W, 3) uint8 tiles; unreadable files become :func:`placeholder` tiles, counted
    (thread-safe, so several threads may draw at once).

    Args:
        size: (height, width) of a tile.
    """

    def __init__(self, size: tuple[int, int] = TILE) -> None:
        self.size = size
        self.unreadable = 0
        self.examples: list[str] = []
        self._lock = threading.Lock()

    def read(self, path: str) -> np.ndarray:
        try:
            return load_frame(path, self.size)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):  # missing, empty, truncated, not an image
            with self._lock:
                self.unreadable += 1
                if len(self.examples) < _EXAMPLES:
                    self.examples.append(str(path))
            return placeholder(self.size)

    def strip(self, frames: Sequence[str]) -> np.ndarray:
        """The frames side by side: (H, len(frames) * W, 3)."""
        return np.concatenate([self.read(f) for f in frames], axis=1)

    def summary(self) -> dict:
        """``{"count": unreadable frames drawn as placeholders, "examples": the first file names}``."""
        return {"count": self.unreadable, "examples": list(self.examples)}


def save_jpeg(tile: np.ndarray, path, quality: int = 85) -> None:
    Image.fromarray(tile).save(path, format="JPEG", quality=quality)


def decode_strips(jobs: list[list[str]], size: tuple[int, int] = TILE) -> tuple[list[np.ndarray], dict]:
    """Each job's frames side by side (:meth:`FrameReader.strip`), and the unreadable frames' summary; a plain
    function of picklable arguments, so that a process pool can run it."""
    reader = FrameReader(size)
    return [reader.strip(frames) for frames in jobs], reader.summary()
