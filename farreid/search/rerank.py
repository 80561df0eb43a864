"""k-reciprocal re-ranking of each query's candidates, with neighbourhoods from the index instead of an N x N matrix.

The algorithm is that of :func:`farreid.evaluation.reranking.re_ranking` (Zhong et al., CVPR 2017, with the
published function's conventions), over the same items: every query and every indexed row that the filter allows.
What changes is where the neighbour lists come from and how many are computed:

- each query's ``depth`` candidates come from the index; only they are re-ranked (rows beyond them keep their
  place after them, and are not returned);
- a list of the ``max(k1 + 1, k2)`` nearest items (index rows through the index, queries through an exact search
  among the queries) is computed for the queries, their candidates, and the items in those lists (two hops:
  what the k1-reciprocal test and the local query expansion read); an item three hops away has no list and is
  treated as not reciprocal, which can only leave an expansion set smaller than the dense algorithm's;
- the distance maximum of each row that gets an encoding (the published normalisation) comes from a
  farthest-neighbour search.

Lists are cached across query blocks in (N + Q, w) arrays, so memory grows with N * k, never N^2. When the
candidates cover every row (depth = N) and the index is exact, the result equals the dense re-ranking up to
float rounding (tested).
"""

from __future__ import annotations

import numpy as np
import torch

from farreid.evaluation.reranking.chunks import chunk_workers
from farreid.evaluation.reranking.encoding import encode
from farreid.evaluation.reranking.expansion import query_expansion
from farreid.evaluation.reranking.jaccard import jaccard_distances
from farreid.search.index import ArchiveIndex, merge_topk, require_faiss

# Items searched at once for their lists (bounds the vectors and results held: 8,192 x 768 floats = 25 MB).
SEARCH_BATCH = 8192
# Hops of neighbour lists computed from the queries and their candidates (see the module docstring).
HOPS = 2


class _Neighbours:
    """Cached neighbour lists and distance maxima of the items: index rows 0..N-1, queries N..N+Q-1."""

    def __init__(self, index, queries, allowed, width, search_kwargs):
        faiss = require_faiss()
        self.index, self.queries, self.allowed, self.width = index, queries, allowed, width
        self.kwargs = search_kwargs
        self.num = len(index)
        self.query_index = faiss.IndexFlatIP(queries.shape[1])
        self.query_index.add(queries)
        total = self.num + len(queries)
        self.k_rows = min(width, int(allowed.sum()) if allowed is not None else self.num)  # rows a list can name
        self.have = np.zeros(total, dtype=bool)
        self.have_max = np.zeros(total, dtype=bool)
        self.ids = np.full((total, width), -1, dtype=np.int64)
        self.dist = np.zeros((total, width), dtype=np.float32)
        self.row_max = np.zeros(total, dtype=np.float32)

    def vectors(self, items: np.ndarray) -> np.ndarray:
        out = np.empty((len(items), self.queries.shape[1]), dtype=np.float32)
        rows = items < self.num
        if rows.any():
            out[rows] = self.index.reconstruct(items[rows])
        out[~rows] = self.queries[items[~rows] - self.num]
        return out

    def fill(self, items: np.ndarray) -> None:
        """Neighbour lists for the items that have none yet (in batches of ``SEARCH_BATCH``: bounded memory)."""
        _batched(items[~self.have[items]], self._fill)

    def _fill(self, items: np.ndarray) -> None:
        vec = self.vectors(items)
        d_rows, i_rows = self.index.search(vec, self.k_rows, allowed=self.allowed, **self.kwargs)
        k_q = min(self.width, len(self.queries))
        scores, i_q = self.query_index.search(vec, k_q)
        dist, ids = merge_topk([(d_rows, i_rows), (2.0 - 2.0 * scores, i_q + self.num)], self.width)
        self.ids[items], self.dist[items] = ids, np.maximum(dist, 0.0)
        self.have[items] = True

    def maxima(self, items: np.ndarray) -> None:
        """Distance maxima for the items that have none yet (only the rows that get an encoding read them)."""
        _batched(items[~self.have_max[items]], self._maxima)

    def _maxima(self, items: np.ndarray) -> None:
        vec = self.vectors(items)
        # Farthest item: the nearest to -v among the rows, and among the queries.
        far_rows, _ = self.index.search(-vec, 1, allowed=self.allowed, **self.kwargs)
        far_q, _ = self.query_index.search(-vec, 1)
        # |v - u|^2 = 2 - 2 v.u and the search of -v reports 2 + 2 v.u: the farthest u is 4 minus it.
        self.row_max[items] = np.maximum(4.0 - far_rows[:, 0], 2.0 + 2.0 * far_q[:, 0])
        self.have_max[items] = True


