"""The error-analysis report of a test run: ``report.html`` and its thumbnails in ``report/``, ``per_query.csv``.

For every case and query, worst AP first: the frames the scorer used (with the temporal attention weight the
pooling gave each), the query's identity, camera, altitude, distance, pitch and frame count, its AP with and without
re-ranking and the rank of its first true match, and its top-10 gallery tracklets with their identity, cosine
distance and a right (green) / wrong (red) / junk (grey: left out by the scorer) mark. The page is static: it opens
from the file system, loads nothing from the network, and renders one page of queries at a time.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from farreid.data.protocols import EvalSet
from farreid.evaluation import report_page
from farreid.evaluation.frames import TILE, decode_strips, scorer_frames
from farreid.evaluation.queries import (
    ALTITUDE_BINS,
    CASE_ORDER,
    CSV_NAME,
    DISTANCE_BINS,
    bin_label,
    bin_order,
    query_rows,
    write_csv,
)
from farreid.evaluation.sprites import SpriteSheets

THUMBS = "report"  # the thumbnails' folder beside report.html
TOP = 10
WANDB_ROWS = 50  # the worst queries logged as a wandb.Table


def _page_order(row: dict) -> tuple:
    """Case (A2G, G2A, A2A, others), then AP ascending (no AP last), then name: the page's order."""
    case = CASE_ORDER.index(row["case"]) if row["case"] in CASE_ORDER else len(CASE_ORDER)
    return case, row["case"], row["ap"] is None, row["ap"] or 0.0, row["query"]


