"""The tracklet types every dataset reader returns, and the compact frame-name table behind them.

A split of DetReIDX holds millions of frame names, and the names of one tracklet share everything but the frame
number: :class:`FrameNames` stores such a tracklet as its prefix and suffix once and a uint32 per frame
(:class:`NumberedFrames`), and any other tracklet's names in one bytes buffer (:class:`NameTable`,
:class:`FrameList`). Either gives a tracklet's frames as a sequence of path strings without a Python object per
frame. :class:`SplitIndex` is one split's listing as flat per-tracklet arrays (what the index cache stores).
"""

from __future__ import annotations

import os
import re
import warnings
from abc import abstractmethod
from array import array
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
        frames: frame paths sorted by file name: a :class:`FrameSequence` view into the split's name storage when
            read by :func:`read_split` (a sequence of path strings with no Python object per frame), or any sequence.
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


class FrameSequence(Sequence[str]):
    """The sorted frame paths of one tracklet, ``folder/name``, from a split's compact name storage. Behaves as a
    read-only sequence of path strings (``len``, indexing, slicing, iteration); subclasses say where names live."""

    __slots__ = ("folder", "first", "count")

    def __init__(self, folder: str, first: int, count: int) -> None:
        self.folder, self.first, self.count = folder, first, count

    @abstractmethod
    def name(self, i: int) -> str:
        """The file name of frame ``i`` (0 <= i < count), without the folder."""

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):  # int -> str, slice -> list[str]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(f"frame {i} of a tracklet with {self.count} frames")
        return os.path.join(self.folder, self.name(i))

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(self.count))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash((self.folder, self.count, self.name(0) if self.count else ""))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder!r}, {self.count} frames)"


class FrameList(FrameSequence):
    """Frames whose names are ``first .. first + count - 1`` of a :class:`NameTable` (any names at all)."""

    __slots__ = ("table",)

    def __init__(self, folder: str, table: NameTable, first: int, count: int) -> None:
        super().__init__(folder, first, count)
        self.table = table

    def name(self, i: int) -> str:
        return self.table.name(self.first + i)


class NumberedFrames(FrameSequence):
    """Frames named ``prefix + number + suffix``, the number written with exactly ``width`` digits (zero-padded):
    the names of a DetReIDX tracklet share everything but the frame number, so only the numbers are stored, one
    uint32 each (``numbers[first : first + count]``, in the folder's sorted order)."""

    __slots__ = ("prefix", "suffix", "width", "numbers")

    def __init__(self, folder: str, prefix: str, suffix: str, width: int, numbers: np.ndarray, first: int, count: int):
        super().__init__(folder, first, count)
        self.prefix, self.suffix, self.width, self.numbers = prefix, suffix, width, numbers

    def name(self, i: int) -> str:
        return f"{self.prefix}{int(self.numbers[self.first + i]):0{self.width}d}{self.suffix}"


_LAST_NUMBER = re.compile(r"([0-9]+)([^0-9]*)\Z", re.ASCII | re.DOTALL)
MAX_WIDTH = 9  # digits of a stored frame number: 10**9 - 1 fits a uint32


def number_pattern(names: Sequence[str], data: bytes) -> tuple[str, str, np.ndarray] | None:
    """``(prefix, suffix, numbers)`` when every name is ``prefix + <digits> + suffix`` with the same number of
    digits as the first name's last run of digits (so ``prefix + f"{n:0{width}d}" + suffix`` gives each name back
    exactly); else None (the names are stored as they are).

    Args:
        names: the (sorted) frame names of one tracklet, at least one.
        data: ``os.fsencode("\\0".join(names))``, checked column by column in NumPy (no Python loop over names).
    """
    match = _LAST_NUMBER.search(names[0])
    if match is None or len(match.group(1)) > MAX_WIDTH:
        return None
    prefix, width, suffix = names[0][: match.start()], len(match.group(1)), match.group(2)
    head, tail = os.fsencode(prefix), os.fsencode(suffix)
    length = len(head) + width + len(tail)  # every name's length in bytes, when they all fit
    if len(data) + 1 != len(names) * (length + 1):
        return None
    rows = np.frombuffer(data + b"\0", dtype=np.uint8).reshape(len(names), length + 1)  # (names, bytes + NUL)
    digits = rows[:, len(head) : len(head) + width] - np.uint8(48)  # '0'..'9' -> 0..9; others wrap above 9
    if not (
        (rows[:, length] == 0).all()
        and (rows[:, : len(head)] == np.frombuffer(head, dtype=np.uint8)).all()
        and (rows[:, len(head) + width : length] == np.frombuffer(tail, dtype=np.uint8)).all()
        and (digits <= 9).all()
    ):
        return None
    numbers = digits.astype(np.uint32) @ (10 ** np.arange(width - 1, -1, -1, dtype=np.uint32))  # (names,)
    return prefix, suffix, numbers.astype(np.uint32)


