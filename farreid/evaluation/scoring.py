"""Scoring an evaluation set from per-tracklet embeddings: plain functions, no Trainer.

:func:`scoreable` checks what an evaluation gathered (every tracklet seen, finite embeddings) and leaves out the
unreadable tracklets; :func:`score` ranks each case's gallery for its queries (cosine distance, or k-reciprocal
re-ranked) and scores it with the Market-1501 rule or the challenge scorer; :func:`summary` turns the result into
the JSON figures logged and written to ``results.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch

from farreid.data.protocols import EvalSet
from farreid.evaluation.metrics import case_mean, evaluate_challenge, evaluate_rank, pool_results, summarize
from farreid.evaluation.reranking import re_ranking
from farreid.evaluation.search import chunk_rows, ranked_distances
from farreid.evaluation.state import Gathered

Scorer = Literal["market", "challenge"]
# Tracklet names listed in an error or a report before "... and N more".
NAMES_SHOWN = 10


def names(eval_set: EvalSet, indices) -> str:
    """The names of some tracklets of ``eval_set``, the first ``NAMES_SHOWN`` of them, for a message."""
    shown = [eval_set.tracklets[int(i)].name for i in indices]
    more = f" ... and {len(shown) - NAMES_SHOWN} more" if len(shown) > NAMES_SHOWN else ""
    return ", ".join(shown[:NAMES_SHOWN]) + more


def scoreable(eval_set: EvalSet, gathered: Gathered, limited: bool) -> tuple[EvalSet, dict]:
    """The eval set restricted to scoreable tracklets, and what was left out.

    Args:
        eval_set: every tracklet of the evaluation and its cases.
        gathered: the merged rows of every process (the same on every rank, so a fault raises on all).
        limited: only part of the loader ran (``fast_dev_run``, ``limit_*_batches``): unseen tracklets are allowed.

    Returns:
        The eval set whose cases hold only seen, readable tracklets (cases left without a query or a gallery
        dropped), and notes: ``unreadable`` (count and names) and ``not_evaluated`` (unseen tracklets).

    Raises:
        RuntimeError: a tracklet was not seen in a full evaluation.
        FloatingPointError: a readable tracklet has a non-finite embedding.
    """
    missing = (~gathered.seen).nonzero().flatten().tolist()
    if missing and not limited:
        raise RuntimeError(
            f"evaluation saw {len(eval_set) - len(missing)} of {len(eval_set)} tracklets: {len(missing)} missing "
            f"({names(eval_set, missing)})"
        )
    finite = torch.isfinite(gathered.features).all(dim=1)
    bad = (~finite & gathered.readable).nonzero().flatten().tolist()
    if bad:
        scored = int(gathered.readable.sum())
        culprit = (
            "every tracklet did: the checkpoint's weights are probably non-finite"
            if len(bad) == scored
            else f"tracklets {names(eval_set, bad)}"
        )
        raise FloatingPointError(f"non-finite embeddings for {len(bad)} of {scored} tracklets ({culprit})")
    unreadable = (gathered.seen & ~gathered.readable).nonzero().flatten().tolist()
    keep = (gathered.seen & gathered.readable).cpu().numpy()
    cases = {case: (q[keep[q]], g[keep[g]]) for case, (q, g) in eval_set.cases.items()}
    cases = {case: (q, g) for case, (q, g) in cases.items() if len(q) and len(g)}
    notes = {
        "unreadable": {"count": len(unreadable), "tracklets": [eval_set.tracklets[i].name for i in unreadable]},
        "not_evaluated": len(missing),
    }
    return dataclasses.replace(eval_set, cases=cases), notes


def distances(
    query: torch.Tensor, gallery: torch.Tensor, rerank_params: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, G) distances and (Q, G) rankings, computed on the features' device.

    Args:
        query: (Q, F) and gallery (G, F) L2-normalised embeddings.
        rerank_params: None for 1 - cosine similarity; else the keyword arguments of
            :func:`~farreid.evaluation.reranking.re_ranking` (``k1``, ``k2``, ``lambda_value``, ``approx_candidates``).
    """
    if rerank_params is None:
        return ranked_distances(query, gallery)
    num_all = query.shape[0] + gallery.shape[0]
    chunk = min(4096, chunk_rows(query.device, num_all, floats_per_entry=2))
    distmat = re_ranking(query, gallery, **rerank_params, chunk_size=chunk)
    ranking = torch.argsort(distmat, dim=1, stable=True)
    return distmat.cpu().numpy(), ranking.cpu().numpy()


def score(
    eval_set: EvalSet,
    feats: torch.Tensor,
    scorer: Scorer = "market",
    max_rank: int = 50,
    rerank_params: dict | None = None,
) -> dict:
    """Rank and score every case of ``eval_set``.

    Args:
        eval_set: tracklets and the (query, gallery) indices of each case.
        feats: (N, F) L2-normalised embeddings of every tracklet, on any device (scored there).
        scorer: "market" (Market-1501 junk rule) or "challenge" (same-tracklet junk, trapezoidal AP).
        max_rank: length of the CMC curves.
        rerank_params: None for cosine distances, else the re-ranking parameters (see :func:`distances`).

    Returns:
        ``cases`` (per-case metrics dicts, empty on an anonymized set), ``rankings`` (per case, (Q, G) gallery
        positions best first) and, when any case was scored, the pooled ``overall``.
    """
    per_case, rankings = {}, {}
    tr = eval_set.tracklets
    for case, (q, g) in eval_set.cases.items():
        q_idx = torch.as_tensor(q, dtype=torch.long, device=feats.device)
        g_idx = torch.as_tensor(g, dtype=torch.long, device=feats.device)
        distmat, ranking = distances(feats[q_idx], feats[g_idx], rerank_params)
        rankings[case] = ranking
        if eval_set.anonymized:
            continue
        q_pids, g_pids = np.array([tr[i].pid for i in q]), np.array([tr[i].pid for i in g])
        if scorer == "market":
            q_cams, g_cams = np.array([tr[i].camid for i in q]), np.array([tr[i].camid for i in g])
            per_case[case] = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
        else:
            q_names, g_names = [tr[i].name for i in q], [tr[i].name for i in g]
            per_case[case] = evaluate_challenge(distmat, q_pids, g_pids, q_names, g_names, max_rank=max_rank)
    results = {"cases": per_case, "rankings": rankings}
    if per_case:
        results["overall"] = pool_results(list(per_case.values()), max_rank=max_rank)
    return results


def summary(results: dict, eval_set: EvalSet) -> dict:
    """JSON summary of one scoring: each case, the pooled ``overall`` and the per-case mean ``case_mean``."""
    out = {}
    for case, result in results["cases"].items():
        out[case] = {**summarize(result), "num_gallery": len(eval_set.cases[case][1])}
    num_gallery = sum(s["num_gallery"] for s in out.values())
    out["overall"] = {**summarize(results["overall"]), "num_gallery": num_gallery}
    out["case_mean"] = summarize(case_mean(results["cases"]))
    return out


def submission_rows(eval_set: EvalSet, rankings: dict) -> dict:
    """Per case, (query names, ranked gallery names per query) for the challenge CSV."""
    tr = eval_set.tracklets
    rows = {}
    for case, (q, g) in eval_set.cases.items():
        names_g = np.array([tr[i].name for i in g])
        rows[case] = ([tr[i].name for i in q], [list(names_g[r]) for r in rankings[case]])
    return rows
