"""The ``farreid`` command: a LightningCLI with the ReID module, the DetReIDX datamodule and the evaluator.

farreid fit --config configs/vitl14.yaml --model.backbone.init_args.pretrained /path/to/clip-vit-large-patch14
farreid test --config configs/vitl14.yaml --ckpt_path runs/vitl14/.../best.ckpt
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from farreid.data.datamodule import DetReIDXDataModule
from farreid.evaluation.callback import ReIDEvaluator
from farreid.module import ReIDModule


def configure_wandb_mode(environ: os._Environ | dict = os.environ) -> str:
    """Make W&B offline unless credentials are configured, so that no run ever waits for a login prompt.

    Respects an explicit ``WANDB_MODE``; otherwise online only with ``WANDB_API_KEY`` or a netrc entry for the
    W&B host. Returns the mode in force.
    """
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    netrc = Path(environ.get("NETRC", Path.home() / ".netrc"))
    has_netrc = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    mode = "online" if environ.get("WANDB_API_KEY") or has_netrc else "offline"
    environ["WANDB_MODE"] = mode
    environ.setdefault("WANDB_SILENT", "true")
    return mode


class LoggedConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory and also logs the resolved config to every logger (W&B)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        for logger in trainer.loggers:
            import yaml

            logger.log_hyperparams({"config": yaml.safe_load(config)})


class FarReIDCLI(LightningCLI):
    """LightningCLI with farreid's links: the classifier width comes from the data, the evaluator is always on."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ReIDEvaluator, "evaluator")


def main(args: list[str] | None = None, run: bool = True) -> FarReIDCLI:
    """Entry point of the ``farreid`` console script (``args`` for tests, as in ``main(args=[...])``)."""
    configure_wandb_mode()
    return FarReIDCLI(
        ReIDModule,
        DetReIDXDataModule,
        args=args,
        run=run,
        save_config_callback=LoggedConfigCallback,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False},
        parser_kwargs={"description": "farreid: extreme far-distance aerial-ground video person ReID"},
    )


if __name__ == "__main__":
    main()
