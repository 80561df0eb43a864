"""Lightning glue of the evaluation: gather features from every rank, score each case on rank 0, log, report.

The scoring itself lives in plain functions (``metrics``, ``reranking``, ``search``, ``submission``, ``plots``);
this callback collects the module's per-batch outputs, removes the distributed sampler's repeats, averages the
chunk rows of a tracklet (dense evaluation), drops unreadable tracklets, refuses non-finite embeddings, and
hands whole feature matrices to them. The gathered features stay on their device: distances and re-ranking run
there in memory-sized chunks. Only rank 0 scores; the metrics are broadcast so that every rank logs the same
monitored value (what ``ModelCheckpoint`` and early stopping read on each rank).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from farreid.data.protocols import EvalSet
from farreid.evaluation.metrics import case_mean, evaluate_challenge, evaluate_rank, pool_results, summarize
from farreid.evaluation.reporting import format_table, metadata_breakdowns, write_figures
from farreid.evaluation.reranking import re_ranking
from farreid.evaluation.search import chunk_rows, ranked_distances
from farreid.evaluation.submission import write_submission

METRICS = ("mAP", "mINP", "rank1", "rank5", "rank10")
# Tracklet names listed in an error or a report before "... and N more".
_NAMES_SHOWN = 10


def gather_rows(pl_module: L.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """All-gather a (n, ...) tensor whose n may differ between ranks; returns the rows of every rank, rank-major."""
    if pl_module.trainer.world_size == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = pl_module.all_gather(count).flatten().tolist()  # (world,)
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = pl_module.all_gather(padded)  # (world, max_n, ...)
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


def _names(eval_set: EvalSet, indices) -> str:
    names = [eval_set.tracklets[int(i)].name for i in indices]
    more = f" ... and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return ", ".join(names[:_NAMES_SHOWN]) + more


@dataclasses.dataclass
class Gathered:
    """Per-tracklet evaluation inputs, in ``EvalSet`` order, on the device the features were computed on.

    Attributes:
        features: (N, F) float32 L2-normalised embeddings (rows of dropped tracklets are zero).
        weights: (N, T) frame weights of each tracklet's first row (for the attention figure).
        seen: (N,) bool, the tracklet had at least one row in this evaluation.
        readable: (N,) bool, at least one of its rows decoded a frame (``valid``).
    """

    features: torch.Tensor
    weights: torch.Tensor
    seen: torch.Tensor
    readable: torch.Tensor


def merge_rows(
    features: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    item: torch.Tensor,
    valid: torch.Tensor,
    num_tracklets: int,
) -> Gathered:
    """De-duplicate gathered rows by ``item``, average the valid rows of each tracklet ``index`` and re-normalise.

    Args:
        features: (R, F) embeddings of the gathered rows; weights: (R, T) their frame weights.
        index: (R,) tracklet index in the eval set; item: (R,) row of the eval dataset (one tracklet may have
            several rows in dense evaluation; DistributedSampler repeats some rows to pad the ranks).
        valid: (R,) bool, False when no frame of the row's tracklet could be decoded.
        num_tracklets: N, the tracklets of the eval set.
    """
    index, item, valid = index.long(), item.long(), valid.bool()
    first = torch.full((int(item.max()) + 1,), len(item), dtype=torch.long, device=item.device)
    first.scatter_reduce_(0, item, torch.arange(len(item), device=item.device), reduce="amin")
    keep = first[first < len(item)]  # one position per distinct item
    features, weights, index, valid = features[keep].float(), weights[keep].float(), index[keep], valid[keep]
    if bool((index < 0).any() or (index >= num_tracklets).any()):
        raise RuntimeError(f"evaluation rows carry tracklet indices outside [0, {num_tracklets})")
    seen = torch.zeros(num_tracklets, dtype=torch.bool, device=index.device)
    seen[index] = True
    # An unreadable row's features are whatever the model made of blank frames: they never enter the sum (a
    # where, not a product with 0, since 0 * NaN is NaN). A non-finite *valid* row stays in and is reported.
    rows = torch.where(valid[:, None], features, torch.zeros_like(features))  # (R', F)
    summed = features.new_zeros(num_tracklets, features.shape[1]).index_add_(0, index, rows)
    counts = features.new_zeros(num_tracklets).index_add_(0, index, valid.to(features.dtype))
    readable = counts > 0
    pooled = F.normalize(summed, dim=1)  # the mean of the rows, re-normalised
    first_row = torch.full((num_tracklets,), len(index), dtype=torch.long, device=index.device)
    first_row.scatter_reduce_(0, index, torch.arange(len(index), device=index.device), reduce="amin")
    frame_weights = weights.new_zeros(num_tracklets, weights.shape[1])
    frame_weights[seen] = weights[first_row[seen]]
    return Gathered(pooled * readable[:, None], frame_weights, seen, readable)


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
    """

    def __init__(
        self,
        scorer: str = "market",
        max_rank: int = 50,
        rerank: bool = False,
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
        rerank_candidates: int | None = None,
        rerank_on_validation: bool = False,
        figures: bool = True,
        figure_queries: int = 4,
    ) -> None:
        if scorer not in ("market", "challenge"):
            raise ValueError(f"evaluator.scorer must be 'market' or 'challenge', got {scorer!r}")
        self.scorer = scorer
        self.max_rank = max_rank
        self.rerank = rerank
        self.rerank_params = {"k1": k1, "k2": k2, "lambda_value": lambda_value, "approx_candidates": rerank_candidates}
        self.rerank_on_validation = rerank_on_validation
        self.figures = figures
        self.figure_queries = figure_queries
        self._outputs: list[dict] = []
        self._said_sanity = False
        self.last_results: dict = {}
        self.run_info: dict = {}

    # ------------------------------------------------------------------------------------ collection
    def _reset(self, *_args) -> None:
        self._outputs = []

    on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = _reset

    def _collect(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        index = outputs["index"].detach()
        # Until every producer sends them: one row per tracklet, every row readable.
        item = outputs.get("item", index)
        valid = outputs.get("valid")
        valid = torch.ones_like(index, dtype=torch.bool) if valid is None else valid
        self._outputs.append(
            {
                "features": outputs["features"].detach(),
                "weights": outputs["weights"].detach(),
                "index": index,
                "item": item.detach(),
                "valid": valid.detach().bool(),
            }
        )

    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _collect

    def _gathered(self, pl_module: L.LightningModule, num_items: int) -> Gathered:
        """Gather every rank's rows (a collective: call on every rank) and merge them per tracklet."""

        def cat(key: str) -> torch.Tensor:
            return gather_rows(pl_module, torch.cat([o[key] for o in self._outputs]))

        return merge_rows(cat("features"), cat("weights"), cat("index"), cat("item"), cat("valid"), num_items)

    @staticmethod
    def _limited(trainer: L.Trainer, stage: str) -> bool:
        """True when Lightning runs only part of the evaluation loader (fast_dev_run, limit_*_batches)."""
        limit = {"validate": trainer.limit_val_batches, "test": trainer.limit_test_batches}.get(
            stage, trainer.limit_predict_batches
        )
        return bool(trainer.fast_dev_run) or limit != 1.0

    def _checked(self, trainer: L.Trainer, eval_set: EvalSet, gathered: Gathered, stage: str) -> tuple[EvalSet, dict]:
        """The eval set restricted to scoreable tracklets, and what was left out (raises on real faults).

        Runs identically on every rank (the gathered features are the same everywhere), so a fault raises on all.
        """
        missing = (~gathered.seen).nonzero().flatten().tolist()
        if missing and not self._limited(trainer, stage):
            raise RuntimeError(
                f"evaluation saw {len(eval_set) - len(missing)} of {len(eval_set)} tracklets: {len(missing)} missing "
                f"({_names(eval_set, missing)})"
            )
        finite = torch.isfinite(gathered.features).all(dim=1)
        bad = (~finite & gathered.readable).nonzero().flatten().tolist()
        if bad:
            scored = int(gathered.readable.sum())
            culprit = (
                "every tracklet did: the checkpoint's weights are probably non-finite"
                if len(bad) == scored
                else f"tracklets {_names(eval_set, bad)}"
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

    # --------------------------------------------------------------------------------------- scoring
    def _distances(self, query: torch.Tensor, gallery: torch.Tensor, rerank: bool) -> tuple[np.ndarray, np.ndarray]:
        """(Q, G) distances (1 - cosine, or re-ranked) and rankings, computed on the features' device."""
        if not rerank:
            return ranked_distances(query, gallery)
        num_all = query.shape[0] + gallery.shape[0]
        chunk = min(4096, chunk_rows(query.device, num_all, floats_per_entry=2))
        distmat = re_ranking(query, gallery, **self.rerank_params, chunk_size=chunk)
        ranking = torch.argsort(distmat, dim=1, stable=True)
        return distmat.cpu().numpy(), ranking.cpu().numpy()

    def score(self, eval_set: EvalSet, feats: torch.Tensor, rerank: bool) -> dict:
        """Per-case results (``metrics`` dicts) plus the pooled ``overall``; with ``rerank`` also ``rerank``.

        Args:
            eval_set: tracklets and the (query, gallery) indices of each case.
            feats: (N, F) L2-normalised embeddings of every tracklet, on any device (scored there).
            rerank: score k-reciprocal re-ranked distances instead of cosine distances.
        """
        per_case, rankings = {}, {}
        tr = eval_set.tracklets
        for case, (q, g) in eval_set.cases.items():
            q_idx = torch.as_tensor(q, dtype=torch.long, device=feats.device)
            g_idx = torch.as_tensor(g, dtype=torch.long, device=feats.device)
            distmat, ranking = self._distances(feats[q_idx], feats[g_idx], rerank)
            rankings[case] = ranking
            if eval_set.anonymized:
                continue
            q_pids, g_pids = np.array([tr[i].pid for i in q]), np.array([tr[i].pid for i in g])
            if self.scorer == "market":
                q_cams, g_cams = np.array([tr[i].camid for i in q]), np.array([tr[i].camid for i in g])
                per_case[case] = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=self.max_rank)
            else:
                q_names, g_names = [tr[i].name for i in q], [tr[i].name for i in g]
                per_case[case] = evaluate_challenge(distmat, q_pids, g_pids, q_names, g_names, max_rank=self.max_rank)
        results = {"cases": per_case, "rankings": rankings}
        if per_case:
            results["overall"] = pool_results(list(per_case.values()), max_rank=self.max_rank)
        return results

    def _summary(self, results: dict, eval_set: EvalSet) -> dict:
        """JSON summary of one run: each case, the pooled ``overall`` and the per-case mean ``case_mean``."""
        summary = {}
        for case, result in results["cases"].items():
            summary[case] = {**summarize(result), "num_gallery": len(eval_set.cases[case][1])}
        num_gallery = sum(s["num_gallery"] for s in summary.values())
        summary["overall"] = {**summarize(results["overall"]), "num_gallery": num_gallery}
        summary["case_mean"] = summarize(case_mean(results["cases"]))
        return summary

    @staticmethod
    def _out_dir(trainer: L.Trainer) -> Path:
        """The run directory; call on every rank (``trainer.log_dir`` is a collective under DDP)."""
        return Path(trainer.log_dir or trainer.default_root_dir)

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
        out_dir = self._out_dir(trainer) if stage == "test" or full_set.anonymized else None
        gathered = self._gathered(pl_module, len(full_set))
        eval_set, notes = self._checked(trainer, full_set, gathered, stage)
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
        print(self._table(summaries, notes, title, len(full_set)))
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

    @staticmethod
    def _table(summaries: dict, notes: dict, title: str, num_tracklets: int) -> str:
        lines = [format_table(summaries, title=title)]
        unreadable = notes["unreadable"]
        if unreadable["count"]:
            lines.append(
                f"unreadable tracklets dropped from query and gallery: {unreadable['count']} "
                f"({', '.join(unreadable['tracklets'][:_NAMES_SHOWN])})"
            )
        if notes["not_evaluated"]:
            lines.append(
                f"partial evaluation (limited batches): {num_tracklets - notes['not_evaluated']} of "
                f"{num_tracklets} tracklets scored"
            )
        return "\n".join(lines)

    def _report_test(
        self, trainer, out_dir: Path, eval_set: EvalSet, weights: torch.Tensor, report: dict, feats=None
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        breakdown = metadata_breakdowns(eval_set, report["plain"][1]["cases"])
        if breakdown:
            self.last_results["breakdown"] = breakdown
        path = out_dir / "results.json"
        # run_info (set by the farreid CLI): the checkpoint tested, the git commit and the resolved config
        path.write_text(json.dumps({**self.last_results, "run": self.run_info}, indent=2))
        print(f"[farreid] results written to {path}")
        if self.figures:
            paths = write_figures(out_dir / "figures", eval_set, weights, report, self.figure_queries, feats)
            print(f"[farreid] figures written to {out_dir / 'figures'} ({len(paths)} files)")
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    for p in paths:
                        logger.log_image(key=f"figures/{p.stem}", images=[str(p)])

    @staticmethod
    def _write_submission(out_dir: Path, eval_set: EvalSet, rankings: dict, suffix: str = "") -> None:
        tr = eval_set.tracklets
        rows = {}
        for case, (q, g) in eval_set.cases.items():
            names_g = np.array([tr[i].name for i in g])
            rows[case] = ([tr[i].name for i in q], [list(names_g[r]) for r in rankings[case]])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"submission{suffix}.csv"
        write_submission(path, rows)
        print(f"[farreid] anonymized test set: challenge submission written to {path}")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._outputs:
            self._evaluate(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self._outputs:
            self._evaluate(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not self._outputs:
            return
        full_set: EvalSet = trainer.datamodule.eval_set("predict")
        out_dir = self._out_dir(trainer)
        gathered = self._gathered(pl_module, len(full_set))
        eval_set, notes = self._checked(trainer, full_set, gathered, "predict")
        if notes["unreadable"]["count"]:
            rank_zero_warn(
                f"[farreid] {notes['unreadable']['count']} unreadable tracklets left out of the submission: "
                f"{', '.join(notes['unreadable']['tracklets'][:_NAMES_SHOWN])}"
            )
        if trainer.is_global_zero:
            results = self.score(eval_set, gathered.features, rerank=self.rerank)
            self._write_submission(out_dir, eval_set, results["rankings"], "_rerank" if self.rerank else "")
