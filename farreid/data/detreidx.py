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
from dataclasses import dataclass
from pathlib import Path

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
        frames: frame paths sorted by file name.
    """

    pid: int
    camid: int
    view: str
    altitude: float
    distance: float
    angle: float
    name: str
    frames: tuple[str, ...]


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


def _sorted_entries(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _read_tracklet(pid: int, entry: os.DirEntry) -> tuple[Tracklet | None, int]:
    """One tracklet folder -> (Tracklet or None when it has no frame, number of ignored non-image files)."""
    frames, ignored = [], 0
    with os.scandir(entry.path) as it:
        for f in it:
            if f.name.lower().endswith(IMAGE_SUFFIXES) and not f.name.startswith("."):
                frames.append(f.name)
            else:
                ignored += 1
    if not frames:
        return None, ignored
    frames.sort()
    first = parse_frame_name(frames[0])
    for name in frames[1:]:
        meta = parse_frame_name(name)
        if meta.view != first.view or meta.camid != first.camid:
            raise ValueError(
                f"tracklet {entry.path}: frame {name} is {meta.view} camid {meta.camid} but the first frame "
                f"{frames[0]} is {first.view} camid {first.camid}; all frames of a tracklet must share one camera"
            )
    paths = tuple(os.path.join(entry.path, name) for name in frames)
    tracklet = Tracklet(
        pid=pid,
        camid=first.camid,
        view=first.view,
        altitude=first.altitude,
        distance=first.distance,
        angle=first.angle,
        name=entry.name,
        frames=paths,
    )
    return tracklet, ignored


def read_split(root: str | os.PathLike, split: str) -> list[Tracklet]:
    """List the tracklets of one split, ordered by PID folder then tracklet folder name.

    Args:
        root: dataset root.
        split: "train" or a case part such as "case1_aerial_to_ground/query" (see :func:`case_split`).

    Returns:
        The tracklets; folders without any frame are skipped and counted in one warning.

    Raises:
        FileNotFoundError: the root or split folder does not exist.
        ValueError: a PID folder name is not an integer, a tracklet mixes cameras, or the split is empty.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {root_path} does not exist; expected layout: {EXPECTED_LAYOUT}")
    split_path = root_path / split
    if not split_path.is_dir():
        raise FileNotFoundError(f"split folder {split_path} does not exist; expected layout: {EXPECTED_LAYOUT}")
    tracklets: list[Tracklet] = []
    empty: list[str] = []
    stray: list[str] = []
    for pid_entry in _sorted_entries(str(split_path)):
        if not pid_entry.is_dir():
            stray.append(pid_entry.path)
            continue
        try:
            pid = int(pid_entry.name)
        except ValueError:
            raise ValueError(
                f"PID folder {pid_entry.path}: name {pid_entry.name!r} is not an integer; expected {EXPECTED_LAYOUT}"
            ) from None
        for entry in _sorted_entries(pid_entry.path):
            if not entry.is_dir():
                stray.append(entry.path)
                continue
            tracklet, ignored = _read_tracklet(pid, entry)
            if ignored:
                stray.append(f"{entry.path} ({ignored} non-image files)")
            if tracklet is None:
                empty.append(entry.path)
            else:
                tracklets.append(tracklet)
    if empty:
        warnings.warn(
            f"{split_path}: skipped {len(empty)} tracklet folders without any {'/'.join(IMAGE_SUFFIXES)} frame, "
            f"e.g. {', '.join(empty[:_NUM_EXAMPLES])}",
            stacklevel=2,
        )
    if stray:
        warnings.warn(
            f"{split_path}: ignored {len(stray)} entries that are neither PID/TRACKLET folders nor frames, "
            f"e.g. {', '.join(stray[:_NUM_EXAMPLES])}",
            stacklevel=2,
        )
    if not tracklets:
        raise ValueError(f"split {split!r} under {root_path} holds no tracklet; expected layout: {EXPECTED_LAYOUT}")
    return tracklets
