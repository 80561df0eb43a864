"""Retrieval metrics for re-identification: mAP, mINP and CMC under the two scorers of DOMAIN.md §3.

- `evaluate_rank`, the Market-1501 rule (as torchreid / fast-reid `eval_market1501`): gallery items with the
  query's pid *and* camid are junk; AP is the mean precision at each hit.
- `evaluate_challenge`, the challenge scorer: only the query's own tracklet (same name) is junk; AP is the
  trapezoidal form of the Market-1501 devkit (`compute_AP`).

Both sort each distance row with a stable sort, so ties are broken by gallery order (torchreid uses NumPy's
default unstable sort, which may break them differently). Queries are scored in chunks of rows, so memory
stays at a few chunk x G arrays. Queries without any true match left are skipped: their AP / INP are NaN and
their `first_hit` is -1; they are counted in `num_query` but not in `num_valid_query`.
"""

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

# Rows scored at once; the element cap keeps a chunk below about 4 M entries (a few 32 MB arrays) for large galleries.
_CHUNK_ROWS = 256
_CHUNK_ELEMENTS = 1 << 22


def _numpy(x: np.ndarray | torch.Tensor | Sequence, name: str) -> np.ndarray:
    """A NumPy view of a numpy array, torch tensor or sequence."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    array = np.asarray(x)
    if array.dtype == object:
        raise ValueError(f"{name} must be a numeric or string array, got dtype object")
    return array


def _codes(*arrays: np.ndarray) -> list[np.ndarray]:
    """The same integer code for equal values across all arrays (strings compare faster as ints)."""
    _, inverse = np.unique(np.concatenate([a.ravel() for a in arrays]), return_inverse=True)
    bounds = np.cumsum([0] + [a.size for a in arrays])
    return [inverse[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _score(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    junk: Callable[[slice, np.ndarray], np.ndarray],
    trapezoid: bool,
    max_rank: int,
) -> dict:
    """Shared scorer; `junk(rows, order)` gives the (B, G) junk mask of the sorted gallery of `rows`."""
    num_query, num_gallery = distmat.shape
    if q_pids.shape != (num_query,) or g_pids.shape != (num_gallery,):
        raise ValueError(f"distmat is {distmat.shape} but q_pids is {q_pids.shape} and g_pids is {g_pids.shape}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    ap, inp = np.full(num_query, np.nan), np.full(num_query, np.nan)
    first_hit = np.full(num_query, -1, dtype=np.int64)
    rows_per_chunk = max(1, min(_CHUNK_ROWS, _CHUNK_ELEMENTS // max(num_gallery, 1)))
    for start in range(0, num_query, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, num_query))
        order = np.argsort(distmat[rows], axis=1, kind="stable")  # (B, G) gallery indices, nearest first
        keep = ~junk(rows, order)
        hits = (g_pids[order] == q_pids[rows, None]) & keep
        num_hits = hits.sum(axis=1)
        valid = num_hits > 0
        rank = np.cumsum(keep, axis=1)  # 1-based rank among the kept items (meaningful where keep)
        cum_hits = np.cumsum(hits, axis=1)
        precision = np.divide(cum_hits, rank, out=np.zeros(hits.shape), where=hits)
        if trapezoid:
            # Precision over the rank - 1 items before a hit; 1 for a hit at rank 1 (the devkit's old_precision).
            before = np.divide(cum_hits - 1, rank - 1, out=np.ones(hits.shape), where=hits & (rank > 1))
            precision = np.where(hits, (before + precision) / 2, 0.0)
        ap[rows][valid] = precision.sum(axis=1)[valid] / num_hits[valid]
        batch = np.arange(hits.shape[0])
        first = np.argmax(hits, axis=1)
        last = hits.shape[1] - 1 - np.argmax(hits[:, ::-1], axis=1)
        first_hit[rows][valid] = rank[batch, first][valid] - 1
        inp[rows][valid] = num_hits[valid] / rank[batch, last][valid]
    return _aggregate(ap, inp, first_hit, max_rank)


def _aggregate(ap: np.ndarray, inp: np.ndarray, first_hit: np.ndarray, max_rank: int) -> dict:
    """Means and CMC over the valid queries (first_hit >= 0); ValueError when there is none."""
    valid = first_hit >= 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(f"no valid query: none of the {first_hit.size} queries has a true match in the gallery")
    skipped = first_hit.size - num_valid
    if skipped:
        warnings.warn(f"{skipped} of {first_hit.size} queries have no true match in the gallery: skipped", stacklevel=3)
    hits_at = np.bincount(first_hit[valid], minlength=max_rank)[:max_rank]
    cmc = np.minimum(np.cumsum(hits_at) / num_valid, 1.0)
    return {
        "mAP": float(np.nanmean(ap)),
        "mINP": float(np.nanmean(inp)),
        "cmc": cmc,
        "AP": ap,
        "INP": inp,
        "first_hit": first_hit,
        "num_query": int(first_hit.size),
        "num_valid_query": num_valid,
    }


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> dict:
    """Market-1501 evaluation: same pid and same camid is junk.

    Args:
        distmat: (Q, G) distances, smaller is closer (numpy or torch).
        q_pids, g_pids: (Q,) and (G,) identity labels.
        q_camids, g_camids: (Q,) and (G,) camera ids.
        max_rank: length of the CMC curve. Beyond the gallery size the curve keeps its last value (every
            valid query has its first hit within the gallery), so it is padded rather than truncated.

    Returns:
        dict with "mAP", "mINP" (floats in [0, 1], means over valid queries), "cmc" ((max_rank,) fractions),
        "AP", "INP" ((Q,) floats, NaN when skipped), "first_hit" ((Q,) 0-based rank of the first true match
        after junk removal, -1 when skipped), "num_query" and "num_valid_query".

    Raises:
        ValueError: if shapes disagree or no query has a true match left.
    """
    distmat = _numpy(distmat, "distmat")
    q_pids, g_pids = _numpy(q_pids, "q_pids"), _numpy(g_pids, "g_pids")
    q_camids, g_camids = _numpy(q_camids, "q_camids"), _numpy(g_camids, "g_camids")
    if q_camids.shape != q_pids.shape or g_camids.shape != g_pids.shape:
        raise ValueError(f"camids {q_camids.shape}, {g_camids.shape} must match pids {q_pids.shape}, {g_pids.shape}")

    def junk(rows: slice, order: np.ndarray) -> np.ndarray:
        return (g_pids[order] == q_pids[rows, None]) & (g_camids[order] == q_camids[rows, None])

    return _score(distmat, q_pids, g_pids, junk, trapezoid=False, max_rank=max_rank)


def evaluate_challenge(distmat, q_pids, g_pids, q_names, g_names, max_rank: int = 50) -> dict:
    """The challenge scorer: only the identical tracklet is junk, trapezoidal AP.

    AP = sum over hits k of (1 / num_hits) * (p_before + p_at) / 2, where p_at = k / r_k is the precision at
    the k-th hit's rank r_k (1-based, junk removed) and p_before = (k - 1) / (r_k - 1) the precision over the
    items before it, taken as 1 when r_k = 1 (an empty list; the Market-1501 devkit's `old_precision = 1`).
    So a first hit at rank 1 contributes (1 + 1) / 2, a first hit at rank 3 contributes (0 + 1/3) / 2.

    Args:
        distmat: (Q, G) distances, smaller is closer.
        q_pids, g_pids: (Q,) and (G,) identity labels.
        q_names, g_names: (Q,) and (G,) tracklet names; a gallery item named like the query is junk.
        max_rank: length of the CMC curve (padded as in `evaluate_rank`).

    Returns:
        The same dict as `evaluate_rank`.
    """
    distmat = _numpy(distmat, "distmat")
    q_pids, g_pids = _numpy(q_pids, "q_pids"), _numpy(g_pids, "g_pids")
    q_codes, g_codes = _codes(np.asarray(q_names, dtype=str), np.asarray(g_names, dtype=str))
    if q_codes.shape != q_pids.shape or g_codes.shape != g_pids.shape:
        raise ValueError(f"names {q_codes.shape}, {g_codes.shape} must match pids {q_pids.shape}, {g_pids.shape}")

    def junk(rows: slice, order: np.ndarray) -> np.ndarray:
        return g_codes[order] == q_codes[rows, None]

    return _score(distmat, q_pids, g_pids, junk, trapezoid=True, max_rank=max_rank)


def pool_results(results: Sequence[dict], max_rank: int = 50) -> dict:
    """One result over all queries of all cases (the paper's "overall" figure): AP pooled, not averaged per case.

    Args:
        results: outputs of `evaluate_rank` / `evaluate_challenge`, one per case.
        max_rank: length of the pooled CMC curve.

    Returns:
        A dict shaped like `evaluate_rank`'s, computed from the concatenated per-query arrays.
    """
    if not results:
        raise ValueError("pool_results needs at least one result")
    ap = np.concatenate([r["AP"] for r in results])
    inp = np.concatenate([r["INP"] for r in results])
    first_hit = np.concatenate([r["first_hit"] for r in results])
    return _aggregate(ap, inp, first_hit, max_rank)


def case_mean(results: Sequence[dict] | Mapping[str, dict]) -> dict:
    """The plain mean over cases of mAP, mINP and the CMC curve (counts are summed).

    Args:
        results: per-case results (a sequence, or a mapping from case name to result).

    Returns:
        dict with "mAP", "mINP", "cmc", "num_query", "num_valid_query".
    """
    values = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not values:
        raise ValueError("case_mean needs at least one result")
    lengths = {len(r["cmc"]) for r in values}
    if len(lengths) != 1:
        raise ValueError(f"every case must have the same CMC length (max_rank), got {sorted(lengths)}")
    return {
        "mAP": float(np.mean([r["mAP"] for r in values])),
        "mINP": float(np.mean([r["mINP"] for r in values])),
        "cmc": np.mean([r["cmc"] for r in values], axis=0),
        "num_query": int(sum(r["num_query"] for r in values)),
        "num_valid_query": int(sum(r["num_valid_query"] for r in values)),
    }


def summarize(result: dict) -> dict:
    """Plain JSON-serialisable scalars of a result: mAP, mINP, rank1/5/10 (fractions) and query counts.

    Raises:
        ValueError: if the CMC curve is shorter than 10 (evaluate with max_rank >= 10).
    """
    cmc = np.asarray(result["cmc"])
    if cmc.size < 10:
        raise ValueError(f"summarize needs a CMC curve of length >= 10 for rank10, got {cmc.size}")
    return {
        "mAP": float(result["mAP"]),
        "mINP": float(result["mINP"]),
        "rank1": float(cmc[0]),
        "rank5": float(cmc[4]),
        "rank10": float(cmc[9]),
        "num_query": int(result["num_query"]),
        "num_valid_query": int(result["num_valid_query"]),
    }


def breakdown_by_bins(ap_per_query, values, bins: Sequence[float]) -> list[dict]:
    """mAP of the queries grouped by a per-query value (altitude in m, distance in m, pitch in degrees).

    Bins are half-open [low, high) except the last, which includes its upper edge (as `np.histogram`).
    Queries outside every bin or with a NaN value are left out with a warning that counts them.

    Args:
        ap_per_query: (Q,) AP per query, NaN for skipped queries (the "AP" entry of a result).
        values: (Q,) the value to bin by.
        bins: increasing bin edges, at least two.

    Returns:
        One dict per bin: "low", "high", "count" (queries in the bin), "num_valid" (non-NaN AP) and
        "mAP" (mean AP of the valid ones, None when there is none).
    """
    ap, values, edges = _numpy(ap_per_query, "ap_per_query"), _numpy(values, "values"), np.asarray(bins, float)
    if ap.shape != values.shape:
        raise ValueError(f"ap_per_query {ap.shape} and values {values.shape} must have the same shape")
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be at least two strictly increasing edges, got {list(edges)}")
    which = np.searchsorted(edges, values, side="right") - 1
    which[values == edges[-1]] = edges.size - 2
    inside = (which >= 0) & (which < edges.size - 1) & ~np.isnan(values)
    if not inside.all():
        warnings.warn(f"{int((~inside).sum())} queries fall outside bins {list(edges)}: left out", stacklevel=2)
    rows = []
    for b in range(edges.size - 1):
        members = ap[inside & (which == b)]
        valid = members[~np.isnan(members)]
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": int(members.size),
                "num_valid": int(valid.size),
                "mAP": float(valid.mean()) if valid.size else None,
            }
        )
    return rows
