"""The reader contract every video ReID dataset implements: a root folder -> training tracklets and evaluation cases.

A reader is a class (``--data.dataset NAME`` or a ``class_path`` to a user's own subclass) constructed as
``Reader(root, cache_dir=None, **options)``. It answers four questions:

- :meth:`VideoReIDDataset.train_tracklets`: the training tracklets, with real PIDs, camera ids and view metadata;
- :meth:`VideoReIDDataset.test_set`: the dataset's own evaluation cases (query/gallery of each named case), as an
  :class:`~farreid.data.protocols.EvalSet`;
- :meth:`VideoReIDDataset.validation_cases`: the same cases re-created from held-out training identities (the
  validation split of every dataset is carved from its training identities, ``data.val_share``);
- :meth:`VideoReIDDataset.prompt_camera`: the camera-prompt id the model sees for a tracklet (0 ground, 1 and 2
  the UAV sessions), so that one checkpoint runs on every dataset (the classifier width never blocks it either).

``Tracklet.camid`` is the protocol's camera (the Market-1501 junk rule drops gallery items with the query's PID and
camera); ``Tracklet.view`` is "aerial" or "ground"; altitude, distance and pitch are 0 where a dataset has none.
Every case is scored by ``evaluator.scorer`` (``market``, the rule of every protocol here) and pooled into
``overall``. ``docs/DATASETS.md`` states each dataset's layout and rule with its source.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from farreid.data.geometry import UNKNOWN
from farreid.data.protocols import EvalSet
from farreid.data.tracklets import FrameNamesBuilder, Tracklet

GROUND_PROMPT, AERIAL_PROMPT = 0, 1
_HDF5 = b"\x89HDF\r\n\x1a\n"


class VideoReIDDataset(ABC):
    """Base class of the dataset readers (see the module docstring for the contract).

    Args:
        root: the dataset's root folder, laid out as the subclass's ``LAYOUT`` says.
        cache_dir: where folder listings may be cached (see :mod:`farreid.data.index_cache`); None lists every
            time. Readers whose layout ships its own index files (MARS ``info/``) need no cache.
    """

    name: ClassVar[str] = ""
    LAYOUT: ClassVar[str] = ""
    CASES: ClassVar[tuple[str, ...]] = ("all",)

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.name} root {self.root} does not exist; expected layout: {self.LAYOUT}")

    @abstractmethod
    def train_tracklets(self) -> list[Tracklet]:
        """The training tracklets (real PIDs), in a deterministic order."""

    @abstractmethod
    def test_set(self) -> EvalSet:
        """The dataset's evaluation cases, named as in ``CASES``."""

    def validation_cases(self, tracklets: Sequence[Tracklet]) -> EvalSet:
        """One case ``all`` from held-out identities: the first tracklet of every (PID, camera) is a query, every
        held-out tracklet is in the gallery; the Market-1501 rule then drops the query's own camera, so each query
        is matched across cameras (queries without another camera are skipped by the metric)."""
        tracklets = list(tracklets)
        first: dict[tuple[int, int], int] = {}
        for i, t in enumerate(tracklets):
            first.setdefault((t.pid, t.camid), i)
        cams = {t.camid for t in tracklets}
        if len(cams) < 2:
            raise ValueError(
                f"{self.name} validation: the held-out identities have tracklets from {len(cams)} camera(s); "
                "cross-camera matching needs two: raise data.val_share"
            )
        query = np.array(sorted(first.values()), dtype=np.int64)
        return EvalSet(tracklets=tracklets, cases={"all": (query, np.arange(len(tracklets)))}, anonymized=False)

    def prompt_camera(self, tracklet: Tracklet) -> int:
        """The camera-prompt id for the model: 0 ground, 1 aerial (farreid choice: view-level prompts, so that the
        prompt table of a checkpoint fits every dataset; the baseline sizes it per dataset, ``num_camera``)."""
        return GROUND_PROMPT if tracklet.view == "ground" else AERIAL_PROMPT

    def name_geometry(self, tracklet: Tracklet) -> tuple[float, float, float]:
        """(altitude m, distance m, pitch deg) that the tracklet's names carry, NaN where they carry none (the default:
        no geometry; :mod:`farreid.data.geometry`)."""
        return UNKNOWN

    def cached_splits(self, stage: str, test_split: str) -> list[str]:
        """The folder splits (for :func:`~farreid.data.index_cache.cached_split`) that ``stage`` reads, so that the
        datamodule lists them once per node before ``setup``; [] for layouts indexed by their own files."""
        return []

    def describe(self) -> dict:
        """What results.json records about the data: the reader's name and root (subclasses add their split)."""
        return {"dataset": self.name, "root": str(self.root)}


def tracklets_from_names(
    names: Sequence[str],
    spans: Sequence[tuple[int, int]],
    folders: Sequence[str],
    meta: Sequence[tuple[int, int, str]],
    tracklet_names: Sequence[str] | None = None,
) -> list[Tracklet]:
    """Tracklets whose frames are contiguous runs of one name list (the MARS ``info/*_name.txt`` convention),
    stored compactly (:class:`~farreid.data.tracklets.FrameNames`: no Python string per frame once built).

    Args:
        names: every frame name of the split, in file order.
        spans: per tracklet, (first, count) into ``names``.
        folders: per tracklet, the folder holding its frames.
        meta: per tracklet, (pid, camid, view).
        tracklet_names: per tracklet, the name shown in reports; default: the first frame's stem.
    """
    builder = FrameNamesBuilder()
    for first, count in spans:
        builder.add(names[first : first + count])
    table = builder.build()
    out = []
    for i, ((first, _), folder, (pid, camid, view)) in enumerate(zip(spans, folders, meta, strict=True)):
        name = tracklet_names[i] if tracklet_names is not None else os.path.splitext(names[first])[0]
        frames = table.frames(i, folder)
        out.append(Tracklet(pid, camid, view, 0.0, 0.0, 0.0, name, frames))
    return out


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text index file, or a clear error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_mat(path: Path, key: str) -> np.ndarray:
    """Array ``key`` of a MATLAB file: v7.3 (HDF5, read with h5py, transposed back to MATLAB's order) or older
    (scipy.io.loadmat). Both libraries are imported only here."""
    if not path.is_file():
        raise FileNotFoundError(f"MATLAB file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(520)
    hdf5 = _HDF5 in (head[:8], head[512:520])  # v7.3 files carry a 512-byte text header before the signature
    try:
        if hdf5:
            import h5py

            with h5py.File(path, "r") as f:
                if key not in f:
                    raise KeyError(f"{path} (HDF5 .mat) has no variable {key!r}; it holds {sorted(f.keys())}")
                return np.asarray(f[key]).T  # h5py reads MATLAB's column-major arrays transposed
        from scipy.io import loadmat

        data = loadmat(str(path))
    except ImportError as err:
        raise ImportError(f"reading {path} needs {err.name}: pip install scipy h5py") from None
    if key not in data:
        raise KeyError(f"{path} has no variable {key!r}; it holds {sorted(k for k in data if not k.startswith('__'))}")
    return np.asarray(data[key])
