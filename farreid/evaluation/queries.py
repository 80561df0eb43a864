"""One row per (case, query) of a scored test run: who the query is, where it was seen from, how it ranked.

``per_query.csv`` (written by ``farreid test``, read by ``farreid compare`` and the HTML report) holds, for every
case and query: ``case``, ``query`` (tracklet name), ``pid``, ``camid``, ``view``, ``altitude``, ``distance``,
``pitch``, ``num_frames``, ``ap`` and ``ap_rerank`` (AP in [0, 1] of the plain and the re-ranked ranking; empty for
a query without a true match in its gallery, which the case's mAP leaves out, and on an anonymized release), and
``first_match_rank`` / ``first_match_rank_rerank`` (1-based rank of the first true match after the scorer's junk
removal; empty without one). The mean of ``ap`` over a case is that case's mAP in ``results.json``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from farreid.data.protocols import EvalSet

FIELDS = (
    "case", "query", "pid", "camid", "view", "altitude", "distance", "pitch", "num_frames",
    "ap", "ap_rerank", "first_match_rank", "first_match_rank_rerank",
)  # fmt: skip
CSV_NAME = "per_query.csv"
CASE_ORDER = ("A2G", "G2A", "A2A", "overall", "case_mean")
ALTITUDE_BINS = (0.0, 20.0, 40.0, 60.0, 80.0, 200.0)  # metres; the last bin is open ("80+")
DISTANCE_BINS = (0.0, 30.0, 60.0, 90.0, 200.0)
PITCH_BINS = (0.0, 45.0, 75.0, 91.0)  # DetReIDX flies at 30°, 60° and 90°


def _ap(results: dict | None, case: str, j: int) -> float | None:
    if results is None or case not in results["cases"]:
        return None
    value = float(results["cases"][case]["AP"][j])
    return value if math.isfinite(value) else None


def _first(results: dict | None, case: str, j: int) -> int | None:
    if results is None or case not in results["cases"]:
        return None
    hit = int(results["cases"][case]["first_hit"][j])
    return hit + 1 if hit >= 0 else None


def query_rows(eval_set: EvalSet, plain: dict, rerank: dict | None = None) -> list[dict]:
    """The rows of every case's queries, in case then query order.

    Args:
        eval_set: the scored tracklets and cases.
        plain: the plain ranking's results (``scoring.score``: per-case ``AP``, ``first_hit``; ``rankings``).
        rerank: the re-ranked results, or None.

    Returns:
        Dicts with the :data:`FIELDS` plus ``index`` (the query's tracklet index in ``eval_set``) and ``row`` (its
        position among the case's queries, the row of ``plain["rankings"][case]``).
    """
    rows = []
    for case, (queries, _gallery) in eval_set.cases.items():
        for j, i in enumerate(queries):
            t = eval_set.tracklets[int(i)]
            aerial = t.view == "aerial"
            rows.append(
                {
                    "case": case,
                    "query": t.name,
                    "pid": t.pid,
                    "camid": t.camid,
                    "view": t.view,
                    "altitude": t.altitude if aerial else None,
                    "distance": t.distance if aerial else None,
                    "pitch": t.angle if aerial else None,
                    "num_frames": len(t.frames),
                    "ap": _ap(plain, case, j),
                    "ap_rerank": _ap(rerank, case, j),
                    "first_match_rank": _first(plain, case, j),
                    "first_match_rank_rerank": _first(rerank, case, j),
                    "index": int(i),
                    "row": j,
                }
            )
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    """``per_query.csv``: the :data:`FIELDS` of each row, empty cells for None."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in FIELDS})
    return path


def _number(cell: str, kind=float):
    return None if cell == "" else kind(cell)


def read_csv(path: Path) -> list[dict]:
    """The rows of a ``per_query.csv``, numbers parsed, empty cells None.

    Raises:
        FileNotFoundError: no such file. ValueError: a column of :data:`FIELDS` is missing or a cell is not a number.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-query table (a `farreid test` run directory holds one)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in FIELDS if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a farreid per-query table, columns {missing} are missing")
        rows = []
        for line, raw in enumerate(reader, start=2):
            try:
                rows.append(
                    {
                        **raw,
                        "pid": int(raw["pid"]),
                        "camid": int(raw["camid"]),
                        "num_frames": int(raw["num_frames"]),
                        **{k: _number(raw[k]) for k in ("altitude", "distance", "pitch", "ap", "ap_rerank")},
                        **{k: _number(raw[k], int) for k in ("first_match_rank", "first_match_rank_rerank")},
                    }
                )
            except ValueError as err:
                raise ValueError(f"{path}, line {line}: {err}") from None
    return rows


def case_means(rows: list[dict], key: str = "ap") -> dict[str, float]:
    """Per case, the mean of ``key`` over the rows that have it (the case's mAP for ``ap``)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        if row[key] is not None:
            values.setdefault(row["case"], []).append(row[key])
    return {case: float(np.mean(v)) for case, v in values.items()}


def bin_label(value: float | None, edges: tuple[float, ...]) -> str:
    """The bin of ``value`` as "lo-hi" (the last "lo+"), or "ground" for a ground view (None)."""
    if value is None:
        return "ground"
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if lo <= value < hi:
            return f"{lo:g}-{hi:g}" if hi < edges[-1] else f"{lo:g}+"
    return f"{edges[-1]:g}+"


def bin_order(label: str) -> float:
    """Sort key of a :func:`bin_label`: "ground" first, then by lower edge."""
    return -1.0 if label == "ground" else float(label.split("-")[0].rstrip("+"))
