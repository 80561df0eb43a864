"""Ranking query embeddings against an index: filters, cross-view search, candidate re-ranking, the output files."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from farreid.search.embeddings import EmbeddingSet
from farreid.search.rerank import candidate_rerank
from farreid.search.table import VIEWS

RANKING_NPZ, RANKING_CSV = "ranking.npz", "ranking.csv"
CSV_FIELDS = ("query", "rank", "gallery", "pid", "camid", "view", "distance")


@dataclass
class Ranking:
    """Q x K results: ``indices`` (int64 rows of the index's table, best first, -1 where fewer than K rows
    qualified) and ``distances`` (float32 ascending: squared Euclidean, or re-ranked distances with rerank)."""

    indices: np.ndarray
    distances: np.ndarray

    @property
    def short(self) -> int:
        """Queries with fewer than K results (a filter left fewer rows than K)."""
        return int((self.indices < 0).any(axis=1).sum())


def parse_where(items: list[str] | None) -> dict[str, list[str]]:
    """``["view=ground", "camid=1,2"]`` -> ``{"view": ["ground"], "camid": ["1", "2"]}``."""
    where: dict[str, list[str]] = {}
    for item in items or []:
        column, sep, values = item.partition("=")
        if not sep or not column or not values:
            raise ValueError(f"--where {item!r}: expected COLUMN=VALUE[,VALUE...], e.g. view=ground")
        where.setdefault(column.strip(), []).extend(v.strip() for v in values.split(","))
    return where


def rank(
    index,
    queries: EmbeddingSet,
    k: int,
    *,
    where: dict[str, list[str]] | None = None,
    cross_view: bool = False,
    rerank: bool = False,
    depth: int | None = None,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    nprobe: int | None = None,
    ef: int | None = None,
    block: int = 64,
    expand: bool = True,
) -> Ranking:
    """The top ``k`` rows of the index for every query.

    Args:
        index: an :class:`~farreid.search.index.ArchiveIndex` (or its distributed wrapper).
        queries: the query embeddings and their table.
        where: rows allowed, by column (see :meth:`TrackletTable.mask`).
        cross_view: aerial queries see only ground rows and ground queries only aerial rows (the A2G / G2A cases).
        rerank: k-reciprocal re-ranking of each query's ``depth`` candidates (default max(k, 100)) with
            ``k1``, ``k2``, ``lambda_value`` (see :mod:`farreid.search.rerank`); queries of one view are
            re-ranked together, among the rows their filter allows.
        expand: the re-ranking also scores the rows that each query's k-reciprocal encoding covers beyond its
            candidates (see :func:`~farreid.search.rerank.candidate_rerank`).
        nprobe, ef: search breadth of ivf / ivfpq / hnsw indexes.
    """
    if queries.dim != index.dim:
        raise ValueError(f"query embeddings of {queries.dim} d, the index holds {index.dim} d")
    if not 1 <= k <= len(index):
        raise ValueError(f"--top-k {k}: expected 1 <= K <= {len(index)}, the rows of the index")
    depth = max(k, 100) if depth is None else depth
    if rerank and not k <= depth <= len(index):
        raise ValueError(f"rerank depth {depth}: expected top-k {k} <= depth <= {len(index)} rows")
    base = index.table.mask(where) if where else None
    groups = [(np.arange(len(queries)), base)]
    if cross_view:
        groups = []
        for code in range(len(VIEWS)):
            members = np.flatnonzero(queries.table.view == code)
            other = index.table.view != code
            groups.append((members, other if base is None else other & base))
    width = depth if rerank else k
    indices = np.full((len(queries), k), -1, dtype=np.int64)
    distances = np.full((len(queries), k), np.inf, dtype=np.float32)
    for members, allowed in groups:  # the same sequence of calls on every rank of a distributed search
        if not len(members):
            continue
        vectors = np.ascontiguousarray(queries.vectors[members])
        dist, ids = index.search(vectors, width, allowed=allowed, nprobe=nprobe, ef=ef)
        if rerank:
            dist, ids = candidate_rerank(
                index,
                vectors,
                ids,
                k1=k1,
                k2=k2,
                lambda_value=lambda_value,
                allowed=allowed,
                block=block,
                nprobe=nprobe,
                ef=ef,
                expand=expand,
            )
        indices[members], distances[members] = ids[:, :k], dist[:, :k]
    return Ranking(indices, distances)


def write_ranking(out_dir: str | os.PathLike, ranking: Ranking, queries: EmbeddingSet, table) -> tuple[Path, Path]:
    """``ranking.npz`` (indices, distances) and ``ranking.csv`` (one line per found result) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz, csv_path = out / RANKING_NPZ, out / RANKING_CSV
    with open(npz.with_name(npz.name + ".part"), "wb") as f:
        np.savez(f, indices=ranking.indices, distances=ranking.distances)
    with open(csv_path.with_name(csv_path.name + ".part"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        pid, camid = table.numbers["pid"], table.numbers["camid"]
        for q in range(len(ranking.indices)):
            name = queries.table.names[q]
            for r, (row, dist) in enumerate(zip(ranking.indices[q], ranking.distances[q], strict=True)):
                if row < 0:
                    break
                view = VIEWS[int(table.view[row])]
                writer.writerow(
                    (name, r + 1, table.names[int(row)], int(pid[row]), int(camid[row]), view, f"{dist:.6f}")
                )
    for path in (npz, csv_path):
        os.replace(path.with_name(path.name + ".part"), path)
    return npz, csv_path
