"""``farreid compare``: where two test runs differ, query by query.

    farreid compare runs/baseline/test-20261201-101500 runs/vitl14/test-20261202-093000 --out cmp/

Reads each run's ``per_query.csv`` (written by ``farreid test``), checks that both scored the same cases and the
same queries, and writes into ``--out``: ``compare.csv`` (one row per case and query: both runs' AP and first-match
rank, plain and re-ranked, and ``delta`` = AP(B) - AP(A), sorted largest regression first), ``compare.json`` (the
per-case and per altitude / distance bin summaries) and ``compare.html`` (the same as a static page, with links to
both runs' ``report.html``). A one-screen summary goes to the terminal. Exit status: 0 done, 1 the runs cannot be
compared (one line saying why), 2 a usage error.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from farreid.evaluation.queries import (
    ALTITUDE_BINS,
    CASE_ORDER,
    CSV_NAME,
    DISTANCE_BINS,
    bin_label,
    bin_order,
    read_csv,
)

SAME = 1e-6  # |delta| below this counts as unchanged
COLUMNS = (
    "case", "query", "pid", "view", "altitude", "distance", "ap_a", "ap_b", "delta", "ap_rerank_a", "ap_rerank_b",
    "delta_rerank", "first_match_rank_a", "first_match_rank_b",
)  # fmt: skip


class NotComparable(ValueError):
    """The two directories are not two test runs over the same cases and queries."""


def load_run(run: Path) -> list[dict]:
    """The per-query rows of a ``farreid test`` run directory.

    Raises:
        NotComparable: not a directory, not a test run (no ``results.json``), no ``per_query.csv``, or a table
            without AP (an anonymized release).
    """
    if not run.is_dir():
        raise NotComparable(f"{run}: no such directory (expected a `farreid test` run directory)")
    if not (run / "results.json").is_file():
        raise NotComparable(f"{run}: not a `farreid test` run directory (no results.json in it)")
    if not (run / CSV_NAME).is_file():
        raise NotComparable(f"{run}: no {CSV_NAME} (written by `farreid test` with evaluator.report on; test again)")
    try:
        rows = read_csv(run / CSV_NAME)
    except ValueError as err:
        raise NotComparable(str(err)) from None
    if not rows:
        raise NotComparable(f"{run / CSV_NAME}: no queries in it")
    if all(r["ap"] is None for r in rows):
        raise NotComparable(f"{run / CSV_NAME}: no AP values (an anonymized release has no identities to score)")
    return rows


def _examples(names: set, count: int = 3) -> str:
    shown = sorted(names)[:count]
    return ", ".join(map(str, shown)) + (f" and {len(names) - count} more" if len(names) > count else "")


def pair_rows(rows_a: list[dict], rows_b: list[dict]) -> list[dict]:
    """One row per (case, query) of both runs (the :data:`COLUMNS`), largest regression first.

    Raises:
        NotComparable: the runs differ in their cases, in a case's queries, or in a query's identity.
    """
    by_a = {(r["case"], r["query"]): r for r in rows_a}
    by_b = {(r["case"], r["query"]): r for r in rows_b}
    cases_a, cases_b = {c for c, _ in by_a}, {c for c, _ in by_b}
    if cases_a != cases_b:
        raise NotComparable(
            f"the runs scored different cases: A has {sorted(cases_a)}, B has {sorted(cases_b)}"
            " (test both on the same split and cases)"
        )
    for case in sorted(cases_a):
        qa = {q for c, q in by_a if c == case}
        qb = {q for c, q in by_b if c == case}
        if qa != qb:
            parts = [f"{len(s)} only in {name} ({_examples(s)})" for name, s in (("A", qa - qb), ("B", qb - qa)) if s]
            raise NotComparable(f"case {case}: the runs scored different queries: {'; '.join(parts)}")
    paired = []
    for key, a in by_a.items():
        b = by_b[key]
        if a["pid"] != b["pid"]:
            raise NotComparable(f"case {key[0]}, query {key[1]}: PID {a['pid']} in A but {b['pid']} in B")
        paired.append(
            {
                **{k: a[k] for k in ("case", "query", "pid", "view", "altitude", "distance")},
                "ap_a": a["ap"], "ap_b": b["ap"], "delta": _diff(b["ap"], a["ap"]),
                "ap_rerank_a": a["ap_rerank"], "ap_rerank_b": b["ap_rerank"],
                "delta_rerank": _diff(b["ap_rerank"], a["ap_rerank"]),
                "first_match_rank_a": a["first_match_rank"], "first_match_rank_b": b["first_match_rank"],
            }
        )  # fmt: skip
    paired.sort(
        key=lambda r: (r["delta"] is None, r["delta"] if r["delta"] is not None else 0.0, r["case"], r["query"])
    )
    return paired


def _diff(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _group(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["delta"] is not None]
    d = np.array([r["delta"] for r in scored]) if scored else np.zeros(0)
    return {
        "queries": len(scored),
        "mAP_a": float(np.mean([r["ap_a"] for r in scored])) if scored else None,
        "mAP_b": float(np.mean([r["ap_b"] for r in scored])) if scored else None,
        "delta": float(d.mean()) if scored else None,
        "better": int((d > SAME).sum()),
        "worse": int((d < -SAME).sum()),
        "same": int((np.abs(d) <= SAME).sum()),
    }


def summarize(paired: list[dict]) -> dict:
    """Per case (and all queries): mAP of each run, mean delta, queries better / worse / same; and the same per
    case and altitude bin, and per case and distance bin."""
    cases = sorted({r["case"] for r in paired}, key=lambda c: (CASE_ORDER.index(c) if c in CASE_ORDER else 99, c))
    out: dict = {"cases": {c: _group([r for r in paired if r["case"] == c]) for c in cases}}
    out["cases"]["all queries"] = _group(paired)
    for name, key, edges in (("altitude", "altitude", ALTITUDE_BINS), ("distance", "distance", DISTANCE_BINS)):
        table: dict = {}
        for case in cases:
            rows = [r for r in paired if r["case"] == case]
            labels = sorted({bin_label(r[key], edges) for r in rows}, key=bin_order)
            table[case] = {lb: _group([r for r in rows if bin_label(r[key], edges) == lb]) for lb in labels}
        out[name] = table
    return out


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def terminal_summary(summary: dict, paired: list[dict], run_a: Path, run_b: Path, top: int = 5) -> str:
    lines = [
        f"A: {run_a}",
        f"B: {run_b}",
        "",
        f"{'case':<12} {'mAP A':>7} {'mAP B':>7} {'delta':>7}  better/worse/same",
    ]
    for case, g in summary["cases"].items():
        lines.append(
            f"{case:<12} {_pct(g['mAP_a']):>7} {_pct(g['mAP_b']):>7} {_pct(g['delta'], True):>7}  "
            f"{g['better']}/{g['worse']}/{g['same']}"
        )
    scored = [r for r in paired if r["delta"] is not None]
    for title, rows in (("largest regressions", scored[:top]), ("largest gains", scored[::-1][:top])):
        rows = [r for r in rows if abs(r["delta"]) > SAME]
        lines += ["", f"{title} (AP A -> B):"] + [
            f"  {r['case']:<4} {r['query']:<24} ID {r['pid']:<6} {_pct(r['ap_a']):>6} -> {_pct(r['ap_b']):>6}"
            f" ({_pct(r['delta'], True)})"
            for r in rows
        ]
        if not rows:
            lines.append("  none")
    return "\n".join(lines)


def _html_group_table(groups: dict, first: str) -> str:
    head = f"<tr><th>{first}</th><th>queries</th><th>mAP A</th><th>mAP B</th><th>delta</th><th>better</th>"
    body = [f"<table>{head}<th>worse</th><th>same</th></tr>"]
    for name, g in groups.items():
        cls = "worse" if (g["delta"] or 0) < -SAME else "better" if (g["delta"] or 0) > SAME else ""
        body.append(
            f"<tr><td>{html.escape(str(name))}</td><td>{g['queries']}</td><td>{_pct(g['mAP_a'])}</td>"
            f"<td>{_pct(g['mAP_b'])}</td><td class='{cls}'>{_pct(g['delta'], True)}</td><td>{g['better']}</td>"
            f"<td>{g['worse']}</td><td>{g['same']}</td></tr>"
        )
    return "\n".join(body) + "</table>"


def _html_rows(rows: list[dict]) -> str:
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = []
    for r in rows:
        cls = "worse" if (r["delta"] or 0) < -SAME else "better" if (r["delta"] or 0) > SAME else ""
        cells = "".join(f"<td>{html.escape(_cell(r[c]))}</td>" for c in COLUMNS)
        body.append(f"<tr class='{cls}' data-query='{html.escape(r['query'])}' data-case='{r['case']}'>{cells}</tr>")
    return f"<table class='rows'><tr>{head}</tr>" + "\n".join(body) + "</table>"


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


STYLE = (
    "body{font:13px/1.35 system-ui,sans-serif;margin:16px;color:#222}table{border-collapse:collapse;margin:6px 0}"
    "td,th{padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
    "tr:nth-child(even){background:#f3f3f3}.worse,tr.worse td:nth-child(9){color:#b00}"
    ".better,tr.better td:nth-child(9){color:#070}h2{font-size:15px;margin:18px 0 6px}"
)


def write_outputs(out: Path, paired: list[dict], summary: dict, run_a: Path, run_b: Path, top: int = 50) -> None:
    """``compare.csv``, ``compare.json`` and ``compare.html`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in paired:
            writer.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})
    (out / "compare.json").write_text(json.dumps({"a": str(run_a), "b": str(run_b), **summary}, indent=2))
    scored = [r for r in paired if r["delta"] is not None]
    links = "".join(
        f"<li>{name}: <a href='{html.escape(_relative(run / 'report.html', out))}'>{html.escape(str(run))}</a></li>"
        for name, run in (("A", run_a), ("B", run_b))
    )
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>farreid compare</title>"
        f"<style>{STYLE}</style></head><body><h1>farreid compare: B - A, per query</h1><ul>{links}</ul>",
        "<h2>Per case</h2>",
        _html_group_table(summary["cases"], "case"),
    ]
    for name in ("altitude", "distance"):
        for case, groups in summary[name].items():
            parts += [f"<h2>{case} by {name} (m)</h2>", _html_group_table(groups, name)]
    parts += [
        f"<h2>Largest regressions (top {top})</h2>",
        _html_rows([r for r in scored[:top] if r["delta"] < -SAME]),
        f"<h2>Largest gains (top {top})</h2>",
        _html_rows([r for r in scored[::-1][:top] if r["delta"] > SAME]),
        "<p>Every query: compare.csv beside this page.</p></body></html>",
    ]
    (out / "compare.html").write_text("\n".join(parts), encoding="utf-8")


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="farreid compare",
        description="Per-query AP differences of two `farreid test` runs over the same cases and queries.",
    )
    parser.add_argument("run_a", type=Path, help="the reference run directory (holds results.json, per_query.csv)")
    parser.add_argument("run_b", type=Path, help="the run compared with it; delta = AP(B) - AP(A)")
    parser.add_argument("--out", type=Path, required=True, help="directory for compare.csv/.json/.html")
    parser.add_argument("--top", type=int, default=5, help="regressions and gains printed (default 5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``farreid compare``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        paired = pair_rows(load_run(args.run_a), load_run(args.run_b))
    except NotComparable as err:
        print(f"farreid compare: error: {err}", file=sys.stderr)
        return 1
    summary = summarize(paired)
    write_outputs(args.out, paired, summary, args.run_a, args.run_b)
    print(terminal_summary(summary, paired, args.run_a, args.run_b, args.top))
    print(f"\n[farreid] comparison written to {args.out / 'compare.html'} and {args.out / 'compare.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
