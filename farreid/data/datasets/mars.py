"""MARS and G2A-VReID: frames listed in ``info/*_name.txt``, tracklets as row ranges in ``info/tracks_*_info.mat``.

Layout (MARS, Zheng et al. ECCV 2016; G2A-VReID uses the same files)::

    ROOT/bbox_train/PPPP/<frame>.jpg     ROOT/bbox_test/PPPP/<frame>.jpg
    ROOT/info/train_name.txt, test_name.txt         one frame name per line
    ROOT/info/tracks_train_info.mat (track_train_info), tracks_test_info.mat (track_test_info)
        one row per tracklet: first and last line (1-based, inclusive) in the name file, PID, camera (1-based)
    ROOT/info/query_IDX.mat (query_IDX)             1-based rows of the test tracklets that are queries

A frame name starts with the 4-character PID and the camera digit at position 5 (``0001C1T0001F001.jpg``); its
folder is the PID. Rows with PID -1 (MARS's junk tracklets) are left out and counted; PID 0 (distractors) stays in
the gallery. The gallery is every test tracklet that is not a query.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from farreid.data.datasets.base import VideoReIDDataset, load_mat, read_lines, tracklets_from_names
from farreid.data.protocols import EvalSet
from farreid.data.tracklets import Tracklet


def read_info_split(
    root: Path, names_file: str, info_file: str, info_key: str, home: str, view_of: dict[int, str]
) -> list[Tracklet]:
    """The tracklets of one MARS-style split, with names and cameras checked against the info rows.

    Args:
        root: dataset root. names_file, info_file: paths under ``root/info``; info_key: the .mat variable.
        home: the frame folder (``bbox_train`` or ``bbox_test``).
        view_of: camid (from 0) -> "aerial"/"ground"; cameras not listed are ground.

    Raises:
        ValueError: a row is out of range of the name file, or a frame name disagrees with its row's PID/camera.
    """
    names = read_lines(root / "info" / names_file, "frame-name file")
    info_path = root / "info" / info_file
    info = load_mat(info_path, info_key).astype(np.int64)
    if info.ndim != 2 or info.shape[1] < 4:
        raise ValueError(f"{info_path}: {info_key} must be (N, 4): start, end, pid, camera; got {info.shape}")
    spans, folders, meta, junk = [], [], [], 0
    for row, (start, end, pid, cam) in enumerate(info[:, :4].tolist()):
        if pid == -1:
            junk += 1
            continue
        where = f"{info_path} row {row + 1}"
        if not 1 <= start <= end <= len(names):
            raise ValueError(f"{where}: frames {start}..{end} outside the {len(names)} names of {names_file}")
        if cam < 1:
            raise ValueError(f"{where}: camera {cam}; cameras are numbered from 1")
        for name in (names[start - 1], names[end - 1]):
            if len(name) < 6 or not name[:4].isdigit() or name[5] != str(cam) or int(name[:4]) != pid:
                raise ValueError(
                    f"{where}: frame {name!r} of {names_file} does not belong to PID {pid} camera {cam} "
                    "(expected <4-digit PID>C<camera>...: 0001C1T0001F001.jpg)"
                )
        spans.append((start - 1, end - start + 1))
        folders.append(os.path.join(root, home, names[start - 1][:4]))
        meta.append((pid, cam - 1, view_of.get(cam - 1, "ground")))
    if junk:
        warnings.warn(f"{info_path}: left out {junk} tracklets with PID -1 (junk)", stacklevel=3)
    if not spans:
        raise ValueError(f"{info_path}: no tracklet with a PID")
    return tracklets_from_names(names, spans, folders, meta)


class Mars(VideoReIDDataset):
    """MARS: 6 ground cameras, one case ``all`` under the Market-1501 rule (``info/`` files as above)."""

    name = "mars"
    LAYOUT = (
        "ROOT/bbox_train/PPPP/*.jpg, ROOT/bbox_test/PPPP/*.jpg, ROOT/info/{train_name.txt, test_name.txt, "
        "tracks_train_info.mat, tracks_test_info.mat, query_IDX.mat}"
    )
    VIEWS: dict[int, str] = {}

    def __init__(self, root, cache_dir=None) -> None:
        super().__init__(root, cache_dir)
        if not (self.root / "info").is_dir():
            raise FileNotFoundError(f"{self.name}: {self.root / 'info'} does not exist; expected layout: {self.LAYOUT}")

    def train_tracklets(self) -> list[Tracklet]:
        return read_info_split(
            self.root, "train_name.txt", "tracks_train_info.mat", "track_train_info", "bbox_train", self.VIEWS
        )

    def test_set(self) -> EvalSet:
        tracklets = read_info_split(
            self.root, "test_name.txt", "tracks_test_info.mat", "track_test_info", "bbox_test", self.VIEWS
        )
        # query_IDX counts rows of the info file, junk rows included: map rows to the tracklets kept.
        info = load_mat(self.root / "info" / "tracks_test_info.mat", "track_test_info")
        kept = np.flatnonzero(info[:, 2].astype(np.int64) != -1)
        position = np.full(len(info), -1, dtype=np.int64)
        position[kept] = np.arange(len(kept))
        query_path = self.root / "info" / "query_IDX.mat"
        rows = load_mat(query_path, "query_IDX").astype(np.int64).ravel() - 1
        if len(rows) == 0 or rows.min() < 0 or rows.max() >= len(info):
            raise ValueError(f"{query_path}: query rows must lie in 1..{len(info)} (rows of tracks_test_info.mat)")
        query = position[rows]
        if (query < 0).any():
            raise ValueError(f"{query_path}: {(query < 0).sum()} queries point at PID -1 (junk) rows")
        gallery = np.setdiff1d(np.arange(len(tracklets)), query)
        return EvalSet(tracklets=tracklets, cases={"all": (np.unique(query), gallery)}, anonymized=False)


class G2AVReID(Mars):
    """G2A-VReID (the VSLA-CLIP paper's dataset): MARS's files and names, one case ``all``.

    The stored documentation does not say which camera number is the UAV: pass ``aerial_cameras`` (numbers as in
    the names, from 1) to give those tracklets the aerial view and camera prompt; by default every tracklet is
    treated as ground (farreid choice: no guess).
    """

    name = "g2a"

    def __init__(self, root, cache_dir=None, aerial_cameras: list[int] | None = None) -> None:
        super().__init__(root, cache_dir)
        self.VIEWS = {int(c) - 1: "aerial" for c in aerial_cameras or []}

    def describe(self) -> dict:
        return {**super().describe(), "aerial_cameras": sorted(c + 1 for c in self.VIEWS)}
