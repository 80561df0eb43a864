"""Video ReID dataset readers behind one contract (:class:`VideoReIDDataset`); ``--data.dataset`` picks one.

``--data.dataset`` takes a short name (the keys of ``READERS``) or the dotted path of any
:class:`VideoReIDDataset` subclass (``mypackage.readers.MyDataset``); ``--data.dataset_options`` passes keyword
options to it (e.g. ``{split_id: 3}`` for iLIDS-VID and PRID-2011).
"""

from __future__ import annotations

import importlib
import inspect
import os

from farreid.data.datasets.base import VideoReIDDataset

# short name -> class path (the CLI accepts either)
READERS: dict[str, str] = {
    "detreidx": "farreid.data.datasets.folders.DetReIDX",
    "agvpreid": "farreid.data.datasets.folders.AGVPReID",
    "g2a": "farreid.data.datasets.mars.G2AVReID",
    "mars": "farreid.data.datasets.mars.Mars",
    "lsvid": "farreid.data.datasets.lsvid.LSVID",
    "ilidsvid": "farreid.data.datasets.twocam.ILIDSVID",
    "prid": "farreid.data.datasets.twocam.PRID",
    "dukevideo": "farreid.data.datasets.folders.DukeVideo",
}


def reader_class(dataset: str) -> type[VideoReIDDataset]:
    """The reader class of a short name or a dotted class path.

    Raises:
        ValueError: an unknown name, a path that does not import, or a class that is not a VideoReIDDataset.
    """
    path = READERS.get(dataset, dataset)
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"data.dataset {dataset!r}: expected one of {sorted(READERS)} or a dotted class path")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"data.dataset {dataset!r}: cannot import {path} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, VideoReIDDataset)):
        raise ValueError(f"data.dataset {dataset!r}: {path} is not a farreid.data.datasets.VideoReIDDataset subclass")
    return cls


def make_reader(
    dataset: str, root: str | os.PathLike, cache_dir: str | None = None, options: dict | None = None
) -> VideoReIDDataset:
    """Construct the reader of ``dataset`` on ``root`` with its keyword ``options``."""
    cls = reader_class(dataset)
    options = dict(options or {})
    try:
        inspect.signature(cls).bind(root, cache_dir=cache_dir, **options)
    except TypeError as err:
        raise ValueError(f"data.dataset_options {options} do not fit {cls.__name__}: {err}") from None
    return cls(root, cache_dir=cache_dir, **options)


def dataset_provenance(ckpt_path: str | None, datamodule) -> dict:
    """Which dataset trained the checkpoint and which one this run reads (the ``data`` entry of results.json).

    ``trained_on`` comes from the datamodule hyperparameters Lightning saves in the checkpoint
    (``datamodule_hyper_parameters``); a checkpoint without them says so instead of guessing.
    """
    tested = datamodule.reader.describe()
    if not ckpt_path:
        return {"trained_on": {"dataset": None, "note": "no checkpoint: the untrained model"}, "tested_on": tested}
    import torch

    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("datamodule_hyper_parameters")
    if not saved:
        trained = {"dataset": None, "note": f"{ckpt_path} does not record its datamodule's hyperparameters"}
    elif "dataset" not in saved:
        trained = {"dataset": "detreidx", "root": saved.get("root"), "note": "checkpoint predates data.dataset"}
    else:
        trained = {"dataset": saved["dataset"], "root": saved.get("root"), "options": saved.get("dataset_options")}
    return {"trained_on": trained, "tested_on": tested}


__all__ = ["READERS", "VideoReIDDataset", "dataset_provenance", "make_reader", "reader_class"]
