"""``farreid preflight``: a few real training steps of a fit, before the GPU hour is spent.

    farreid preflight --config configs/vitl14.yaml [any fit option ...] [--steps 10] [--random-weights]

Builds the model, datamodule, precision and strategy exactly as ``farreid fit`` does (the same CLI, the same
config), runs ``--warmup`` + ``--steps`` real training steps on the configured device through Lightning's fit loop,
then times the configured DataLoader alone over as many batches and one evaluation batch, and reports (a table on
the terminal, ``preflight.json`` in ``<run>/preflight-<time>/``): parameter counts per group, the peak memory and
the device's capacity, the median step time, model and loader frames/s and which one bounds a step, steps per epoch
(the number ``fit`` runs), projected epoch, run and evaluation times, and a verdict. Exit status: 0 fits, 3 out of
memory (with the setting to change first), 1 any other error, 2 a usage error.

``--random-weights`` builds the configured architecture with random weights (same shapes, same cost): the CLIP
directory's ``config.json`` when it exists, else ``--architecture`` (the published ViT-L/14 or ViT-B/16 shapes),
and stands in random context vectors for missing stage-1 text prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from farreid._quiet import quiet_known_messages
from farreid.cli import FarReIDCLI, cli_kwargs, config_value, guarded
from farreid.models import clip_dir
from farreid.paths import CLIP_ENV, from_env
from farreid.run_info import configure_wandb_mode
from farreid.tools import preflight_measure as measure

OUT_OF_MEMORY = 3


class PreflightCLI(FarReIDCLI):
    """The fit CLI, shortened to a measured run: no checkpoints, no validation loop, no logger."""

    run_kind = "preflight"
    options: argparse.Namespace  # set by `run` before the CLI is built
    probe: measure.StepProbe

    def before_instantiate_classes(self) -> None:
        cfg = self.config["fit"]
        if self.options.random_weights:
            _random_weights(cfg, self.options.architecture)
        super().before_instantiate_classes()
        self.run_dir = self.probe.run_dir = Path(cfg.trainer.default_root_dir)
        trainer = cfg.trainer
        self.probe.planned = {
            "max_epochs": trainer.max_epochs,
            "max_steps": trainer.max_steps,
            "precision": trainer.precision,
            "checkpoint_blocks": config_value(cfg, "model.backbone.init_args.checkpoint_blocks"),
            **{key: config_value(cfg, f"data.{key}") for key in ("p", "k", "num_frames", "image_size")},
        }
        trainer.max_steps = self.options.warmup + self.options.steps
        trainer.limit_val_batches, trainer.num_sanity_val_steps = 0, 0
        trainer.logger, trainer.enable_checkpointing, trainer.enable_model_summary = False, False, False
        keep = ("ModelCheckpoint", "LearningRateMonitor", "EarlyStopping")
        trainer.callbacks = [
            c for c in trainer.callbacks or [] if not str(config_value(c, "class_path")).endswith(keep)
        ]

    def before_fit(self) -> None:
        from farreid.evaluation.callback import ReIDEvaluator
        from farreid.runs import RunCheckpoint

        trainer = self.trainer
        trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, RunCheckpoint | ReIDEvaluator)]
        trainer.callbacks.append(self.probe)
        if self.options.random_weights and self.model.text is not None and self.model.hparams.stage == 2:
            path = self.run_dir / "random_text_prompts.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"context": torch.randn_like(self.model.text.context) * 0.02}, path)
            self.model.hparams.text_prompts = str(path)

    def after_fit(self) -> None:
        self.probe.after_steps(self.trainer, self.model, self.datamodule, self.options.steps)


def _random_weights(cfg, architecture: str) -> None:
    """Replace each tower's pretrained directory by its architecture's config (random weights, same shapes)."""
    for key, tower in (("model.backbone.init_args", "vision"), ("model.text.init_args", "text")):
        args = config_value(cfg, key)
        if args is None or args.get("config") is not None:
            continue
        directory = from_env(args.get("pretrained"), CLIP_ENV)
        config = architecture_of(directory, tower) or clip_dir.ARCHITECTURES[architecture][tower]
        args.pretrained, args.config = None, dict(config)


def architecture_of(directory: str | None, tower: str) -> dict | None:
    """The tower's config keys from a CLIP directory's ``config.json`` (weights not needed), or None."""
    if not directory or not (Path(directory) / "config.json").is_file():
        return None
    config = clip_dir.tower_config(Path(directory), tower).to_dict()
    keys = clip_dir.ARCHITECTURES["vit-l-14"][tower]
    return {key: config[key] for key in keys if key in config}


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="farreid preflight",
        description="A few real training steps of `farreid fit` with the same config: memory, speed, projected times. "
        "Every other option is a fit option (--config, --data.root, --trainer.*, --model.*).",
    )
    parser.add_argument("--steps", type=int, default=10, help="measured training steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and not measured (default 2)")
    parser.add_argument("--random-weights", action="store_true", help="random weights of the configured shapes")
    parser.add_argument(
        "--architecture",
        choices=sorted(clip_dir.ARCHITECTURES),
        default="vit-l-14",
        help="shapes for --random-weights when no CLIP directory with a config.json is given (default vit-l-14)",
    )
    options, rest = parser.parse_known_args(list(argv))
    if options.steps < 1:
        parser.error(f"--steps must be a positive number of training steps, got {options.steps}")
    if options.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {options.warmup}")
    return options, rest


def run(argv: Sequence[str]) -> dict:
    """Run the preflight; returns the report (also written to ``preflight.json``). Raises on a non-memory error."""
    options, rest = _parse(argv)
    probe = measure.StepProbe(warmup=options.warmup)
    cli_class = type("Preflight", (PreflightCLI,), {"options": options, "probe": probe})
    configure_wandb_mode()
    quiet_known_messages()
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended", category=UserWarning)
    # The shortened fit is shorter than any warm-up; the real run's length is what the report projects.
    warnings.filterwarnings("ignore", message=r"warm-up of .* LR never peaks", category=UserWarning)
    try:
        cli_class(args=["fit", *rest], **cli_kwargs())
    except Exception as err:  # noqa: BLE001 - an out-of-memory stop is a result, anything else propagates
        if not measure.is_out_of_memory(err) or probe.run_dir is None:
            raise
        probe.out_of_memory(err)
    report = probe.report()
    print(measure.table(report))
    path = Path(probe.run_dir) / "preflight.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"[farreid] preflight report written to {path}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    outcome: dict = {}
    status = guarded(lambda: outcome.update(run(argv)))
    if status == 0 and outcome.get("verdict") == "out_of_memory":
        return OUT_OF_MEMORY
    return status


if __name__ == "__main__":
    sys.exit(main())
