"""Temporal attention pooling vs mean pooling on the demo data: the same recipe trained twice, one switch apart.

Usage: ``python benchmarks/pooling.py [--config configs/demo.yaml] [--seeds 0 1] [extra farreid args]``.

Each run is a full ``farreid fit`` + ``farreid test`` through the CLI (``configs/demo.yaml`` unless told
otherwise) with ``model.pooling`` set to ``TemporalAttentionPooling`` or ``MeanPooling``; nothing else
changes. The demo tracklets carry degraded frames (motion blur, occlusion, near-empty crops), which attention
pooling can learn to down-weight. Prints test mAP / Rank-1 per case and pooled, per seed and averaged.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from farreid.cli import main
from farreid.evaluation.callback import ReIDEvaluator

POOLINGS = {
    "attention": "farreid.models.pooling.TemporalAttentionPooling",
    "mean": "farreid.models.pooling.MeanPooling",
}
CASES = ("A2G", "G2A", "A2A", "overall")


def run(config: str, pooling: str, seed: int, extra: list[str]) -> dict:
    """Fit and test one variant; returns the plain (not re-ranked) test summary."""
    with tempfile.TemporaryDirectory() as out:
        common = [
            "--config",
            config,
            "--model.pooling",
            POOLINGS[pooling],
            "--seed_everything",
            str(seed),
            "--trainer.default_root_dir",
            out,
            "--trainer.logger",
            "false",
            "--evaluator.figures",
            "false",
            "--evaluator.rerank",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
        fit = main(["fit", *common, "--trainer.callbacks", "null", "--trainer.enable_checkpointing", "false"])
        fit.trainer.test(fit.model, datamodule=fit.datamodule)  # the weights at the end of training
        evaluator = next(cb for cb in fit.trainer.callbacks if isinstance(cb, ReIDEvaluator))
        return evaluator.last_results


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args, extra = parser.parse_known_args()
    table: dict[str, list[dict]] = {name: [] for name in POOLINGS}
    for seed in args.seeds:
        for name in POOLINGS:
            table[name].append(run(args.config, name, seed, extra))
    print(f"\ntest mAP / Rank-1 (%) on {args.config}, seeds {args.seeds}, plain ranking")
    print(f"{'pooling':<10}" + "".join(f"{case:>16}" for case in CASES))
    for name, results in table.items():
        cells = []
        for case in CASES:
            m = np.mean([100 * r[case]["mAP"] for r in results])
            r1 = np.mean([100 * r[case]["rank1"] for r in results])
            cells.append(f"{m:7.2f} / {r1:6.2f}")
        print(f"{name:<10}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main_cli()
