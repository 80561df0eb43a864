"""The geometry ablation: base vs geometry prompts vs geometry QK vs both, on the synthetic geometry preset.

Usage::

    python benchmarks/geometry.py [--root data/geometry] [--seeds 0 1 2] [--epochs 14] [--out runs/geometry.json]

The preset (``python -m farreid.data.synthetic ROOT --preset geometry``, generated under ``--root`` when missing)
distorts aerial appearance systematically with altitude, distance and pitch and holds four (altitude bin, distance
bin, pitch) cells out of training (:data:`farreid.data.synthetic.HELD_OUT_CELLS`); those appear only at test.

Each run is ``farreid fit`` then ``farreid test`` through the CLI (``configs/demo.yaml``: a tiny random CLIP trained
from scratch) with the ablation configs of ``configs/ablations/`` added; nothing else changes between variants of
a seed. Validation is off (no identities carved out of training) and the weights at the end of training are tested.
Prints per variant: pooled test mAP (plain ranking), mAP of aerial queries per altitude and distance bin and in the
held-out vs seen geometry cells, paired differences against ``base`` per seed, the added parameters and the time of
a training forward+backward pass on one fixed batch. ``--out`` keeps every figure as JSON. ``--cost`` only times
the four backbones in turns on one random batch (the fairer step-time comparison on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from farreid.cli import main
from farreid.data.synthetic import HELD_OUT_CELLS, geometry_cell
from farreid.data.transforms import normalize_clip
from farreid.evaluation.callback import ReIDEvaluator
from farreid.evaluation.queries import ALTITUDE_BINS, DISTANCE_BINS, bin_label, bin_order, query_rows
from farreid.module import clip_inputs

ABLATIONS = "configs/ablations"
VARIANTS = {
    "base": [],
    "prompts": ["geometry_prompts.yaml"],
    "qk": ["geometry_qk.yaml"],
    "both": ["geometry_prompts.yaml", "geometry_qk.yaml"],
}
# The preset's size (farreid choice: ~30-40 minutes for 4 variants x 3 seeds on the 2-core machine).
PRESET_ARGS = ["--num-train-ids", "80", "--num-test-ids", "30", "--max-frames", "10", "--preset", "geometry"]


def ensure_preset(root: Path) -> None:
    if (root / ".complete").exists():
        return
    command = [sys.executable, "-m", "farreid.data.synthetic", str(root), "--seed", "0", *PRESET_ARGS, "--overwrite"]
    subprocess.run(command, check=True)
    (root / ".complete").touch()


def breakdown(rows: list[dict]) -> dict:
    """Pooled mAP (%) of every query, and of the aerial queries per bin and held-out vs seen geometry cell."""
    scored = [r for r in rows if r["ap"] is not None]
    aerial = [r for r in scored if r["view"] == "aerial"]
    out = {"overall": 100 * float(np.mean([r["ap"] for r in scored])), "queries": len(scored)}
    for case in ("A2G", "G2A", "A2A"):
        out[case] = 100 * float(np.mean([r["ap"] for r in scored if r["case"] == case]))
    for key, edges in (("altitude", ALTITUDE_BINS), ("distance", DISTANCE_BINS)):
        groups: dict[str, list[float]] = {}
        for r in aerial:
            groups.setdefault(bin_label(r[key], edges), []).append(r["ap"])
        out[key] = {
            b: [100 * float(np.mean(v)), len(v)] for b, v in sorted(groups.items(), key=lambda g: bin_order(g[0]))
        }
    held = [geometry_cell(r["altitude"], r["distance"], int(r["pitch"])) in HELD_OUT_CELLS for r in aerial]
    for name, keep in (("held_out", True), ("seen", False)):
        aps = [r["ap"] for r, h in zip(aerial, held, strict=True) if h == keep]
        out[name] = [100 * float(np.mean(aps)) if aps else float("nan"), len(aps)]
    return out


def step_seconds(module: torch.nn.Module, batch: dict, repeats: int = 5) -> float:
    """Median seconds of a forward+backward pass of the backbone and pooling on one training batch."""
    module.train()
    frames, *rest = clip_inputs(batch)
    args = (normalize_clip(frames), *rest)  # uint8 clips -> normalised floats, as the training step sees them
    times = []
    for _ in range(repeats + 1):  # the first pass is a warm-up
        start = time.perf_counter()
        out = module(*args)
        (out["cls"].sum() + out["proj"].sum()).backward()
        times.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    return float(np.median(times[1:]))


def cost(rounds: int = 10, threads: int = 1) -> str:
    """Parameters and forward+backward time of the four backbones of ``configs/demo.yaml`` on one random batch
    (32 clips of 4 frames, 64x32), timed in turns within each round so that a shared machine's load falls on all."""
    import yaml

    from farreid.models.backbone import CLIPVisionBackbone

    torch.set_num_threads(threads)
    base = yaml.safe_load(Path("configs/demo.yaml").read_text())["model"]["backbone"]["init_args"]
    models = {}
    for name, files in VARIANTS.items():
        kw = dict(base)
        for f in files:
            kw.update(yaml.safe_load(Path(ABLATIONS, f).read_text())["model"]["backbone"]["init_args"])
        torch.manual_seed(0)
        models[name] = CLIPVisionBackbone(**kw).train()
    frames, camids = torch.randn(32, 4, 3, 64, 32), torch.randint(0, 3, (32,))
    geometry, known = torch.rand(32, 3), camids.ne(0).unsqueeze(1).expand(32, 3)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds + 1):  # round 0 is a warm-up
        for name, model in models.items():
            start = time.perf_counter()
            model.forward_features(frames, camids, geometry, known).cls.sum().backward()
            model.zero_grad(set_to_none=True)
            if r:
                times[name].append(time.perf_counter() - start)
    lines = [
        "| variant | parameters | added | forward+backward s (median) | vs base |",
        "| --- | --- | --- | --- | --- |",
    ]
    count = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    for name in models:
        median = np.median(times[name])
        added = count[name] - count["base"]
        lines.append(
            f"| {name} | {count[name]:,} | {added:,} | {median:.3f} | {median / np.median(times['base']):.2f}x |"
        )
    return "\n".join(lines)


