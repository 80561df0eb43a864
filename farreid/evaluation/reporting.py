"""Text tables and the test-time figures, built from scored results (no Lightning)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from farreid.data.protocols import EvalSet
from farreid.data.sampling import frame_indices
from farreid.evaluation import plots
from farreid.evaluation.metrics import breakdown_by_bins

CASE_ORDER = ("A2G", "G2A", "A2A", "overall", "case_mean")
ALTITUDE_BINS = (0.0, 20.0, 40.0, 60.0, 80.0, 200.0)
DISTANCE_BINS = (0.0, 30.0, 60.0, 90.0, 200.0)
PITCH_BINS = (0.0, 45.0, 75.0, 91.0)  # DetReIDX flies at 30°, 60° and 90°


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


def write_figures(
    out_dir: Path, eval_set: EvalSet, weights: torch.Tensor, report: dict, num_queries: int = 4
) -> list[Path]:
    """CMC curves, ranked lists (top-10 per query), temporal attention weights and the metadata breakdown.

    Args:
        out_dir: folder for the PNGs.
        eval_set: the scored tracklets and cases.
        weights: (N, T) temporal pooling weights of every tracklet of ``eval_set``.
        report: run name -> (summary, results) as built by the evaluator.
        num_queries: queries per case in the ranked-list figure.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tr = eval_set.tracklets
    paths = []
    for run, (_summary, results) in report.items():
        curves = {case: r["cmc"] for case, r in results["cases"].items()}
        paths.append(plots.plot_cmc(curves, out_dir / f"cmc_{run}.png"))
    _summary, results = report["plain"]
    for case, (q, g) in eval_set.cases.items():
        ranking = results["rankings"][case][:num_queries, :10]
        chosen = q[: len(ranking)]
        q_frames = [list(tr[i].frames) for i in chosen]
        g_frames = [[list(tr[g[j]].frames) for j in row] for row in ranking]
        correct = np.array([[tr[g[j]].pid == tr[i].pid for j in row] for i, row in zip(chosen, ranking, strict=True)])
        paths.append(plots.plot_ranked_lists(q_frames, g_frames, correct, out_dir / f"ranked_{case}.png"))
    # Attention: the aerial tracklets whose weights are least uniform show what the pooling suppresses.
    w = weights.numpy()
    spread = w.max(1) - w.min(1)
    pick = np.argsort(-spread)[:4]
    sampled = [
        [tr[i].frames[j] for j in frame_indices(len(tr[i].frames), w.shape[1], False, random.Random(0))[0]]
        for i in pick
    ]
    paths.append(plots.plot_attention(sampled, [w[i] for i in pick], out_dir / "attention.png"))
    breakdowns = metadata_breakdowns(eval_set, results["cases"])
    if breakdowns:
        paths.append(plots.plot_breakdown(breakdowns, out_dir / "breakdown.png"))
    return [Path(p) for p in paths]
