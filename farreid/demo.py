"""The newcomer's demo: score the untrained model, fit, score the trained one, print both, compare them per query.

    python -m farreid.demo --config configs/demo.yaml      (what `make demo` runs)

Every step goes through the real ``farreid`` CLI (``main(args=[...])``), so the demo exercises exactly what a
researcher runs on the real data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from farreid.cli import main
from farreid.evaluation.reporting import format_table
from farreid.runs import last_checkpoint
from farreid.tools.compare import main as compare_main


def run_demo(config: str, extra: list[str] | None = None) -> dict[str, dict]:
    """Test the untrained model, fit, test the best checkpoint; return both result summaries."""
    extra = list(extra or [])
    start = time.perf_counter()
    untrained_cli = main(["test", "--config", config, *extra])
    untrained_results = _evaluator(untrained_cli.trainer.callbacks).last_results
    fit = main(["fit", "--config", config, *extra])
    best = fit.trainer.checkpoint_callback.best_model_path or str(last_checkpoint(fit.trainer))
    tested = main(["test", "--config", config, *extra, "--ckpt_path", best])
    trained_results = _evaluator(tested.trainer.callbacks).last_results
    runs = [Path(c.trainer.log_dir or c.trainer.default_root_dir) for c in (untrained_cli, tested)]
    report = runs[1] / "report.html"
    minutes = (time.perf_counter() - start) / 60
    print()
    print(format_table({"untrained": _plain(untrained_results), "trained": _plain(trained_results)}, "demo"))
    if "rerank" in trained_results:
        print(format_table({"trained+rr": trained_results["rerank"]}, ""))
    print(
        f"\n[farreid] demo: overall mAP {100 * untrained_results['overall']['mAP']:.2f} untrained -> "
        f"{100 * trained_results['overall']['mAP']:.2f} trained (best checkpoint {best}); {minutes:.1f} min in all"
    )
    if report.is_file():  # what training changed, query by query (`farreid compare`)
        print("\n[farreid] farreid compare UNTRAINED TRAINED:")
        compare_main([str(runs[0]), str(runs[1]), "--out", str(runs[1].parent / "compare-untrained-trained")])
        print(f"[farreid] every test query, worst first, with its frames and top-10: {report.resolve().as_uri()}")
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
