"""The DetReIDX on-disk layout: split folders, tracklet folders and the frame file-name grammar.

Layout (DOMAIN.md §2)::

    ROOT/train/PID/TRACKLET/*.jpg
    ROOT/case1_aerial_to_ground/{query,gallery}/PID/TRACKLET/*.jpg
    ROOT/case2_ground_to_aerial/{query,gallery}/PID/TRACKLET/*.jpg
    ROOT/case3_aerial_to_aerial/{query,gallery}/PID/TRACKLET/*.jpg

:func:`parse_frame_name` is the one place that knows the file-name grammar; everything else asks it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CASES: dict[str, str] = {
    "A2G": "case1_aerial_to_ground",
    "G2A": "case2_ground_to_aerial",
    "A2A": "case3_aerial_to_aerial",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXPECTED_LAYOUT = (
    "ROOT/train/PID/TRACKLET/*.jpg, ROOT/case1_aerial_to_ground/{query,gallery}/PID/TRACKLET/*.jpg, "
    "ROOT/case2_ground_to_aerial/{query,gallery}/PID/TRACKLET/*.jpg, "
    "ROOT/case3_aerial_to_aerial/{query,gallery}/PID/TRACKLET/*.jpg"
)
AERIAL_GRAMMAR = (
    "aerial names have >= 9 '_'-separated fields: field 6 altitude, 7 distance, 8 pitch angle (floats), "
    "field -2 the UAV session (integer)"
)
_MIN_AERIAL_FIELDS = 8  # a stem with fewer fields is a ground frame
_ANGLE_FIELD = 8  # the last field read from an aerial name (besides the session, field -2)
_NUM_EXAMPLES = 3  # example paths shown in a skip warning


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

    view: str
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
    view: str
    altitude: float
    distance: float
    angle: float
    name: str
    frames: Sequence[str]


def parse_frame_name(name: str) -> FrameMeta:
    """Read view, camera and UAV metadata from a frame file name (a bare name or a path).

    The stem is split on "_": fewer than 8 fields is a ground frame (camid 0); otherwise it is aerial with
    altitude = field 6, distance = field 7, angle = field 8 and camid 1 if int(field -2) == 1 else 2.

    Raises:
        ValueError: an aerial-looking name lacks those fields or they are not numeric.
    """
    stem = os.path.splitext(os.path.basename(name))[0]
    fields = stem.split("_")
    if len(fields) < _MIN_AERIAL_FIELDS:
        return FrameMeta(view="ground", camid=0)
    if len(fields) < 9:
        raise ValueError(f"frame {name!r} has {len(fields)} '_'-separated fields: {AERIAL_GRAMMAR}")
    try:
        altitude, distance, angle = float(fields[6]), float(fields[7]), float(fields[8])
        session = int(fields[-2])
    except ValueError as err:
        raise ValueError(f"frame {name!r}: non-numeric field ({err}); {AERIAL_GRAMMAR}") from None
    return FrameMeta(view="aerial", camid=1 if session == 1 else 2, altitude=altitude, distance=distance, angle=angle)


def case_split(case: str, part: str) -> str:
    """The split path of a case's query or gallery, e.g. ``case_split("A2G", "query")``.

    Returns:
        "case1_aerial_to_ground/query" and so on, for :func:`read_split`.
    """
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}: expected one of {sorted(CASES)}")
    if part not in ("query", "gallery"):
        raise ValueError(f"unknown part {part!r} of case {case}: expected 'query' or 'gallery'")
    return f"{CASES[case]}/{part}"


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


def _frame_names(path: str) -> tuple[list[str], int]:
    """Sorted image names of a tracklet folder and the number of other entries."""
    names = os.listdir(path)
    total = len(names)
    # Fast path, in C: every name is a visible .jpg (each ".jpg" followed by the separator, no "\0." start).
    joined = "\0" + "\0".join(names) + "\0"
    if not (joined.count(".jpg\0") == len(names) and "\0." not in joined):
        names = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    frames = sorted(names)
    return frames, total - len(frames)


def _check_camera(path: str, frames: list[str], joined: str) -> FrameMeta:
    """The first frame's metadata, after checking that every frame names the same camera.

    A name equal to the first frame's up to its last "_" field (the frame number) has the same view and camera,
    so only the names that differ there are parsed; when the first name's last field is one that is read (the
    angle of a 9-field aerial name), every name is parsed. ``joined`` is ``"\0".join(frames)``: when every name
    starts with that prefix and has no other "_", two counts in C decide it for the whole folder.
    """
    first = parse_frame_name(frames[0])
    stem = os.path.splitext(frames[0])[0]
    cut = stem.rfind("_") + 1
    prefix = stem[:cut]
    if cut == 0 or (first.view == "aerial" and stem.count("_") == _ANGLE_FIELD):
        suspects = frames[1:]
    elif joined.count("\0" + prefix) == len(frames) - 1 and joined.count("_") == len(frames) * prefix.count("_"):
        return first
    else:
        suspects = [n for n in frames[1:] if not (n.startswith(prefix) and n.rfind("_") == cut - 1)]
    for name in suspects:
        meta = parse_frame_name(name)
        if meta.view != first.view or meta.camid != first.camid:
            raise ValueError(
                f"tracklet {path}: frame {name} is {meta.view} camid {meta.camid} but the first frame "
                f"{frames[0]} is {first.view} camid {first.camid}; all frames of a tracklet must share one camera"
            )
    return first


def _sorted_dirs(path: str, stray: list[str]) -> list[str]:
    """Sorted names of the visible sub-folders of ``path``; other visible entries go to ``stray``."""
    out = []
    with os.scandir(path) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                out.append(entry.name)
            else:
                stray.append(entry.path)
    out.sort()
    return out


def _release_free_heap() -> None:
    """Hand the listing's freed temporaries (per-folder name lists, joined strings) back to the OS.

    glibc keeps freed heap memory for reuse; after a listing of millions of names that is about as much again as
    the index itself, and every forked DataLoader worker would start from it. No-op without glibc.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check_split(root: str | os.PathLike, split: str) -> str:
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {root_path} does not exist; expected layout: {EXPECTED_LAYOUT}")
    split_path = root_path / split
    if not split_path.is_dir():
        raise FileNotFoundError(f"split folder {split_path} does not exist; expected layout: {EXPECTED_LAYOUT}")
    return str(split_path)