@dataclass
class FrameNames:
    """The frame names of one split, per tracklet either as a number pattern or exactly.

    Tracklet i with ``width[i] > 0`` is named ``prefix[i] + f"{n:0{width}d}" + suffix[i]`` for the numbers
    ``numbers[first[i] : first[i] + count[i]]``; with ``width[i] == 0`` its names are ``exact`` names
    ``first[i] ..``. A DetReIDX frame costs 4 bytes; a name that fits no pattern its length + 5 or 9.

    Attributes:
        first, count, width: (tracklets,) int64, int64, int8.
        prefix, suffix: per tracklet ("" for exactly stored tracklets).
        numbers: (numbered frames,) uint32. exact: the other frames' names.
    """

    first: np.ndarray
    count: np.ndarray
    width: np.ndarray
    prefix: list[str]
    suffix: list[str]
    numbers: np.ndarray
    exact: NameTable

    def __len__(self) -> int:
        """The number of frames."""
        return int(self.count.sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the per-frame storage (the number and name arrays) and the per-tracklet arrays."""
        arrays = (self.first, self.count, self.width, self.numbers)
        return sum(a.nbytes for a in arrays) + self.exact.nbytes

    def frames(self, i: int, folder: str) -> FrameSequence:
        """Tracklet ``i``'s frames, as paths under ``folder``."""
        first, count, width = int(self.first[i]), int(self.count[i]), int(self.width[i])
        if width == 0:
            return FrameList(folder, self.exact, first, count)
        return NumberedFrames(folder, self.prefix[i], self.suffix[i], width, self.numbers, first, count)


class FrameNamesBuilder:
    """Collects a split's frame names tracklet by tracklet (:meth:`add`), then :meth:`build`. Holds 4 bytes per
    numbered frame and the bytes of the other names: never a Python string per frame beyond one tracklet's."""

    def __init__(self) -> None:
        self._numbers, self._exact = bytearray(), bytearray()
        self._first, self._count, self._width = array("q"), array("q"), array("b")
        self._prefix: list[str] = []
        self._suffix: list[str] = []
        self._numbered = self._exact_names = 0

    def add(self, names: Sequence[str], data: bytes | None = None) -> None:
        """One tracklet's names, in order (``data``: their ``os.fsencode("\\0".join(names))`` when at hand)."""
        if data is None:
            data = os.fsencode("\0".join(names))
        pattern = number_pattern(names, data) if names else None
        self._count.append(len(names))
        if pattern is None:
            self._first.append(self._exact_names)
            self._width.append(0)
            self._prefix.append("")
            self._suffix.append("")
            self._exact += data + b"\0"  # a NUL after every name
            self._exact_names += len(names)
            return
        prefix, suffix, numbers = pattern
        self._first.append(self._numbered)
        self._width.append(len(names[0]) - len(prefix) - len(suffix))
        self._prefix.append(prefix)
        self._suffix.append(suffix)
        self._numbers += numbers.astype("<u4").tobytes()
        self._numbered += len(names)

    def build(self) -> FrameNames:
        exact = np.frombuffer(self._exact, dtype=np.uint8)  # shares the bytearray: no copy
        ends = np.flatnonzero(exact == 0)
        return FrameNames(
            first=np.frombuffer(self._first, dtype=np.int64),
            count=np.frombuffer(self._count, dtype=np.int64),
            width=np.frombuffer(self._width, dtype=np.int8),
            prefix=self._prefix,
            suffix=self._suffix,
            numbers=np.frombuffer(self._numbers, dtype="<u4"),
            exact=NameTable(exact, ends.astype(np.uint32) if len(exact) < 2**32 else ends),
        )


@dataclass
class SplitIndex:
    """The listing of one split as flat arrays: one entry per tracklet, and its frame names.

    Attributes:
        split_path: the split folder.
        folders: per tracklet, "PID/TRACKLET" relative to ``split_path``.
        pid, camid, aerial, altitude, distance, angle: per tracklet (from its folder and first frame's name).
        names: the frame names of the split (per tracklet: where its frames are and how they are stored).
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
    names: FrameNames
    empty: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.folders)

    def tracklets(self) -> list[Tracklet]:
        """One :class:`Tracklet` per tracklet folder, sharing this index's name storage."""
        out = []
        for i, folder in enumerate(self.folders):
            frames = self.names.frames(i, os.path.join(self.split_path, folder))
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
