"""Lightning glue of the evaluation: collect each batch's embeddings, score every case on rank 0, log, report.

The state of an epoch is an :class:`~farreid.evaluation.state.EmbeddingRows` metric (torchmetrics gathers it from
every rank); scoring is :mod:`farreid.evaluation.scoring`, the table and figures :mod:`farreid.evaluation.reporting`,
the challenge CSV :mod:`farreid.evaluation.submission`. Only rank 0 scores; the metrics are broadcast so that every
rank logs the same monitored value (what ``ModelCheckpoint`` and early stopping read on each rank).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from farreid.data.protocols import EvalSet
from farreid.evaluation import plots, scoring
from farreid.evaluation.frames import FrameReader
from farreid.evaluation.report import log_worst_queries, write_report
from farreid.evaluation.reporting import metadata_breakdowns, run_table, write_figures
from farreid.evaluation.scoring import NAMES_SHOWN, Scorer
from farreid.evaluation.state import EmbeddingRows, Gathered, merged
from farreid.evaluation.submission import write_submission

METRICS = ("mAP", "mINP", "rank1", "rank5", "rank10")


class ReIDEvaluator(Callback):
    """Scores A2G, G2A and A2A after every validation/test epoch and writes the challenge CSV on ``predict``.

    Tracklets none of whose frames could be decoded (``valid`` False) are dropped from query and gallery and
    counted (printed, logged as ``<stage>/unreadable`` and written to ``results.json``). A non-finite embedding is
    an error naming its tracklets. During Lightning's sanity check nothing is scored; with a limited number of
    evaluation batches (``fast_dev_run``, ``limit_val_batches``) the tracklets seen are scored and the table
    says so.

    Args:
        scorer: "market" (Market-1501 junk rule) or "challenge" (same-tracklet junk, trapezoidal AP).
        max_rank: length of the CMC curve.
        rerank: also score with k-reciprocal re-ranking (logged under ``<stage>/rerank/...``); the submission
            uses the re-ranked lists when set.
        k1, k2, lambda_value: re-ranking parameters (Zhong et al., CVPR 2017).
        rerank_candidates: None = exact re-ranking; C = restrict every neighbourhood to each item's top-C
            FAISS candidates (for galleries too large for the exact N×N distance pass).
        rerank_on_validation: re-rank during validation too (slower; off by default).
        figures: write CMC curves, ranked lists, attention weights and the altitude/distance breakdown at test.
        figure_queries: queries per case shown in the ranked-list figure.
        report: write ``report.html`` (every query, worst first, with thumbnails) and ``per_query.csv`` at test
            (:mod:`farreid.evaluation.report`); with a W&B logger the worst queries also go to a ``wandb.Table``.
    """

    def __init__(
        self,
        scorer: Scorer = "market",
        max_rank: int = 50,
        rerank: bool = False,
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
        rerank_candidates: int | None = None,
        rerank_on_validation: bool = False,
        figures: bool = True,
        figure_queries: int = 4,
        report: bool = True,
    ) -> None:
        self.scorer = scorer
        self.max_rank = max_rank
        self.rerank = rerank
        self.rerank_params = {"k1": k1, "k2": k2, "lambda_value": lambda_value, "approx_candidates": rerank_candidates}
        self.rerank_on_validation = rerank_on_validation
        self.figures = figures
        self.figure_queries = figure_queries
        self.report = report
        self.rows = EmbeddingRows()
        self._said_sanity = False
        self.last_results: dict = {}
        self.run_info: dict = {}

    # ------------------------------------------------------------------------------------ collection
    def _reset(self, trainer, pl_module) -> None:
        self.rows = self.rows.to(pl_module.device)
        self.rows.reset()

    on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = _reset

    def _collect(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows.update(
            outputs["features"],
            outputs["weights"],
            outputs["index"],
            item=outputs.get("item"),
            valid=outputs.get("valid"),
            pid=batch.get("pid") if isinstance(batch, dict) else None,
        )

    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _collect

    def _gathered(self, eval_set: EvalSet) -> Gathered:
        """Every rank's rows (a collective: call on every rank), merged per tracklet and checked against the set."""
        rows = self.rows.compute()
        known = rows["pid"] >= 0
        if bool(known.any()):
            expected = torch.as_tensor([t.pid for t in eval_set.tracklets], device=rows["index"].device)
            wrong = known & (expected[rows["index"].clamp(0, len(eval_set) - 1)] != rows["pid"])
            if bool(wrong.any()):
                raise RuntimeError(
                    f"{int(wrong.sum())} evaluation rows carry a PID other than their tracklet's "
                    f"({scoring.names(eval_set, rows['index'][wrong].tolist())}): the loader and the set disagree"
                )
        return merged(rows, len(eval_set))

    @staticmethod
    def _limited(trainer: L.Trainer, stage: str) -> bool:
        """True when Lightning runs only part of the evaluation loader (fast_dev_run, limit_*_batches)."""
        limit = {"validate": trainer.limit_val_batches, "test": trainer.limit_test_batches}.get(
            stage, trainer.limit_predict_batches
        )
        return bool(trainer.fast_dev_run) or limit != 1.0

    # --------------------------------------------------------------------------------------- scoring
    def score(self, eval_set: EvalSet, feats: torch.Tensor, rerank: bool) -> dict:
        """:func:`farreid.evaluation.scoring.score` with this evaluator's scorer and re-ranking parameters."""
        params = self.rerank_params if rerank else None
        return scoring.score(eval_set, feats, self.scorer, self.max_rank, params)

    @staticmethod
    def _summary(results: dict, eval_set: EvalSet) -> dict:
        return scoring.summary(results, eval_set)

    def _sanity_check(self, trainer: L.Trainer) -> bool:
        if not trainer.sanity_checking:
            return False
        if not self._said_sanity and trainer.is_global_zero:
            print("[farreid] sanity check: evaluation ran on a few batches only, metrics not scored")
            self._said_sanity = True
        return True

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._sanity_check(trainer):
            return
        full_set: EvalSet = trainer.datamodule.eval_set(stage)
        # The run directory, asked on every rank (``trainer.log_dir`` is a collective under DDP).
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) if stage == "test" or full_set.anonymized else None
        gathered = self._gathered(full_set)
        eval_set, notes = scoring.scoreable(full_set, gathered, self._limited(trainer, stage))
        prefix = "val" if stage == "validate" else "test"
        runs = [("plain", False)]
        if self.rerank and (stage == "test" or self.rerank_on_validation):
            runs.append(("rerank", True))
        report: dict = {}
        if trainer.is_global_zero:  # the one scorer of the job; the others wait for its broadcast
            for name, use_rr in runs:
                results = self.score(eval_set, gathered.features, rerank=use_rr)
                if eval_set.anonymized:
                    self._write_submission(out_dir, eval_set, results["rankings"], "_rerank" if use_rr else "")
                    if stage == "test" and not use_rr and self.report:
                        self._write_report(trainer, out_dir, eval_set, gathered.features, gathered.weights, results)
                elif results["cases"]:
                    report[name] = (self._summary(results, eval_set), results)
        summaries = trainer.strategy.broadcast({name: s for name, (s, _r) in report.items()}, src=0)
        if not summaries:
            if not eval_set.anonymized:
                rank_zero_warn(f"[farreid] {prefix}: no case had a query and a gallery among the tracklets seen")
            return
        self._log(pl_module, prefix, summaries, notes)
        self.last_results = {**summaries["plain"], **notes}
        if "rerank" in summaries:
            self.last_results["rerank"] = summaries["rerank"]
        if not trainer.is_global_zero:
            return
        title = prefix if stage == "test" else f"{prefix} (epoch {trainer.current_epoch})"
        if stage != "test" and trainer.state.fn != "fit":
            title = f"{prefix} (checkpoint)"
        print(run_table(summaries, notes, title, len(full_set), NAMES_SHOWN))
        if stage == "test":
            self._report_test(trainer, out_dir, eval_set, gathered.weights.cpu(), report, gathered.features.cpu())

    def _log(self, pl_module: L.LightningModule, prefix: str, summaries: dict, notes: dict) -> None:
        """Log ``<prefix>[/rerank]/<case>/<metric>`` and ``<prefix>/unreadable`` (same values on every rank)."""
        for name, summary in summaries.items():
            key = prefix if name == "plain" else f"{prefix}/rerank"
            for group, values in summary.items():
                for metric in METRICS:
                    pl_module.log(f"{key}/{group}/{metric}", float(values[metric]), sync_dist=False)
        pl_module.log(f"{prefix}/unreadable", float(notes["unreadable"]["count"]), sync_dist=False)

    def _report_test(self, trainer, out_dir: Path, eval_set: EvalSet, weights, report: dict, feats=None) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        breakdown = metadata_breakdowns(eval_set, report["plain"][1]["cases"])
        if breakdown:
            self.last_results["breakdown"] = breakdown
        path = out_dir / "results.json"
        # run_info (set by the farreid CLI): the checkpoint tested, the git commit and the resolved config. Written
        # before the drawing (kept if it fails) and again after it (with its counts of unreadable frames).
        path.write_text(json.dumps({**self.last_results, "run": self.run_info}, indent=2))
        if self.figures:
            reader = FrameReader(plots.THUMB_SIZE)
            paths = write_figures(out_dir / "figures", eval_set, weights, report, self.figure_queries, feats, reader)
            self.last_results["figures"] = {"files": len(paths), "unreadable_frames": reader.summary()}
            print(f"[farreid] figures written to {out_dir / 'figures'} ({len(paths)} files)")
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    for p in paths:
                        logger.log_image(key=f"figures/{p.stem}", images=[str(p)])
        if self.report:
            rerank = report["rerank"][1] if "rerank" in report else None
            summaries = {name: summary for name, (summary, _results) in report.items()}
            self._write_report(trainer, out_dir, eval_set, feats, weights, report["plain"][1], rerank, summaries)
        path.write_text(json.dumps({**self.last_results, "run": self.run_info}, indent=2))
        print(f"[farreid] results written to {path}")

    def _write_report(self, trainer, out_dir, eval_set, feats, weights, plain, rerank=None, summaries=None) -> None:
        workers = int(getattr(trainer.datamodule, "hparams", {}).get("num_workers", 0) or 0)
        info = write_report(out_dir, eval_set, plain, feats.cpu(), weights.cpu(), rerank, summaries, self.scorer,
                            workers=min(workers, os.cpu_count() or 1))  # fmt: skip
        self.last_results["report"] = {k: v for k, v in info.items() if k not in ("entries", "worst")}
        seconds = info["seconds"]
        print(f"[farreid] report written to {out_dir / 'report.html'} ({info['queries']} queries, {seconds:.1f} s)")
        log_worst_queries(trainer.loggers, info["worst"])

    @staticmethod
    def _write_submission(out_dir: Path, eval_set: EvalSet, rankings: dict, suffix: str = "") -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"submission{suffix}.csv"
        write_submission(path, scoring.submission_rows(eval_set, rankings))
        print(f"[farreid] anonymized test set: challenge submission written to {path}")

    # ---------------------------------------------------------------------------------- epoch ends
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.rows.num_rows:
            self._evaluate(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.rows.num_rows:
            self._evaluate(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not self.rows.num_rows:
            return
        full_set: EvalSet = trainer.datamodule.eval_set("predict")
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        gathered = self._gathered(full_set)
        eval_set, notes = scoring.scoreable(full_set, gathered, self._limited(trainer, "predict"))
        if notes["unreadable"]["count"]:
            rank_zero_warn(
                f"[farreid] {notes['unreadable']['count']} unreadable tracklets left out of the submission: "
                f"{', '.join(notes['unreadable']['tracklets'][:NAMES_SHOWN])}"
            )
        if trainer.is_global_zero:
            results = self.score(eval_set, gathered.features, rerank=self.rerank)
            self._write_submission(out_dir, eval_set, results["rankings"], "_rerank" if self.rerank else "")
