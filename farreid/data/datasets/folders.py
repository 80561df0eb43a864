"""Readers of the ``SPLIT/PID/TRACKLET/frames`` layouts: DetReIDX, AG-VPReID and DukeMTMC-VideoReID.

All three list their folders with the compact, cached DetReIDX listing (:func:`~farreid.data.detreidx.list_split`
and :mod:`~farreid.data.index_cache`); AG-VPReID and DukeMTMC-VideoReID then read each tracklet's camera from its
own frame-name grammar, where a name that does not parse is an error naming the file (the baseline falls back to
camera 0).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from farreid.data.datasets.base import VideoReIDDataset
from farreid.data.detreidx import CASES, EXPECTED_LAYOUT, case_split
from farreid.data.geometry import UNKNOWN, name_geometry
from farreid.data.index_cache import read_split
from farreid.data.protocols import EvalSet, released_cases, validation_cases
from farreid.data.tracklets import Tracklet

CameraParser = Callable[[str], tuple[int, str]]  # frame path -> (camid, view)


def read_folder_split(
    root: str, split: str, cache_dir: str | None, camera: CameraParser | None = None
) -> list[Tracklet]:
    """The tracklets of ``ROOT/SPLIT/PID/TRACKLET/*`` (compact index, cached), with the camera and view that
    ``camera`` reads from the first frame's name; the last frame must name the same camera (checked per tracklet)."""
    tracklets = read_split(root, split, cache_dir=cache_dir)
    if camera is None:
        return tracklets
    out = []
    for t in tracklets:
        camid, view = camera(t.frames[0])
        last = camera(t.frames[-1])
        if last != (camid, view):
            raise ValueError(
                f"tracklet {os.path.dirname(t.frames[0])}: frame {os.path.basename(t.frames[-1])} is camera {last[0]} "
                f"but frame {os.path.basename(t.frames[0])} is camera {camid}; a tracklet must come from one camera"
            )
        out.append(dataclasses.replace(t, camid=camid, view=view))
    return out


def folder_cases(splits: dict[str, tuple[str, str]], read: Callable[[str], list[Tracklet]]) -> EvalSet:
    """An :class:`EvalSet` from case -> (query split, gallery split) folders, each read by ``read``."""
    tracklets: list[Tracklet] = []
    cases: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for case, parts in splits.items():
        index = []
        for split in parts:
            items = read(split)
            index.append(np.arange(len(tracklets), len(tracklets) + len(items)))
            tracklets.extend(items)
        cases[case] = (index[0], index[1])
    return EvalSet(tracklets=tracklets, cases=cases, anonymized=False)


class DetReIDX(VideoReIDDataset):
    """DetReIDX (the default): ``train/`` and the three case folders; A2G, G2A, A2A; the released test set may be
    anonymized (then farreid writes the challenge CSV). Exactly farreid's original reader."""

    name = "detreidx"
    LAYOUT = EXPECTED_LAYOUT
    CASES = tuple(CASES)

    def __init__(self, root, cache_dir=None) -> None:  # no root check here: the listing reports a missing root
        self.root, self.cache_dir = Path(root), None if cache_dir is None else str(cache_dir)

    def train_tracklets(self) -> list[Tracklet]:
        return read_split(self.root, "train", cache_dir=self.cache_dir)

    def test_set(self) -> EvalSet:
        return released_cases(str(self.root), cache_dir=self.cache_dir)

    def validation_cases(self, tracklets: Sequence[Tracklet]) -> EvalSet:
        return validation_cases(tracklets)

    def prompt_camera(self, tracklet: Tracklet) -> int:
        return tracklet.camid  # 0 ground, 1/2 the UAV session: the prompt ids themselves

    def name_geometry(self, tracklet: Tracklet) -> tuple[float, float, float]:
        return name_geometry(tracklet)  # aerial frames name altitude, distance and pitch (DOMAIN.md section 2)

    def cached_splits(self, stage: str, test_split: str) -> list[str]:
        splits = ["train"] if stage in ("fit", "validate") or test_split == "val" else []
        if stage in ("test", "predict") and test_split == "cases":
            splits = [case_split(case, part) for case in CASES for part in ("query", "gallery")]
        return splits


# ------------------------------------------------------------------------------------------------ AG-VPReID
AGVPREID_NAME = re.compile(r"^P(\d+)T(\d+)A(\d+)C(\d+)E(\d+)K(\d+)F(\d+)")
AGVPREID_AERIAL_CAMERAS = frozenset({4, 5})  # C4/C5 UAV; C0/C1 CCTV and C2/C3 wearable are ground (AG-VPReID README)


def parse_agvpreid_name(path: str) -> tuple[int, str]:
    """(camid, view) of an AG-VPReID frame ``P{pid}T{date}A{altitude}C{camera}E{event}K{key}F{frame}.jpg``.

    Raises:
        ValueError: the name does not follow that grammar (the baseline silently used camera 0).
    """
    name = os.path.basename(path)
    match = AGVPREID_NAME.match(name)
    if match is None:
        raise ValueError(f"frame {path}: name {name!r} is not an AG-VPReID name P<pid>T<date>A<alt>C<cam>E<e>K<k>F<n>")
    camid = int(match.group(4))
    return camid, "aerial" if camid in AGVPREID_AERIAL_CAMERAS else "ground"


class AGVPReID(VideoReIDDataset):
    """AG-VPReID: DetReIDX's folder layout with two cases, ``case1_aerial_to_ground`` (A2G) and
    ``case2_ground_to_aerial`` (G2A); the camera is the ``C`` field of the frame names."""

    name = "agvpreid"
    LAYOUT = (
        "ROOT/train/PID/TRACKLET/*.jpg, ROOT/case1_aerial_to_ground/{query,gallery}/PID/TRACKLET/*.jpg, "
        "ROOT/case2_ground_to_aerial/{query,gallery}/PID/TRACKLET/*.jpg; frames P<pid>T<date>A<alt>C<cam>E<e>K<k>F<n>"
    )
    CASES = ("A2G", "G2A")
    FOLDERS = {"A2G": "case1_aerial_to_ground", "G2A": "case2_ground_to_aerial"}

    def __init__(self, root, cache_dir=None, altitude_unit_m: float | None = None) -> None:
        """``altitude_unit_m``: metres per unit of the frame names' ``A`` field. The dataset does not document the
        field's unit, so farreid reads no altitude unless it is given (``--data.dataset_options
        '{altitude_unit_m: 1.0}'`` when ``A`` is in metres); then aerial tracklets carry that altitude as geometry
        (distance and pitch stay unknown)."""
        super().__init__(root, cache_dir)
        if altitude_unit_m is not None and not altitude_unit_m > 0:
            raise ValueError(f"agvpreid altitude_unit_m must be a positive number of metres, got {altitude_unit_m}")
        self.altitude_unit_m = altitude_unit_m

    def name_geometry(self, tracklet: Tracklet) -> tuple[float, float, float]:
        if self.altitude_unit_m is None or tracklet.view != "aerial" or not len(tracklet.frames):
            return UNKNOWN
        name = os.path.basename(tracklet.frames[0])
        match = AGVPREID_NAME.match(name)
        if match is None:
            raise ValueError(f"frame {tracklet.frames[0]}: {name!r} is not an AG-VPReID name P<pid>T<date>A<alt>...")
        return (int(match.group(3)) * self.altitude_unit_m, math.nan, math.nan)

    def _read(self, split: str) -> list[Tracklet]:
        return read_folder_split(str(self.root), split, self.cache_dir, parse_agvpreid_name)

    def train_tracklets(self) -> list[Tracklet]:
        return self._read("train")

    def test_set(self) -> EvalSet:
        return folder_cases({c: (f"{f}/query", f"{f}/gallery") for c, f in self.FOLDERS.items()}, self._read)

    def validation_cases(self, tracklets: Sequence[Tracklet]) -> EvalSet:
        """A2G: aerial queries against the ground gallery; G2A the reverse (both from held-out identities)."""
        tracklets = list(tracklets)
        aerial = np.flatnonzero([t.view == "aerial" for t in tracklets])
        ground = np.flatnonzero([t.view == "ground" for t in tracklets])
        if len(aerial) == 0 or len(ground) == 0:
            raise ValueError(
                f"agvpreid validation: {len(aerial)} aerial and {len(ground)} ground tracklets among the held-out "
                "identities; A2G and G2A need both: raise data.val_share"
            )
        return EvalSet(tracklets=tracklets, cases={"A2G": (aerial, ground), "G2A": (ground, aerial)})

    def cached_splits(self, stage: str, test_split: str) -> list[str]:
        if stage in ("test", "predict") and test_split == "cases":
            return [f"{f}/{part}" for f in self.FOLDERS.values() for part in ("query", "gallery")]
        return ["train"]


# -------------------------------------------------------------------------------------- DukeMTMC-VideoReID
DUKE_NAME = re.compile(r"^(\d+)_?C(\d+)_?F(\d+)")


def parse_duke_name(path: str) -> tuple[int, str]:
    """(camid from 0, "ground") of a DukeMTMC-VideoReID frame, ``0001_C6_F0099_X30823.jpg`` or the older
    ``0001C6F0099X30823.jpg``; cameras are numbered from 1 in the names."""
    name = os.path.basename(path)
    match = DUKE_NAME.match(name)
    if match is None or int(match.group(2)) < 1:
        raise ValueError(f"frame {path}: name {name!r} is not a DukeMTMC-VideoReID name <pid>_C<cam>_F<frame>_X<n>.jpg")
    return int(match.group(2)) - 1, "ground"


class DukeVideo(VideoReIDDataset):
    """DukeMTMC-VideoReID: ``train/``, ``query/`` and ``gallery/`` folders of PID/TRACKLET/*.jpg; one case."""

    name = "dukevideo"
    LAYOUT = "ROOT/{train,query,gallery}/PID/TRACKLET/<pid>_C<cam>_F<frame>_X<n>.jpg"

    def _read(self, split: str) -> list[Tracklet]:
        return read_folder_split(str(self.root), split, self.cache_dir, parse_duke_name)

    def train_tracklets(self) -> list[Tracklet]:
        return self._read("train")

    def test_set(self) -> EvalSet:
        return folder_cases({"all": ("query", "gallery")}, self._read)

    def cached_splits(self, stage: str, test_split: str) -> list[str]:
        if stage in ("test", "predict") and test_split == "cases":
            return ["query", "gallery"]
        return ["train"]
