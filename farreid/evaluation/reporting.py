"""Text tables and the test-time figures, built from scored results (no Lightning)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from farreid.data.protocols import EvalSet
from farreid.evaluation import plots
from farreid.evaluation.frames import FrameReader, scorer_frames
from farreid.evaluation.metrics import breakdown_by_bins
from farreid.evaluation.queries import ALTITUDE_BINS, CASE_ORDER, DISTANCE_BINS, PITCH_BINS


def format_table(summaries: dict[str, dict], title: str = "") -> str:
    """A fixed-width table: one row per (run, case), columns mAP / Rank-1/5/10 / mINP in percent.

    Args:
        summaries: run name ("plain", "rerank") -> case -> ``summarize`` dict.
        title: printed above the table.
    """
    head = f"{'run':<8} {'case':<10} {'mAP':>7} {'R1':>7} {'R5':>7} {'R10':>7} {'mINP':>7} {'#query':>7}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for run, summary in summaries.items():
        for case in CASE_ORDER:
            if case not in summary:
                continue
            s = summary[case]
            num_query = s.get("num_query", "")
            lines.append(
                f"{run:<8} {case:<10} {100 * s['mAP']:7.2f} {100 * s['rank1']:7.2f} {100 * s['rank5']:7.2f} "
                f"{100 * s['rank10']:7.2f} {100 * s['mINP']:7.2f} {num_query!s:>7}"
            )
    return "\n".join(lines)


def run_table(summaries: dict, notes: dict, title: str, num_tracklets: int, names_shown: int = 10) -> str:
    """:func:`format_table` plus a line per thing left out: unreadable tracklets, unscored ones (limited batches)."""
    lines = [format_table(summaries, title=title)]
    unreadable = notes["unreadable"]
    if unreadable["count"]:
        lines.append(
            f"unreadable tracklets dropped from query and gallery: {unreadable['count']} "
            f"({', '.join(unreadable['tracklets'][:names_shown])})"
        )
    if notes["not_evaluated"]:
        lines.append(
            f"partial evaluation (limited batches): {num_tracklets - notes['not_evaluated']} of "
            f"{num_tracklets} tracklets scored"
        )
    return "\n".join(lines)


def metadata_breakdowns(eval_set: EvalSet, per_case: dict) -> dict[str, list[dict]]:
    """mAP of aerial queries by altitude, horizontal distance and pitch, pooled over the cases they query."""
    aps, altitudes, distances, pitches = [], [], [], []
    for case, result in per_case.items():
        q = eval_set.cases[case][0]
        ap = np.asarray(result["AP"], dtype=float)
        for j, i in enumerate(q):
            t = eval_set.tracklets[i]
            if t.view == "aerial" and np.isfinite(ap[j]):
                aps.append(ap[j])
                altitudes.append(t.altitude)
                distances.append(t.distance)
                pitches.append(t.angle)
    if not aps:
        return {}
    aps_arr = np.array(aps)
    return {
        "altitude (m)": breakdown_by_bins(aps_arr, np.array(altitudes), ALTITUDE_BINS),
        "distance (m)": breakdown_by_bins(aps_arr, np.array(distances), DISTANCE_BINS),
        "pitch (deg)": breakdown_by_bins(aps_arr, np.array(pitches), PITCH_BINS),
    }


def select_queries(ap: np.ndarray, count: int = 3) -> list[tuple[str, int]]:
    """Queries spread evenly over the AP order, from the worst to the best (3: worst, median, best).

    Args:
        ap: (Q,) AP per query, NaN for queries without a true match (never chosen).
        count: how many to choose (fewer when there are fewer valid queries).

    Returns:
        (tag, query position) pairs, worst first; tags "worst", "median", "best" or "AP rank k/n". Ties in AP keep
        the query order.
    """
    ap = np.asarray(ap, dtype=float)
    valid = np.flatnonzero(np.isfinite(ap))
    if valid.size == 0 or count < 1:
        return []
    order = valid[np.argsort(ap[valid], kind="stable")]  # worst .. best
    n = len(order)
    steps = [0] if count == 1 else sorted({k * (n - 1) // (count - 1) for k in range(count)})
    picks = []
    for step in steps:
        if step == 0:
            tag = "worst"
        elif step == n - 1:
            tag = "best"
        elif count % 2 == 1 and step == (n - 1) // 2:  # the lower middle when n is even
            tag = "median"
        else:
            tag = f"AP rank {step + 1}/{n}"
        picks.append((tag, int(order[step])))
    return picks


def _where(t) -> str:
    """Camera, and for aerial tracklets altitude and horizontal distance, in a few characters."""
    if t.view == "aerial":
        return f"cam {t.camid}, {t.altitude:g} m alt, {t.distance:g} m"
    return f"cam {t.camid} (ground)"


def select_attention_tracklets(eval_set: EvalSet, weights: np.ndarray, count: int = 4) -> list[int]:
    """Tracklets for the attention figure: at least T real frames (no padding), each tracklet once, the least
    uniform weights (largest max - min) first.

    Args:
        eval_set: the scored tracklets (a tracklet can occur in several cases: it is shown once).
        weights: (N, T) temporal pooling weights.
        count: how many to choose.
    """
    num_frames = weights.shape[1]
    spread = weights.max(1) - weights.min(1)
    chosen, seen = [], set()
    for i in np.argsort(-spread, kind="stable"):
        t = eval_set.tracklets[i]
        key = t.frames[0]  # the same folder read into two cases is the same tracklet
        if len(t.frames) >= num_frames and key not in seen:
            seen.add(key)
            chosen.append(int(i))
            if len(chosen) == count:
                break
    return chosen


def write_figures(
    out_dir: Path,
    eval_set: EvalSet,
    weights: torch.Tensor,
    report: dict,
    num_queries: int = 3,
    features: torch.Tensor | None = None,
    reader: FrameReader | None = None,
) -> list[Path]:
    """CMC curves, ranked lists of chosen queries, temporal attention weights and the metadata breakdown.

    Args:
        out_dir: folder for the PNGs.
        eval_set: the scored tracklets and cases.
        weights: (N, T) temporal pooling weights of every tracklet of ``eval_set``.
        report: run name -> (summary, results) as built by the evaluator.
        num_queries: queries per case in the ranked lists, spread over the AP order (3: worst, median, best).
        features: (N, F) L2-normalised embeddings; when given, each rank shows its cosine distance to the query
            (the distance the plain ranking sorts by).
        reader: decodes the frames drawn (the frames the scorer used); unreadable ones are counted placeholders.
    """
    reader = reader or FrameReader(plots.THUMB_SIZE)
    num_frames = weights.shape[1]  # T of the evaluation clips
    out_dir.mkdir(parents=True, exist_ok=True)
    tr = eval_set.tracklets
    paths = []
    for run, (_summary, results) in report.items():
        curves = {case: r["cmc"] for case, r in results["cases"].items()}
        paths.append(plots.plot_cmc(curves, out_dir / f"cmc_{run}.png"))
    _summary, results = report["plain"]
    for case, (q, g) in eval_set.cases.items():
        picks = select_queries(results["cases"][case]["AP"], num_queries)
        if not picks:
            continue
        ap = np.asarray(results["cases"][case]["AP"], dtype=float)
        q_frames, g_frames, q_labels, g_labels, correct = [], [], [], [], []
        for tag, j in picks:
            query = tr[q[j]]
            ranked = [int(g[k]) for k in results["rankings"][case][j, :10]]
            q_frames.append(scorer_frames(query.frames, num_frames))
            g_frames.append([scorer_frames(tr[i].frames, num_frames) for i in ranked])
            q_labels.append(f"{tag}: AP {100 * ap[j]:.1f}%\n{query.name} ID {query.pid}\n{_where(query)}")
            labels = []
            for r, i in enumerate(ranked):
                distance = f" d={1.0 - float(features[q[j]] @ features[i]):.3f}" if features is not None else ""
                labels.append(f"#{r + 1}{distance}\nID {tr[i].pid}\n{_where(tr[i])}")
            g_labels.append(labels)
            correct.append([tr[i].pid == query.pid for i in ranked])
        paths.append(
            plots.plot_ranked_lists(
                q_frames,
                g_frames,
                np.array(correct),
                out_dir / f"ranked_{case}.png",
                query_labels=q_labels,
                gallery_labels=g_labels,
                title=f"{case}: queries by AP (green = same identity; d = cosine distance)",
                reader=reader,
            )
        )
    w = weights.float().numpy()
    pick = select_attention_tracklets(eval_set, w)
    if pick:
        sampled, labels = [], []
        for i in pick:
            t = tr[i]
            sampled.append(scorer_frames(t.frames, w.shape[1]))
            labels.append(f"{t.name} ID {t.pid}, {_where(t)}, {len(t.frames)} frames")
        paths.append(plots.plot_attention(sampled, [w[i] for i in pick], out_dir / "attention.png", labels, reader))
    else:
        warnings.warn(
            f"no tracklet has the {w.shape[1]} real frames an unpadded attention figure needs: attention.png skipped",
            stacklevel=2,
        )
    breakdowns = metadata_breakdowns(eval_set, results["cases"])
    if breakdowns:
        paths.append(plots.plot_breakdown(breakdowns, out_dir / "breakdown.png"))
    return [Path(p) for p in paths]