class _Thumbnails:
    """The report's thumbnails, each decoded once, in page order, into the sprite sheets: a query's strip of the
    scorer's frames; a gallery tracklet's middle scorer frame, cut from its strip when the same tracklet (name and
    frame files) is also a query of some case, as DetReIDX's case folders repeat tracklets.

    Decoding runs in ``workers`` forked processes (the test's DataLoader workers) where there are several; the
    sheets are filled in this process, in order, as the decoded chunks arrive.
    """

    def __init__(self, eval_set: EvalSet, num_frames: int, folder: Path, workers: int = 0, chunk: int = 256) -> None:
        self.tracklets, self.num_frames, self.workers, self.chunk = eval_set.tracklets, num_frames, workers, chunk
        self.sheets = SpriteSheets(folder, num_frames)
        self.unreadable = {"count": 0, "examples": []}
        self._refs: dict[tuple, list[int]] = {}  # key -> a strip's or a tile's reference
        self._keys: dict[int, tuple] = {}
        self._pixels: dict[tuple, np.ndarray] = {}

    def key(self, i: int) -> tuple:
        if i not in self._keys:
            frames = scorer_frames(self.tracklets[i].frames, self.num_frames)
            self._keys[i] = (self.tracklets[i].name, tuple(os.path.basename(f) for f in frames), tuple(frames))
        return self._keys[i]

    def build(self, sequence: list[tuple[int, list[int]]], keep: set[int]) -> None:
        """Decode and place every thumbnail of ``sequence`` ((query, its top gallery tracklets) in page order);
        the pixels of the tracklets in ``keep`` are kept for :meth:`pixels`."""
        query_keys = {self.key(q)[:2] for q, _top in sequence}
        jobs, seen = [], set()  # (key, "strip" | "tile", frame paths)
        for q, top in sequence:
            for i, kind in [(q, "strip")] + [(g, "strip" if self.key(g)[:2] in query_keys else "tile") for g in top]:
                key = self.key(i)
                if key[:2] not in seen:
                    seen.add(key[:2])
                    paths = list(key[2]) if kind == "strip" else [key[2][self.num_frames // 2]]
                    jobs.append((key[:2], kind, paths))
        kept = {self.key(i)[:2] for i in keep}
        for (key, kind, _paths), pixels in zip(jobs, self._decoded([j[2] for j in jobs]), strict=True):
            self._refs[key] = self.sheets.add_strip(pixels) if kind == "strip" else self.sheets.add_tile(pixels)
            if key in kept:
                self._pixels[key] = pixels if kind == "tile" else self._middle(pixels)
                self._pixels[(key, "strip")] = pixels

    def _decoded(self, jobs: list[list[str]]):
        """Each job's frames side by side, in order; unreadable frames as counted placeholders."""
        chunks = [jobs[k : k + self.chunk] for k in range(0, len(jobs), self.chunk)]
        if self.workers > 1 and len(chunks) > 1 and "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")  # PIL only in the children: no CUDA, no torch
            with ProcessPoolExecutor(max_workers=self.workers, mp_context=context) as pool:
                yield from self._collect(pool.map(decode_strips, chunks))
        else:
            yield from self._collect(map(decode_strips, chunks))

    def _collect(self, results):
        for strips, summary in results:
            self.unreadable["count"] += summary["count"]
            self.unreadable["examples"] = (self.unreadable["examples"] + summary["examples"])[:3]
            yield from strips

    def _middle(self, strip: np.ndarray) -> np.ndarray:
        width = TILE[1]
        return strip[:, (self.num_frames // 2) * width : (self.num_frames // 2 + 1) * width]

    def strip(self, i: int) -> list[int]:
        return self._refs[self.key(i)[:2]]

    def tile(self, i: int) -> list[int]:
        ref = self._refs[self.key(i)[:2]]
        if ref[3] == TILE[1]:  # a tile of its own
            return ref
        sheet, x, y, _width = ref  # the middle frame of its strip
        return [sheet, x + (self.num_frames // 2) * TILE[1], y, TILE[1]]

    def pixels(self, query: int, top: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """A kept query's strip and its top-1 gallery tile."""
        strip = self._pixels[(self.key(query)[:2], "strip")]
        return strip, self._pixels[self.key(top[0])[:2]] if top else None

    def close(self) -> int:
        return self.sheets.close()


def _marks(eval_set: EvalSet, query: int, ranked: list[int], scorer: str) -> list[int | None]:
    """Per ranked gallery tracklet: 1 same identity, 0 another, 2 junk (the scorer leaves it out), None anonymized."""
    if eval_set.anonymized:
        return [None] * len(ranked)
    tr, q = eval_set.tracklets, eval_set.tracklets[query]
    marks = []
    for i in ranked:
        g = tr[i]
        junk = g.name == q.name if scorer == "challenge" else (g.pid == q.pid and g.camid == q.camid)
        marks.append(2 if junk else int(g.pid == q.pid))
    return marks


def _summary_table(summaries: dict) -> str:
    head = "<tr><th>run</th><th>case</th><th>mAP</th><th>Rank-1</th><th>Rank-5</th><th>Rank-10</th><th>mINP</th>"
    lines = [f"<table class='summary'>{head}<th>queries</th></tr>"]
    for run, summary in summaries.items():
        for case in CASE_ORDER:
            if case in summary:
                s = summary[case]
                cells = "".join(f"<td>{100 * s[k]:.2f}</td>" for k in ("mAP", "rank1", "rank5", "rank10", "mINP"))
                lines.append(f"<tr><td>{run}</td><td>{case}</td>{cells}<td>{s.get('num_query', '')}</td></tr>")
    return "\n".join(lines) + "</table>"


def write_report(
    out_dir: Path,
    eval_set: EvalSet,
    plain: dict,
    features: torch.Tensor,
    weights: torch.Tensor,
    rerank: dict | None = None,
    summaries: dict | None = None,
    scorer: str = "market",
    title: str = "farreid test report",
    workers: int = 0,
) -> dict:
    """Write ``per_query.csv``, ``report/`` and ``report.html`` into ``out_dir``.

    Args:
        out_dir: the test run's directory (``figures/`` beside it is linked when present).
        eval_set: the scored tracklets and cases.
        plain: the plain ranking's results (``scoring.score``); rerank: the re-ranked ones, or None.
        features: (N, F) L2-normalised embeddings (the plain ranking's cosine distances); weights: (N, T) the
            temporal pooling weights per tracklet (T = the evaluation clip's frames).
        summaries: run name -> summary (``scoring.summary``) for the table at the top; None on anonymized sets.
        scorer: the junk rule of the marks ("market" or "challenge").
        workers: processes that decode the thumbnails' frames (0 or 1: this process).

    Returns:
        ``{"entries" (the page's query entries, in its order), "queries", "thumbnail_seconds", "sheets" (sprite
        sheets written), "seconds", "unreadable_frames": {"count", "examples"}, "worst"}`` (for
        :func:`log_worst_queries`).
    """
    start = time.perf_counter()
    rows = query_rows(eval_set, plain, rerank)
    write_csv(rows, out_dir / CSV_NAME)
    num_frames = weights.shape[1]
    feats, w = features.float().cpu(), weights.float().cpu().numpy()
    ranked: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        gallery = eval_set.cases[row["case"]][1]
        ranked[r] = [int(gallery[k]) for k in plain["rankings"][row["case"]][row["row"], :TOP]]
    thumbs_start = time.perf_counter()
    order = sorted(range(len(rows)), key=lambda r: _page_order(rows[r]))  # as the page lists them
    worst = sorted((r for r in order if rows[r]["ap"] is not None), key=lambda r: rows[r]["ap"])[:WANDB_ROWS]
    keep = {rows[r]["index"] for r in worst} | {ranked[r][0] for r in worst if ranked[r]}
    thumbs = _Thumbnails(eval_set, num_frames, out_dir / THUMBS, workers)
    thumbs.build([(rows[r]["index"], ranked[r]) for r in order], keep)
    tr = eval_set.tracklets
    entries = []
    for r in order:
        row = rows[r]
        q, top = row["index"], ranked[r]
        strip = thumbs.strip(q)
        distances = (1.0 - feats[top] @ feats[q]).tolist()
        marks = _marks(eval_set, q, top, scorer)
        entries.append(
            {
                "q": row["query"], "c": row["case"], "pid": row["pid"], "cam": row["camid"], "view": row["view"],
                "alt": row["altitude"], "dist": row["distance"], "pitch": row["pitch"], "n": row["num_frames"],
                "ab": bin_label(row["altitude"], ALTITUDE_BINS), "db": bin_label(row["distance"], DISTANCE_BINS),
                "ap": row["ap"], "apr": row["ap_rerank"], "fm": row["first_match_rank"],
                "w": [round(float(x), 4) for x in w[q]], "wmax": float(max(w[q].max(), 1e-6)), "s": strip,
                "top": [[tr[i].name, tr[i].pid, round(d, 4), m, thumbs.tile(i)]
                        for i, d, m in zip(top, distances, marks, strict=True)],
            }
        )  # fmt: skip
    sheets = thumbs.close()
    position = {r: k for k, r in enumerate(order)}
    thumbs_seconds = time.perf_counter() - thumbs_start
    cases = [c for c in CASE_ORDER if c in eval_set.cases] + [c for c in eval_set.cases if c not in CASE_ORDER]
    data = {
        "case_order": cases,
        "anonymized": eval_set.anonymized,
        "altitude_bins": sorted({e["ab"] for e in entries}, key=bin_order),
        "distance_bins": sorted({e["db"] for e in entries}, key=bin_order),
        "sheets": THUMBS,
        "tile": list(TILE),
        "queries": entries,
    }
    figures = sorted((out_dir / "figures").glob("*.png")) if (out_dir / "figures").is_dir() else []
    notes = [f"{len(entries)} queries in {len(cases)} cases; thumbnails show the frames the scorer used, the bars "
             "under a query's frames the temporal attention weight of each."]  # fmt: skip
    if eval_set.anonymized:
        notes.append("Anonymized release: identities carry no meaning, so no AP and no right/wrong marks.")
    unreadable = thumbs.unreadable
    if unreadable["count"]:
        notes.append(f"{unreadable['count']} frames could not be read and are drawn as placeholders "
                     f"(e.g. {', '.join(unreadable['examples'])}).")  # fmt: skip
    figures_html = "".join(
        f"<a href='figures/{p.name}'><img src='figures/{p.name}' alt='{p.stem}'></a>" for p in figures
    )
    summary_html = _summary_table(summaries) if summaries else ""
    page = report_page.render(title, " ".join(notes), summary_html, figures_html, data)
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    return {
        "entries": entries,
        "queries": len(entries),
        "thumbnail_seconds": thumbs_seconds,
        "sheets": sheets,
        "worst": [(entries[position[r]], *thumbs.pixels(rows[r]["index"], ranked[r])) for r in worst],
        "seconds": time.perf_counter() - start,
        "unreadable_frames": unreadable,
    }


def log_worst_queries(loggers, worst: list[tuple[dict, np.ndarray, np.ndarray | None]]) -> None:
    """The worst queries (plain AP; ``write_report``'s ``worst``: entry, strip pixels, top-1 tile pixels) as a
    ``wandb.Table`` with the query's frames and its top-1 gallery tracklet, for every W&B logger (offline runs
    included); other loggers are left alone."""
    wandb_loggers = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
    if not wandb_loggers or not worst:
        return
    import wandb

    columns = ["case", "query", "pid", "ap", "ap_rerank", "first_match_rank", "frames", "top1", "top1_correct"]
    rows = []
    for e, strip, tile in worst:
        top1 = wandb.Image(tile) if tile is not None else None
        correct = e["top"][0][3] == 1 if e["top"] else None
        rows.append([e["c"], e["q"], e["pid"], e["ap"], e["apr"], e["fm"], wandb.Image(strip), top1, correct])
    for logger in wandb_loggers:
        logger.log_table(key="test/worst_queries", columns=columns, data=rows)
