"""iLIDS-VID and PRID-2011: one tracklet per person and camera, 10 random train/test splits of the persons.

Layouts::

    iLIDS-VID: ROOT/i-LIDS-VID/sequences/cam1/<person>/*.png, .../cam2/<person>/*.png, ROOT/splits.json
               (or, without splits.json, ROOT/train-test people splits/train_test_splits_ilidsvid.mat)
    PRID-2011: ROOT/multi_shot/cam_a/<person>/*.png, ROOT/multi_shot/cam_b/<person>/*.png,
               ROOT/splits_prid2011.json

A splits file is a JSON list of ``{"train": [person folder, ...], "test": [...]}``; ``split_id`` picks one (reported
in results.json). The protocol is camera 1 -> camera 2: the test persons' camera-1 tracklets are the queries, their
camera-2 tracklets the gallery. The PID is the number in the person folder's name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from farreid.data.datasets.base import VideoReIDDataset, load_mat, tracklets_from_names
from farreid.data.protocols import EvalSet
from farreid.data.tracklets import IMAGE_SUFFIXES, Tracklet

_DIGITS = re.compile(r"(\d+)")


class TwoCameraDataset(VideoReIDDataset):
    """Shared reader of iLIDS-VID and PRID-2011 (subclasses give the folders and the splits file)."""

    CAMERA_DIRS: tuple[str, str] = ("", "")
    SPLITS_FILE = ""

    def __init__(self, root, cache_dir=None, split_id: int = 0) -> None:
        super().__init__(root, cache_dir)
        self.split_id = int(split_id)
        splits = self._splits()
        if not 0 <= self.split_id < len(splits):
            raise ValueError(f"{self.name}: split_id {split_id} outside the {len(splits)} splits of {self.splits_path}")
        split = splits[self.split_id]
        if not isinstance(split, dict) or not {"train", "test"} <= set(split):
            raise ValueError(f"{self.splits_path}: split {self.split_id} must hold 'train' and 'test' person lists")
        self.train_persons, self.test_persons = list(split["train"]), list(split["test"])
        overlap = set(self.train_persons) & set(self.test_persons)
        if overlap:
            raise ValueError(f"{self.splits_path}: split {self.split_id} trains and tests {sorted(overlap)[:5]}")

    @property
    def splits_path(self) -> Path:
        return self.root / self.SPLITS_FILE

    def _splits(self) -> list:
        if not self.splits_path.is_file():
            raise FileNotFoundError(f"{self.name}: splits file {self.splits_path} is missing; layout: {self.LAYOUT}")
        try:
            splits = json.loads(self.splits_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.splits_path}: not valid JSON ({err})") from None
        if not isinstance(splits, list) or not splits:
            raise ValueError(f"{self.splits_path}: expected a non-empty JSON list of splits")
        return splits

    def _tracklets(self, persons: Sequence[str], cameras: Sequence[int]) -> list[Tracklet]:
        names: list[str] = []
        spans, folders, meta, labels = [], [], [], []
        for person in persons:
            match = _DIGITS.search(person)
            if match is None:
                raise ValueError(f"{self.splits_path}: person folder {person!r} has no number to use as its PID")
            for cam in cameras:
                folder = str(self.root / self.CAMERA_DIRS[cam] / person)
                if not os.path.isdir(folder):
                    raise FileNotFoundError(f"{self.name}: person folder {folder} (in {self.splits_path}) is missing")
                frames = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
                if not frames:
                    raise ValueError(f"{self.name}: {folder} holds no frame")
                spans.append((len(names), len(frames)))
                names.extend(frames)
                folders.append(folder)
                meta.append((int(match.group(1)), cam, "ground"))
                labels.append(f"{person}_cam{cam + 1}")
        return tracklets_from_names(names, spans, folders, meta, labels)

    def train_tracklets(self) -> list[Tracklet]:
        return self._tracklets(self.train_persons, (0, 1))

    def test_set(self) -> EvalSet:
        query = self._tracklets(self.test_persons, (0,))
        gallery = self._tracklets(self.test_persons, (1,))
        cases = {"all": (np.arange(len(query)), np.arange(len(query), len(query) + len(gallery)))}
        return EvalSet(tracklets=query + gallery, cases=cases, anonymized=False)

    def validation_cases(self, tracklets: Sequence[Tracklet]) -> EvalSet:
        """Camera 1 -> camera 2 among the held-out identities, as the test protocol."""
        tracklets = list(tracklets)
        query = np.flatnonzero([t.camid == 0 for t in tracklets])
        gallery = np.flatnonzero([t.camid == 1 for t in tracklets])
        return EvalSet(tracklets=tracklets, cases={"all": (query, gallery)}, anonymized=False)

    def describe(self) -> dict:
        return {**super().describe(), "split_id": self.split_id, "splits_file": str(self.splits_path)}


class ILIDSVID(TwoCameraDataset):
    """iLIDS-VID (Wang et al. ECCV 2014): 300 persons, 2 cameras, ``split_id`` in 0..9."""

    name = "ilidsvid"
    LAYOUT = "ROOT/i-LIDS-VID/sequences/{cam1,cam2}/<person>/*.png and ROOT/splits.json"
    CAMERA_DIRS = ("i-LIDS-VID/sequences/cam1", "i-LIDS-VID/sequences/cam2")
    SPLITS_FILE = "splits.json"
    MAT_FILE = "train-test people splits/train_test_splits_ilidsvid.mat"

    def _splits(self) -> list:
        """splits.json when present; else the ten splits of the released .mat (``ls_set``: per split a permutation
        of the person numbers, 1-based; the first half tests, following Wang et al.), with the camera-1 person
        folders in sorted order (farreid choice: the baseline uses the unordered ``os.listdir``)."""
        mat = self.root / self.MAT_FILE
        if self.splits_path.is_file() or not mat.is_file():
            return super()._splits()
        order = load_mat(mat, "ls_set").astype(np.int64)
        persons = sorted(os.listdir(self.root / self.CAMERA_DIRS[0]))
        if order.ndim != 2 or order.max() > len(persons) or order.min() < 1:
            raise ValueError(f"{mat}: ls_set must be (splits, persons) of 1-based numbers up to {len(persons)}")
        half = order.shape[1] // 2
        named = [[persons[i - 1] for i in row] for row in order.tolist()]
        return [{"train": sorted(row[half:]), "test": sorted(row[:half])} for row in named]


class PRID(TwoCameraDataset):
    """PRID-2011 multi-shot (Hirzer et al. SCIA 2011): cameras a and b, ``split_id`` in 0..9."""

    name = "prid"
    LAYOUT = "ROOT/multi_shot/{cam_a,cam_b}/<person>/*.png and ROOT/splits_prid2011.json"
    CAMERA_DIRS = ("multi_shot/cam_a", "multi_shot/cam_b")
    SPLITS_FILE = "splits_prid2011.json"
