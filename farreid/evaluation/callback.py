"""Lightning glue of the evaluation: gather features from every rank, score each case, log, report.

The scoring itself lives in plain functions (``metrics``, ``reranking``, ``search``, ``submission``, ``plots``);
this callback only collects the module's per-batch outputs, removes the distributed sampler's repeats, and
hands whole feature matrices to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from farreid.data.protocols import EvalSet
from farreid.evaluation.metrics import case_mean, evaluate_challenge, evaluate_rank, pool_results, summarize
from farreid.evaluation.reporting import format_table, metadata_breakdowns, write_figures
from farreid.evaluation.reranking import re_ranking
from farreid.evaluation.search import topk
from farreid.evaluation.submission import write_submission

METRICS = ("mAP", "mINP", "rank1", "rank5", "rank10")


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


def distance_matrix(query: torch.Tensor, gallery: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distances of L2-normalised features via an exact search over the whole gallery.

    Returns:
        (distmat (Q, G) float32, ranking (Q, G) gallery indices best first).
    """
    scores, order = topk(query, gallery, k=gallery.shape[0], metric="ip")
    distmat = np.empty(order.shape, dtype=np.float32)
    np.put_along_axis(distmat, order.cpu().numpy(), 1.0 - scores.cpu().numpy(), axis=1)
    return distmat, order.cpu().numpy()


class ReIDEvaluator(Callback):
    """Scores A2G, G2A and A2A after every validation/test epoch and writes the challenge CSV on ``predict``.

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
        self.last_results: dict = {}

    # ------------------------------------------------------------------------------------ collection
    def _reset(self, *_args) -> None:
        self._outputs = []

    on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = _reset

    def _collect(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._outputs.append({k: outputs[k].detach() for k in ("features", "weights", "index")})

    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _collect

    def _gathered(self, pl_module: L.LightningModule, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and frame weights of every tracklet in dataset order, repeats removed: ((N, F), (N, T))."""
        feats = gather_rows(pl_module, torch.cat([o["features"] for o in self._outputs]))
        weights = gather_rows(pl_module, torch.cat([o["weights"] for o in self._outputs]))
        index = gather_rows(pl_module, torch.cat([o["index"] for o in self._outputs])).long()
        first = torch.full((num_items,), -1, dtype=torch.long, device=index.device)
        positions = torch.arange(len(index), device=index.device)
        first.scatter_reduce_(0, index, positions, reduce="amin", include_self=False)
        if (first < 0).any():
            missing = int((first < 0).sum())
            raise RuntimeError(f"evaluation saw {num_items - missing} of {num_items} tracklets: {missing} missing")
        return feats[first].float().cpu(), weights[first].float().cpu()

    # --------------------------------------------------------------------------------------- scoring
    def score(self, eval_set: EvalSet, feats: torch.Tensor, rerank: bool) -> dict:
        """Per-case results (``metrics`` dicts) plus the pooled ``overall``; with ``rerank`` also ``rerank``."""
        per_case, rankings = {}, {}
        tr = eval_set.tracklets
        for case, (q, g) in eval_set.cases.items():
            if rerank:
                distmat = re_ranking(feats[q], feats[g], **self.rerank_params).cpu().numpy()
                ranking = np.argsort(distmat, axis=1, kind="stable")
            else:
                distmat, ranking = distance_matrix(feats[q], feats[g])
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

    def _log(self, pl_module: L.LightningModule, prefix: str, results: dict, eval_set: EvalSet) -> dict:
        """Log ``<prefix>/<case>/<metric>`` (cases, pooled ``overall``, ``case_mean``); return the JSON summary."""
        summary = {}
        for case, result in results["cases"].items():
            summary[case] = {**summarize(result), "num_gallery": len(eval_set.cases[case][1])}
        num_gallery = sum(s["num_gallery"] for s in summary.values())
        summary["overall"] = {**summarize(results["overall"]), "num_gallery": num_gallery}
        summary["case_mean"] = summarize(case_mean(results["cases"]))
        for group, values in summary.items():
            for metric in METRICS:
                pl_module.log(f"{prefix}/{group}/{metric}", float(values[metric]), sync_dist=False)
        return summary

    @staticmethod
    def _out_dir(trainer: L.Trainer) -> Path:
        """The run directory; call on every rank (``trainer.log_dir`` is a collective under DDP)."""
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        eval_set: EvalSet = trainer.datamodule.eval_set(stage)
        out_dir = self._out_dir(trainer) if stage == "test" or eval_set.anonymized else None
        feats, weights = self._gathered(pl_module, len(eval_set))
        prefix = "val" if stage == "validate" else "test"
        report: dict = {}
        runs = [("plain", False)]
        if self.rerank and (stage == "test" or self.rerank_on_validation):
            runs.append(("rerank", True))
        for name, use_rr in runs:
            results = self.score(eval_set, feats, rerank=use_rr)
            if eval_set.anonymized:
                self._write_submission(trainer, out_dir, eval_set, results["rankings"], "_rerank" if use_rr else "")
                continue
            key = prefix if name == "plain" else f"{prefix}/rerank"
            report[name] = (self._log(pl_module, key, results, eval_set), results)
        if not report:
            return
        summary = report["plain"][0]
        if "rerank" in report:
            summary["rerank"] = report["rerank"][0]
        self.last_results = summary
        if stage == "test" and trainer.is_global_zero:
            self._report_test(trainer, out_dir, eval_set, weights, report)
        elif trainer.is_global_zero and not trainer.sanity_checking:
            during_fit = trainer.state.fn == "fit"
            title = f"{prefix} (epoch {trainer.current_epoch})" if during_fit else f"{prefix} (checkpoint)"
            rank_zero_info(format_table({k: v[0] for k, v in report.items()}, title=title))

    def _report_test(self, trainer, out_dir: Path, eval_set: EvalSet, weights: torch.Tensor, report: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        breakdown = metadata_breakdowns(eval_set, report["plain"][1]["cases"])
        if breakdown:
            self.last_results["breakdown"] = breakdown
        path = out_dir / "results.json"
        path.write_text(json.dumps(self.last_results, indent=2))
        print(format_table({k: v[0] for k, v in report.items()}, title="test"))
        print(f"[farreid] results written to {path}")
        if self.figures:
            paths = write_figures(out_dir / "figures", eval_set, weights, report, self.figure_queries)
            print(f"[farreid] figures written to {out_dir / 'figures'} ({len(paths)} files)")
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    for p in paths:
                        logger.log_image(key=f"figures/{p.stem}", images=[str(p)])

    def _write_submission(self, trainer, out_dir: Path, eval_set: EvalSet, rankings: dict, suffix: str = "") -> None:
        if not trainer.is_global_zero:
            return
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
        eval_set: EvalSet = trainer.datamodule.eval_set("predict")
        feats, _ = self._gathered(pl_module, len(eval_set))
        out_dir = self._out_dir(trainer)
        results = self.score(eval_set, feats, rerank=self.rerank)
        self._write_submission(trainer, out_dir, eval_set, results["rankings"], "_rerank" if self.rerank else "")