def list_split(root: str | os.PathLike, split: str) -> SplitIndex:
    """List one split into a :class:`SplitIndex` (no warning; see :func:`read_split`).

    Raises:
        FileNotFoundError: the root or split folder does not exist.
        ValueError: a PID folder name is not an integer, a tracklet mixes cameras, or the split is empty.
    """
    split_path = _check_split(root, split)
    folders: list[str] = []
    meta: list[tuple[int, int, bool, float, float, float]] = []
    counts: list[int] = []
    empty: list[str] = []
    stray: list[str] = []
    buffer = bytearray()
    for pid_name in _sorted_dirs(split_path, stray):
        pid_path = os.path.join(split_path, pid_name)
        try:
            pid = int(pid_name)
        except ValueError:
            raise ValueError(
                f"PID folder {pid_path}: name {pid_name!r} is not an integer; expected {EXPECTED_LAYOUT}"
            ) from None
        for name in _sorted_dirs(pid_path, stray):
            path = os.path.join(pid_path, name)
            frames, ignored = _frame_names(path)
            if ignored:
                stray.append(f"{path} ({ignored} non-image files)")
            if not frames:
                empty.append(path)
                continue
            joined = "\0".join(frames)
            first = _check_camera(path, frames, joined)
            folders.append(f"{pid_name}/{name}")
            meta.append((pid, first.camid, first.view == "aerial", first.altitude, first.distance, first.angle))
            counts.append(len(frames))
            buffer += os.fsencode(joined + "\0")  # a NUL after every name
    if not folders:
        raise ValueError(f"split {split!r} under {root} holds no tracklet; expected layout: {EXPECTED_LAYOUT}")
    names = np.frombuffer(buffer, dtype=np.uint8)  # shares the bytearray: no copy
    ends = np.flatnonzero(names == 0)
    ends = ends.astype(np.uint32) if len(names) < 2**32 else ends
    _release_free_heap()
    count = np.asarray(counts, dtype=np.int64)
    columns = list(zip(*meta, strict=True))
    return SplitIndex(
        split_path=split_path,
        folders=folders,
        pid=np.asarray(columns[0], dtype=np.int64),
        camid=np.asarray(columns[1], dtype=np.int8),
        aerial=np.asarray(columns[2], dtype=bool),
        altitude=np.asarray(columns[3], dtype=np.float64),
        distance=np.asarray(columns[4], dtype=np.float64),
        angle=np.asarray(columns[5], dtype=np.float64),
        first=np.cumsum(count) - count,
        count=count,
        names=NameTable(names, ends),
        empty=empty,
        stray=stray,
    )


def read_split(root: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None) -> list[Tracklet]:
    """List the tracklets of one split, ordered by PID folder then tracklet folder name.

    Args:
        root: dataset root.
        split: "train" or a case part such as "case1_aerial_to_ground/query" (see :func:`case_split`).
        cache_dir: keep the listing in a cache file there (see :mod:`farreid.data.index_cache`); None lists
            the folders every time.

    Returns:
        The tracklets; folders without any frame are skipped and counted in one warning, and so are entries
        that are neither folders nor frames. Their ``frames`` share one compact name table.

    Raises:
        FileNotFoundError: the root or split folder does not exist.
        ValueError: a PID folder name is not an integer, a tracklet mixes cameras, or the split is empty.
    """
    if cache_dir is None:
        index = list_split(root, split)
    else:
        from farreid.data.index_cache import cached_split

        index = cached_split(root, split, cache_dir)
    index.warn(stacklevel=2)
    return index.tracklets()
