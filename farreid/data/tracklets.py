"""The tracklet types every dataset reader returns, and the compact frame-name table behind them.

A split of DetReIDX holds millions of frame names: :class:`NameTable` keeps them in one bytes buffer and
:class:`FrameList` gives a tracklet's frames as a sequence of path strings without a Python object per frame.
:class:`SplitIndex` is one split's listing as flat per-tracklet arrays (what the index cache stores).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_NUM_EXAMPLES = 3  # example paths shown in a skip warning
View = Literal["aerial", "ground"]


@dataclass(frozen=True)
class FrameMeta:
    """What a frame's file name says about the camera.

    Attributes:
        view: "aerial" or "ground".
        camid: 0 for ground cameras, 1 or 2 for the UAV session.
        altitude: UAV altitude in metres (0 for ground).
        distance: horizontal UAV-to-person distance in metres (0 for ground).
        angle: camera pitch in degrees (0 for ground).
    """

    view: View
    camid: int
    altitude: float = 0.0
    distance: float = 0.0
    angle: float = 0.0


@dataclass(frozen=True)
class Tracklet:
    """One tracklet folder: its identity, camera and sorted frame paths.

    Attributes:
        pid: identity (the integer PID folder name; meaningless in the anonymized test release).
        camid: 0 ground, 1/2 UAV session.
        view: "aerial" or "ground".
        altitude, distance, angle: from the first frame's name (metres, metres, degrees; 0 for ground).
        name: the tracklet folder name (what the challenge CSV lists).
        frames: frame paths sorted by file name: a :class:`FrameList` view into the split's name table when read
            by :func:`read_split` (a sequence of path strings with no Python object per frame), or any sequence.
    """

    pid: int
    camid: int
    view: View
    altitude: float
    distance: float
    angle: float
    name: str
    frames: Sequence[str]


class NameTable:
    """The frame file names of one split in one bytes buffer: name i is ``buffer[ends[i-1] + 1 : ends[i]]``.

    Names are stored encoded with :func:`os.fsencode` and separated by NUL bytes (which no file name holds), so a
    frame costs its name length + 1 byte + 4 (or 8) bytes of offset and no Python object.
    """

    __slots__ = ("buffer", "ends")

    def __init__(self, buffer: np.ndarray, ends: np.ndarray) -> None:
        self.buffer = buffer  # (bytes,) uint8
        self.ends = ends  # (frames,) uint32 or int64: position of each name's NUL terminator

    def __len__(self) -> int:
        return len(self.ends)

    def name(self, i: int) -> str:
        start = int(self.ends[i - 1]) + 1 if i > 0 else 0
        return os.fsdecode(self.buffer[start : int(self.ends[i])].tobytes())

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes + self.ends.nbytes


class FrameList(Sequence[str]):
    """The sorted frame paths of one tracklet: ``folder/name`` for the names ``first .. first + count - 1`` of a
    :class:`NameTable`. Behaves as a read-only sequence of path strings (``len``, indexing, slicing, iteration)."""

    __slots__ = ("folder", "table", "first", "count")

    def __init__(self, folder: str, table: NameTable, first: int, count: int) -> None:
        self.folder, self.table, self.first, self.count = folder, table, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):  # int -> str, slice -> list[str]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(f"frame {i} of a tracklet with {self.count} frames")
        return os.path.join(self.folder, self.table.name(self.first + i))

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(self.count))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash((self.folder, self.count, self.table.name(self.first) if self.count else ""))

    def __repr__(self) -> str:
        return f"FrameList({self.folder!r}, {self.count} frames)"


@dataclass
class SplitIndex:
    """The listing of one split as flat arrays: one entry per tracklet, one name-table entry per frame.

    Attributes:
        split_path: the split folder.
        folders: per tracklet, "PID/TRACKLET" relative to ``split_path``.
        pid, camid, aerial, altitude, distance, angle: per tracklet (from its folder and first frame's name).
        first, count: per tracklet, its frames' positions in ``names``.
        names: the frame-name table of the split.
        empty: tracklet folders without a frame; stray: entries that are neither folders nor frames.
    """

    split_path: str
    folders: list[str]
    pid: np.ndarray
    camid: np.ndarray
    aerial: np.ndarray
    altitude: np.ndarray
    distance: np.ndarray
    angle: np.ndarray
    first: np.ndarray
    count: np.ndarray
    names: NameTable
    empty: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.folders)

    def tracklets(self) -> list[Tracklet]:
        """One :class:`Tracklet` per tracklet folder, sharing this index's name table."""
        out = []
        for i, folder in enumerate(self.folders):
            path = os.path.join(self.split_path, folder)
            frames = FrameList(path, self.names, int(self.first[i]), int(self.count[i]))
            aerial = bool(self.aerial[i])
            out.append(
                Tracklet(
                    pid=int(self.pid[i]),
                    camid=int(self.camid[i]),
                    view="aerial" if aerial else "ground",
                    altitude=float(self.altitude[i]),
                    distance=float(self.distance[i]),
                    angle=float(self.angle[i]),
                    name=os.path.basename(folder),
                    frames=frames,
                )
            )
        return out

    def warn(self, stacklevel: int = 2) -> None:
        """The warnings of a listing: skipped empty tracklet folders, ignored stray entries."""
        where = self.split_path
        if self.empty:
            warnings.warn(
                f"{where}: skipped {len(self.empty)} tracklet folders without any {'/'.join(IMAGE_SUFFIXES)} frame, "
                f"e.g. {', '.join(self.empty[:_NUM_EXAMPLES])}",
                stacklevel=stacklevel + 1,
            )
        if self.stray:
            warnings.warn(
                f"{where}: ignored {len(self.stray)} entries that are neither PID/TRACKLET folders nor frames, "
                f"e.g. {', '.join(self.stray[:_NUM_EXAMPLES])}",
                stacklevel=stacklevel + 1,
            )
