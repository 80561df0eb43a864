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
from pathlib import Path

import numpy as np

from farreid.data.tracklets import IMAGE_SUFFIXES, FrameMeta, FrameNamesBuilder, SplitIndex

CASES: dict[str, str] = {
    "A2G": "case1_aerial_to_ground",
    "G2A": "case2_ground_to_aerial",
    "A2A": "case3_aerial_to_aerial",
}
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


def check_split(root: str | os.PathLike, split: str) -> str:
    """The path of ``ROOT/split``, after checking that the root and the split folder exist.

    Raises:
        FileNotFoundError: either is missing (the message shows the expected layout).
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {root_path} does not exist; expected layout: {EXPECTED_LAYOUT}")
    split_path = root_path / split
    if not split_path.is_dir():
        raise FileNotFoundError(f"split folder {split_path} does not exist; expected layout: {EXPECTED_LAYOUT}")
    return str(split_path)


def list_split(root: str | os.PathLike, split: str) -> SplitIndex:
    """List one split into a :class:`~farreid.data.tracklets.SplitIndex` (no warning; see
    :func:`farreid.data.index_cache.read_split`).

    Raises:
        FileNotFoundError: the root or split folder does not exist.
        ValueError: a PID folder name is not an integer, a tracklet mixes cameras, or the split is empty.
    """
    split_path = check_split(root, split)
    folders: list[str] = []
    meta: list[tuple[int, int, bool, float, float, float]] = []
    empty: list[str] = []
    stray: list[str] = []
    names = FrameNamesBuilder()
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
            names.add(frames, os.fsencode(joined))
    if not folders:
        raise ValueError(f"split {split!r} under {root} holds no tracklet; expected layout: {EXPECTED_LAYOUT}")
    _release_free_heap()
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
        names=names.build(),
        empty=empty,
        stray=stray,
    )