def run(root: Path, variant: str, seed: int, epochs: int, extra: list[str]) -> dict:
    """Fit and test one variant; returns its figures."""
    configs = [a for name in VARIANTS[variant] for a in ("--config", f"{ABLATIONS}/{name}")]
    with tempfile.TemporaryDirectory() as out:
        common = ["--config", "configs/demo.yaml", *configs, "--data.root", str(root), "--seed_everything", str(seed)]
        common += ["--trainer.default_root_dir", out, "--trainer.logger", "false", "--trainer.max_epochs", str(epochs)]
        common += ["--evaluator.figures", "false", "--evaluator.report", "false", "--evaluator.rerank", "false"]
        common += [
            "--trainer.enable_progress_bar",
            "false",
            "--data.val_share",
            "0",
            "--trainer.limit_val_batches",
            "0",
        ]
        start = time.perf_counter()
        fit = main(["fit", *common, *extra, "--trainer.callbacks", "null", "--trainer.enable_checkpointing", "false"])
        fit_seconds = time.perf_counter() - start
        evaluator = next(cb for cb in fit.trainer.callbacks if isinstance(cb, ReIDEvaluator))
        captured = {}
        score = evaluator.score

        def capture(eval_set, feats, rerank):
            results = score(eval_set, feats, rerank)
            captured.update(eval_set=eval_set, results=results)
            return results

        evaluator.score = capture
        fit.trainer.test(fit.model, datamodule=fit.datamodule)
        figures = breakdown(query_rows(captured["eval_set"], captured["results"]))
        batch = next(iter(fit.datamodule.train_dataloader()))
        figures["step_s"] = step_seconds(fit.model, batch)
        figures["fit_s"] = fit_seconds
        figures["steps"] = int(fit.trainer.global_step)
        figures["geometry_params"] = sum(p.numel() for n, p in fit.model.named_parameters() if "geometry" in n)
        figures["params"] = sum(p.numel() for p in fit.model.parameters() if p.requires_grad)
    return figures


def report(table: dict[str, list[dict]], seeds: list[int]) -> str:
    lines = [f"seeds {seeds}; mAP % (plain ranking), mean over seeds; aerial queries for the bins"]
    bins = {key: sorted({b for rs in table.values() for r in rs for b in r[key]}, key=bin_order) for key in
            ("altitude", "distance")}  # fmt: skip
    head = ["variant", "overall", "A2G", "G2A", "A2A", "held-out", "seen"]
    head += [f"alt {b}" for b in bins["altitude"]] + [f"dist {b}" for b in bins["distance"]]
    head += ["+params", "step s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + " --- |" * len(head))
    for name, rs in table.items():
        cells = [name] + [f"{np.mean([r[c] for r in rs]):.2f}" for c in ("overall", "A2G", "G2A", "A2A")]
        cells += [f"{np.mean([r[c][0] for r in rs]):.2f}" for c in ("held_out", "seen")]
        for key in ("altitude", "distance"):
            cells += [f"{np.mean([r[key][b][0] for r in rs if b in r[key]]):.2f}" for b in bins[key]]
        cells += [f"{rs[0]['geometry_params']:,}", f"{np.median([r['step_s'] for r in rs]):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\npaired differences against base (points; per seed, then mean):")
    for name, rs in table.items():
        if name == "base":
            continue
        for key, pick in (("overall", lambda r: r["overall"]), ("held-out", lambda r: r["held_out"][0])):
            diffs = [pick(r) - pick(b) for r, b in zip(rs, table["base"], strict=True)]
            per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
            lines.append(f"  {name:8s} {key:9s} {per_seed}  mean {np.mean(diffs):+.2f}")
    counts = table["base"][0]
    lines.append(f"\nqueries scored: {counts['queries']}, held-out aerial: {counts['held_out'][1]}, "
                 f"seen aerial: {counts['seen'][1]}; steps per run: {counts['steps']}")  # fmt: skip
    return "\n".join(lines)


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/geometry"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    parser.add_argument("--cost", action="store_true", help="only the parameter and step-time cost (no training)")
    args, extra = parser.parse_known_args()
    if args.cost:
        print(cost())
        return
    ensure_preset(args.root)
    table: dict[str, list[dict]] = {name: [] for name in args.variants}
    for s, seed in enumerate(args.seeds):
        order = args.variants[s % len(args.variants) :] + args.variants[: s % len(args.variants)]
        for name in order:  # the order rotates per seed, so a slower stretch of a shared machine is spread out
            table[name].append(run(args.root, name, seed, args.epochs, extra))
            print(f"[geometry] seed {seed} {name}: overall {table[name][-1]['overall']:.2f}", flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"seeds": args.seeds, "table": table}, indent=1))
    print(report(table, args.seeds) if "base" in table else json.dumps(table, indent=1))


if __name__ == "__main__":
    main_cli()
