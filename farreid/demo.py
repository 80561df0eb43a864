"""The newcomer's demo: score the untrained model, fit, score the trained one, print both.

    python -m farreid.demo --config configs/demo.yaml      (what `make demo` runs)

Every step goes through the real ``farreid`` CLI (``main(args=[...])``), so the demo exercises exactly what a
researcher runs on the real data.
"""

from __future__ import annotations

import argparse
import time

from farreid.cli import main
from farreid.evaluation.reporting import format_table
from farreid.runs import last_checkpoint


def run_demo(config: str, extra: list[str] | None = None) -> dict[str, dict]:
    """Test the untrained model, fit, test the best checkpoint; return both result summaries."""
    extra = list(extra or [])
    start = time.perf_counter()
    untrained = main(["test", "--config", config, *extra]).trainer.callbacks
    untrained_results = _evaluator(untrained).last_results
    fit = main(["fit", "--config", config, *extra])
    best = fit.trainer.checkpoint_callback.best_model_path or str(last_checkpoint(fit.trainer))
    tested = main(["test", "--config", config, *extra, "--ckpt_path", best])
    trained_results = _evaluator(tested.trainer.callbacks).last_results
    minutes = (time.perf_counter() - start) / 60
    print()
    print(format_table({"untrained": _plain(untrained_results), "trained": _plain(trained_results)}, "demo"))
    if "rerank" in trained_results:
        print(format_table({"trained+rr": trained_results["rerank"]}, ""))
    print(
        f"\n[farreid] demo: overall mAP {100 * untrained_results['overall']['mAP']:.2f} untrained -> "
        f"{100 * trained_results['overall']['mAP']:.2f} trained (best checkpoint {best}); {minutes:.1f} min in all"
    )
    return {"untrained": untrained_results, "trained": trained_results}


def _evaluator(callbacks):
    from farreid.evaluation.callback import ReIDEvaluator

    return next(cb for cb in callbacks if isinstance(cb, ReIDEvaluator))


def _plain(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "rerank"}


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    args, extra = parser.parse_known_args(argv)
    run_demo(args.config, extra)


if __name__ == "__main__":
    cli()