def _batched(items: np.ndarray, step) -> None:
    """``step`` on ``items`` in slices of ``SEARCH_BATCH`` (bounded vectors and results at a time)."""
    for start in range(0, len(items), SEARCH_BATCH):
        step(items[start : start + SEARCH_BATCH])


def candidate_rerank(
    index: ArchiveIndex,
    queries: np.ndarray,
    candidates: np.ndarray,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    allowed: np.ndarray | None = None,
    block: int = 64,
    nprobe: int | None = None,
    ef: int | None = None,
    expand: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-ranked distances of each query's candidates.

    Args:
        index: all rows (the shards of one process). queries: (Q, D) unit rows.
        candidates: (Q, depth) int64 rows of each query (best first, -1 for none), e.g. from ``index.search``.
        k1, k2, lambda_value: as in :func:`farreid.evaluation.reranking.re_ranking`.
        allowed: (N,) bool filter of the rows, the same one the candidates were drawn with.
        block: queries re-ranked together (their candidates' Jaccard block is block x their union).
        expand: also re-rank the rows of each query's expanded k-reciprocal encoding that are not among its
            candidates (rows beyond ``depth`` that the dense algorithm would pull forward), then keep the best
            ``depth``.

    Returns:
        (Q, depth) float32 re-ranked distances ascending (inf for none) and (Q, depth) int64 rows.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    widths = (max(k1 + 1, k2), k1 + 1, round(k1 / 2) + 1, k2)
    hood = _Neighbours(index, queries, allowed, widths[0], {"nprobe": nprobe, "ef": ef})
    out_d = np.full(candidates.shape, np.inf, dtype=np.float32)
    out_i = np.full(candidates.shape, -1, dtype=np.int64)
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        own = candidates[start:stop]
        mixed, support = _score_block(hood, own, start, stop, widths, lambda_value)
        if expand:
            wider = _widen(own, support, hood.num, allowed)
            if wider.shape[1] > own.shape[1]:
                own = wider
                mixed, _ = _score_block(hood, own, start, stop, widths, lambda_value)
        values = np.where(own >= 0, mixed, np.inf).astype(np.float32)
        rank = np.argsort(values, axis=1, kind="stable")[:, : candidates.shape[1]]
        out_d[start:stop] = np.take_along_axis(values, rank, 1)
        out_i[start:stop] = np.take_along_axis(own, rank, 1)
    return out_d, out_i


def _widen(own: np.ndarray, support: list[np.ndarray], num_rows: int, allowed) -> np.ndarray:
    """Each query's candidates followed by the index rows of its encoding's support that are not among them (and
    that the filter allows), padded with -1 to the widest row."""
    rows = []
    for cand, items in zip(own, support, strict=True):
        items = items[items < num_rows]
        if allowed is not None:
            items = items[allowed[items]]
        rows.append(np.concatenate([cand, np.setdiff1d(items, cand)]))
    out = np.full((len(own), max(len(r) for r in rows)), -1, dtype=np.int64)
    for q, row in enumerate(rows):
        out[q, : len(row)] = row
    return out


def _score_block(hood: _Neighbours, own: np.ndarray, start: int, stop: int, widths, lambda_value: float):
    """Re-ranked distances (B, C) of queries ``start:stop`` to their candidates ``own`` (B, C) (-1 for none: any
    value there), and each query's support: the items (index rows, queries) its expanded encoding covers."""
    width, k1_width, half_width, k2_width = widths
    pool = np.unique(own[own >= 0])
    seeds = np.concatenate([np.arange(start, stop) + hood.num, pool])  # S: the block's queries, candidates
    listed_here, frontier = [seeds], seeds  # the items of this block that get a list: S and N(S)
    for hop in range(HOPS):
        hood.fill(frontier)
        if hop + 1 < HOPS:
            named = hood.ids[frontier]
            frontier = np.setdiff1d(named[named >= 0], np.concatenate(listed_here))
            listed_here.append(frontier)
    expansion = np.unique(hood.ids[seeds, :k2_width])
    # Local order: S, the rest of S's k2 nearest (rows of V the expansion reads), the other listed items,
    # then items named in lists but without one of their own here.
    order = [seeds, np.setdiff1d(expansion, seeds)]
    order.append(np.setdiff1d(np.concatenate(listed_here), np.concatenate(order)))
    named = hood.ids[np.concatenate(order)]
    order.append(np.setdiff1d(named[named >= 0], np.concatenate(order)))
    items = np.concatenate(order)
    local = np.full(hood.ids.shape[0], -1, dtype=np.int64)
    local[items] = np.arange(len(items))
    num_known = sum(len(o) for o in order[:3])
    nn_index = np.repeat(np.arange(len(items))[:, None], width, axis=1)  # no list: the item itself
    nn_index[:num_known] = local[hood.ids[items[:num_known]]]
    nn_dist = np.zeros((len(items), width), dtype=np.float32)
    nn_dist[:num_known] = hood.dist[items[:num_known]]
    features = np.zeros((len(items), hood.queries.shape[1]), dtype=np.float32)
    features[:num_known] = hood.vectors(items[:num_known])
    encoded_rows = len(order[0]) + len(order[1])
    hood.maxima(items[:encoded_rows])
    row_max = np.ones(len(items), dtype=np.float32)  # read for the encoded rows only
    row_max[:encoded_rows] = hood.row_max[items[:encoded_rows]]
    mixed, pointers, columns = _rerank_block(
        torch.from_numpy(features),
        torch.from_numpy(nn_dist),
        torch.from_numpy(nn_index),
        torch.from_numpy(row_max),
        stop - start,
        len(seeds),
        encoded_rows,
        k1_width,
        half_width,
        k2_width,
        lambda_value,
    )  # (B, |pool|)
    support = [items[columns[pointers[q] : pointers[q + 1]]] for q in range(stop - start)]
    slot = np.searchsorted(pool, own.clip(min=0))
    return np.take_along_axis(mixed, slot, 1), support


def _rerank_block(features, nn_dist, nn_index, row_max, num_query, num_seeds, encoded_rows, k1w, hw, k2w, lam):
    """(num_query, num_seeds - num_query) re-ranked distances of a block's queries to the block's candidates, and the
    CSR pointers and columns of the queries' expanded encodings."""
    with torch.no_grad(), chunk_workers(features.device) as workers:
        squared = torch.linalg.vector_norm(features, dim=1).square_()
        encoding = encode(
            features, squared, nn_dist, nn_index, row_max, None, k1w, hw, 1024, workers, False, rows=encoded_rows
        )
        if k2w != 1:
            encoding = query_expansion(
                encoding, nn_index[:num_seeds], k2w, 1024, workers, False, num_columns=features.shape[0]
            )
        else:
            pointers, columns, values = encoding
            end = int(pointers[num_seeds])
            encoding = (pointers[: num_seeds + 1], columns[:end], values[:end])
        query, pool = features[:num_query], features[num_query:num_seeds]
        original = squared[:num_query, None] + squared[None, num_query:num_seeds] - 2.0 * (query @ pool.T)
        mixed = jaccard_distances(
            encoding, num_query, original, row_max, lam, workers, False, num_columns=features.shape[0]
        )
        pointers, columns = encoding[0][: num_query + 1], encoding[1][: int(encoding[0][num_query])]
        return mixed.numpy(), pointers.numpy(), columns.numpy()
