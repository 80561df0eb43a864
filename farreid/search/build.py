"""Building an :class:`~farreid.search.index.ArchiveIndex` from embeddings, and opening a saved one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from farreid import __version__
from farreid.search.embeddings import EmbeddingSet
from farreid.search.index import ADD_BLOCK, FORMAT, ArchiveIndex, IndexSpec, choose_spec, require_faiss
from farreid.search.table import TrackletTable


def shard_offsets(num: int, shards: int) -> np.ndarray:
    """(S + 1,) first row of each of ``shards`` near-equal contiguous ranges of ``num`` rows."""
    if not 1 <= shards <= num:
        raise ValueError(f"shards = {shards}: expected 1 <= shards <= {num}, the number of vectors")
    return np.linspace(0, num, shards + 1).round().astype(np.int64)


def build_index(
    embeddings: EmbeddingSet,
    kind: str = "auto",
    *,
    storage: str | None = None,
    shards: int = 1,
    seed: int = 0,
    spec: IndexSpec | None = None,
) -> ArchiveIndex:
    """An index over ``embeddings.vectors`` (see :func:`~farreid.search.index.choose_spec` for ``kind``/``storage``).

    Args:
        embeddings: the vectors (N, D) and their table.
        shards: contiguous row ranges, each its own FAISS index (an approximate index is trained once, on a
            random sample of ``spec.train_size`` rows drawn with ``seed``, and cloned).
        spec: overrides ``kind``/``storage`` with explicit parameters.
    """
    faiss = require_faiss()
    vectors = embeddings.vectors  # checked when the EmbeddingSet was made
    num, dim = vectors.shape
    spec = spec or choose_spec(num, dim, kind, storage)
    offsets = shard_offsets(num, shards)
    empty = faiss.index_factory(dim, spec.factory(), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        faiss.downcast_index(empty).hnsw.efConstruction = spec.ef_construction
    if not empty.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(num, size=spec.train_size or num, replace=False))
        empty.train(np.ascontiguousarray(vectors[rows]))
    built = {}
    for number in range(shards):
        shard = faiss.clone_index(empty)
        if spec.kind == "hnsw":
            faiss.downcast_index(shard).hnsw.efConstruction = spec.ef_construction
        for start in range(int(offsets[number]), int(offsets[number + 1]), ADD_BLOCK):
            stop = min(start + ADD_BLOCK, int(offsets[number + 1]))
            shard.add(np.ascontiguousarray(vectors[start:stop]))
        _direct_map(shard, spec)
        built[number] = shard
    return ArchiveIndex(built, offsets, embeddings.table, spec, dim)


def _direct_map(shard, spec: IndexSpec) -> None:
    """IVF indexes without a refinement copy need a direct map to reconstruct a row by number (candidate re-ranking)."""
    if spec.kind == "ivf" or (spec.kind == "ivfpq" and spec.storage == "pq"):
        require_faiss().extract_index_ivf(shard).make_direct_map()


def open_index(folder: str | os.PathLike, shards: Iterable[int] | None = None) -> ArchiveIndex:
    """The index saved in ``folder`` (all shards, or only ``shards``: one rank's share).

    Raises:
        FileNotFoundError: no index there. ValueError: built by another farreid version, index format or FAISS
            build, or a shard whose row count differs from meta.json.
    """
    faiss = require_faiss()
    root = Path(folder)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: expected a folder written by `farreid index`")
    try:
        meta = json.loads(meta_path.read_text())
        spec, offsets, dim = IndexSpec(**meta["spec"]), np.asarray(meta["offsets"], np.int64), int(meta["dim"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{meta_path} is not an index description of `farreid index` ({err})") from None
    built_by = (meta.get("format"), meta.get("farreid"), meta.get("faiss"))
    here = (FORMAT, __version__, faiss.__version__)
    if built_by != here:
        raise ValueError(
            f"{root} was built by index format {built_by[0]}, farreid {built_by[1]}, FAISS {built_by[2]}; this is "
            f"format {here[0]}, farreid {here[1]}, FAISS {here[2]}: rebuild it with `farreid index`"
        )
    wanted = range(len(offsets) - 1) if shards is None else sorted(set(shards))
    loaded = {}
    for number in wanted:
        path = root / f"shard-{number:05d}.faiss"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the index has {len(offsets) - 1} shards")
        shard = faiss.read_index(str(path))
        expected = int(offsets[number + 1] - offsets[number])
        if shard.ntotal != expected or shard.d != dim:
            raise ValueError(f"{path} holds {shard.ntotal} vectors of {shard.d} d, meta.json says {expected} of {dim}")
        _direct_map(shard, spec)
        loaded[number] = shard
    table = TrackletTable.load(root / "table")
    if len(table) != int(offsets[-1]):
        raise ValueError(f"{root / 'table'} has {len(table)} rows, the index {int(offsets[-1])}")
    return ArchiveIndex(loaded, offsets, table, spec, dim, meta)
