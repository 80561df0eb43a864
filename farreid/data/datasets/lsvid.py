"""LS-VID (Li et al. ICCV 2019): sequence lists plus a query index.

Layout::

    ROOT/list_sequence/list_seq_train.txt, list_seq_test.txt   lines "<path prefix> <pid>"
    ROOT/test/data/info_test.mat                               variable ``query``: 1-based rows of list_seq_test
    ROOT/<path prefix>*                                        a tracklet's frames: every image whose path starts so

The camera is the third ``_`` field of the first frame's name, numbered from 1 (``<a>_<b>_<cam>_<frame>.jpg``).
Rows with PID -1 are left out and counted. The gallery is every test row that is not a query.
"""

from __future__ import annotations

import bisect
import os
import warnings

import numpy as np

from farreid.data.datasets.base import VideoReIDDataset, load_mat, read_lines, tracklets_from_names
from farreid.data.protocols import EvalSet
from farreid.data.tracklets import IMAGE_SUFFIXES, Tracklet


def lsvid_camera(path: str) -> int:
    """The camera (from 0) of an LS-VID frame: its third ``_`` field, numbered from 1 in the name."""
    fields = os.path.basename(path).split("_")
    if len(fields) < 4 or not fields[2].isdigit() or int(fields[2]) < 1:
        raise ValueError(f"frame {path}: expected an LS-VID name <a>_<b>_<camera from 1>_<frame>.jpg")
    return int(fields[2]) - 1


class LSVID(VideoReIDDataset):
    """LS-VID: 15 cameras, one case ``all`` under the Market-1501 rule."""

    name = "lsvid"
    LAYOUT = (
        "ROOT/list_sequence/{list_seq_train.txt, list_seq_test.txt} ('<path prefix> <pid>' lines), "
        "ROOT/test/data/info_test.mat (query), frames ROOT/<path prefix>*"
    )

    def __init__(self, root, cache_dir=None) -> None:
        super().__init__(root, cache_dir)
        self._listings: dict[str, list[str]] = {}

    def _listing(self, folder: str) -> list[str]:
        if folder not in self._listings:
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"lsvid: frame folder {folder} does not exist")
            names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
            self._listings[folder] = sorted(names)
        return self._listings[folder]

    def _rows(self, list_name: str) -> list[tuple[str, int]]:
        path = self.root / "list_sequence" / list_name
        rows = []
        for number, line in enumerate(read_lines(path, "sequence list"), 1):
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path} line {number}: {line!r} is not '<path prefix> <pid>'")
            rows.append((parts[0], int(parts[1])))
        return rows

    def _read(self, list_name: str, rows: list[tuple[str, int]] | None = None) -> tuple[list[Tracklet], np.ndarray]:
        """The tracklets of a sequence list and, per tracklet, its row in the list."""
        rows = self._rows(list_name) if rows is None else rows
        names: list[str] = []
        spans, folders, meta, kept, junk = [], [], [], [], 0
        for row, (prefix, pid) in enumerate(rows):
            if pid == -1:
                junk += 1
                continue
            folder, stem = os.path.split(os.path.join(self.root, prefix))
            listing = self._listing(folder)
            lo = bisect.bisect_left(listing, stem)
            hi = bisect.bisect_left(listing, stem + "\U0010ffff")
            frames = listing[lo:hi]
            if not frames:
                raise ValueError(f"{list_name} row {row + 1}: no frame {os.path.join(folder, stem)}* exists")
            camid = lsvid_camera(os.path.join(folder, frames[0]))
            if lsvid_camera(os.path.join(folder, frames[-1])) != camid:
                raise ValueError(f"{list_name} row {row + 1}: frames of {prefix} come from two cameras")
            spans.append((len(names), len(frames)))
            names.extend(frames)
            folders.append(folder)
            meta.append((pid, camid, "ground"))
            kept.append(row)
        if junk:
            warnings.warn(f"{self.root / 'list_sequence' / list_name}: left out {junk} rows with PID -1", stacklevel=3)
        tracklet_names = [os.path.basename(rows[r][0]).rstrip("_") for r in kept]
        return tracklets_from_names(names, spans, folders, meta, tracklet_names), np.asarray(kept, dtype=np.int64)

    def train_tracklets(self) -> list[Tracklet]:
        return self._read("list_seq_train.txt")[0]

    def test_set(self) -> EvalSet:
        tracklets, kept = self._read("list_seq_test.txt")
        query_path = self.root / "test" / "data" / "info_test.mat"
        rows = load_mat(query_path, "query").astype(np.int64).ravel() - 1
        position = np.full(int(kept.max()) + 1 if len(kept) else 0, -1, dtype=np.int64)
        position[kept] = np.arange(len(kept))
        if len(rows) == 0 or rows.min() < 0 or rows.max() >= len(position) or (position[rows] < 0).any():
            raise ValueError(f"{query_path}: query rows must point at rows of list_seq_test.txt with a PID")
        query = np.unique(position[rows])
        gallery = np.setdiff1d(np.arange(len(tracklets)), query)
        return EvalSet(tracklets=tracklets, cases={"all": (query, gallery)}, anonymized=False)
