"""The ``farreid`` command: a LightningCLI with the ReID module, the DetReIDX datamodule and the evaluator.

farreid fit --config configs/vitl14.yaml                        (FARREID_DATA, FARREID_CLIP or --data.root ...)
farreid test --config configs/vitl14.yaml --ckpt_path last      (the newest state of that run)

What the CLI adds to Lightning's (see ``farreid.runs`` for the run layout):
- exit status 0 on success and non-zero on any failure, with the error in one line (``FARREID_DEBUG=1`` shows
  the traceback);
- path precedence: command line > ``FARREID_DATA``/``FARREID_CLIP`` > YAML, shown by ``--print_config``;
- one directory per run, one stable checkpoint directory per run name, ``--ckpt_path last`` resolved there
  (an error for test/predict when there is none), a lock against two fits in one run directory;
- stage 1 writes into ``ROOT/stage1`` and stage 2 reads its prompts from there;
- test/predict size the (unused) classifier from the checkpoint, so they need no ``train/`` folder.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from farreid._quiet import default_progress_bar, quiet_known_messages
from farreid.data.datamodule import DetReIDXDataModule
from farreid.data.datasets import dataset_provenance
from farreid.evaluation.callback import ReIDEvaluator
from farreid.module import ReIDModule
from farreid.paths import PATH_KEYS
from farreid.run_info import LoggedConfigCallback, configure_wandb_mode, git_commit
from farreid.runs import (
    LAST,
    AtomicCheckpointIO,
    Preempted,
    RunCheckpoint,
    RunLock,
    RunLockCallback,
    is_launcher_process,
    new_run_dir,
    route_checkpoints,
    route_loggers,
)
from farreid.trainer import FarReIDTrainer


def _given_on_command_line(args: list[str], key: str) -> bool:
    return any(a == f"--{key}" or a.startswith(f"--{key}=") for a in args)


def config_value(cfg: Namespace, key: str):
    try:
        return cfg[key]
    except (KeyError, TypeError):
        return None


class FarReIDCLI(LightningCLI):
    """LightningCLI with farreid's links, run directories, path precedence and the always-on evaluator."""

    run_kind: str | None = None  # the run directory's name when it is not the subcommand's (``farreid preflight``)

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)  # model.optimizer is the only optimizer
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ReIDEvaluator, "evaluator")
        parser.add_lightning_class_args(RunCheckpoint, "checkpointing")

    # ------------------------------------------------------------------------------------- parsing
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict | Namespace) else None
        self._argv = argv or []
        printing = argv is not None and any(a.startswith("--print_config") for a in argv)
        if not printing:
            super().parse_arguments(parser, args)
            self._resolve_paths(self.config)
            return
        # --print_config shows the paths the environment fills in, so it is parsed here, not by jsonargparse.
        super().parse_arguments(parser, [a for a in argv if not a.startswith("--print_config")])
        self._resolve_paths(self.config, announce=False)
        import yaml

        subcommand = self.config["subcommand"]
        dumped = yaml.safe_load(parser.dump(self.config, skip_none=False))
        print(yaml.safe_dump(dumped[subcommand], sort_keys=False), end="")
        raise SystemExit(0)

    def _resolve_paths(self, config: Namespace, announce: bool = True) -> None:
        """Command line > environment > YAML for the machine paths (``PATH_KEYS``)."""
        subcommand = config.get("subcommand")
        if not subcommand:
            return
        cfg = config[subcommand]
        for key, env in PATH_KEYS.items():
            value, from_env = config_value(cfg, key), os.environ.get(env)
            if not from_env or _given_on_command_line(self._argv, key) or value == from_env:
                continue
            parent = key.rsplit(".", 1)[0]
            if parent != "data" and config_value(cfg, parent) is None:
                continue  # e.g. model.text is null: nothing to fill
            if key != "data.root" and value is None and config_value(cfg, parent + ".config") is not None:
                continue  # a random tower built from a config dict, not a pretrained directory
            cfg[key] = from_env
            if announce and value is not None and is_launcher_process():
                print(f"[farreid] {key} = {from_env} (from {env}, which overrides the config's {value})")

    # ------------------------------------------------------------------------------ run directories
    def before_instantiate_classes(self) -> None:
        subcommand = self.subcommand
        if subcommand is None:
            return
        cfg = self.config[subcommand]
        base = Path(cfg.trainer.default_root_dir or "runs/farreid").absolute()
        stage1 = config_value(cfg, "model.stage") == 1
        root = base / "stage1" if stage1 else base
        if config_value(cfg, "model.text") is not None and not config_value(cfg, "model.text_prompts"):
            cfg.model.text_prompts = str(base / "stage1" / "text_prompts.pt")
        ckpt_dir = root / "checkpoints"
        self._resolve_ckpt_path(cfg, subcommand, ckpt_dir)
        if subcommand in ("test", "predict"):
            self._classifier_from_checkpoint(cfg)
        if subcommand in ("validate", "test") and not _given_on_command_line(self._argv, "verbose"):
            cfg.verbose = False  # the evaluator prints farreid's table; no second Lightning one
        self._lock_dir = root if subcommand == "fit" and self.run_kind is None and is_launcher_process() else None
        run_dir = new_run_dir(root, self.run_kind or subcommand)
        cfg.trainer.default_root_dir = str(run_dir)
        cfg.checkpointing.dirpath = str(ckpt_dir)
        route_loggers(cfg, run_dir)
        route_checkpoints(cfg, ckpt_dir)
        if is_launcher_process():
            print(f"[farreid] {subcommand}: run directory {run_dir}; checkpoints in {ckpt_dir}")

    def _resolve_ckpt_path(self, cfg: Namespace, subcommand: str, ckpt_dir: Path) -> None:
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            path = ckpt_dir / LAST
            if path.is_file():
                cfg.ckpt_path = str(path)
            elif subcommand == "fit":
                cfg.ckpt_path = None
                if is_launcher_process():
                    print(f"[farreid] --ckpt_path last: no {path} yet, starting a new run")
            else:
                raise FileNotFoundError(
                    f"--ckpt_path last: no checkpoint at {path}; fit this run first or pass --ckpt_path PATH"
                )
        elif ckpt and not Path(ckpt).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt}: no such checkpoint file")
        elif not ckpt and subcommand in ("test", "predict") and is_launcher_process():
            print(f"[farreid] {subcommand} without --ckpt_path: scoring the untrained model")

    def _classifier_from_checkpoint(self, cfg: Namespace) -> None:
        """Retrieval never uses the classifier: take its width from the checkpoint, or 1 without train/."""
        if cfg.data.get("classifier_size"):
            return
        if cfg.get("ckpt_path"):
            hparams = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True, mmap=True).get(
                "hyper_parameters", {}
            )
            if hparams.get("num_classes"):
                cfg.data.classifier_size = int(hparams["num_classes"])
        elif cfg.data.get("root") and not (Path(cfg.data.root) / "train").is_dir():
            cfg.data.classifier_size = 1

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.subcommand is None:
            return
        evaluator = next((cb for cb in self.trainer.callbacks if isinstance(cb, ReIDEvaluator)), None)
        if evaluator is not None:
            evaluator.run_info = {
                "subcommand": self.subcommand,
                "checkpoint": self.config[self.subcommand].get("ckpt_path"),
                "git_commit": git_commit(),
                "config": self.parser.dump(self.config, skip_none=False, format="yaml"),
            }
            # issue 12: the dataset that trained the checkpoint and the one this run reads
            ckpt_path = self.config[self.subcommand].get("ckpt_path")
            evaluator.run_info["data"] = dataset_provenance(ckpt_path, self.datamodule)
        _check_image_size(self.model, self.datamodule)

    def instantiate_trainer(self, **kwargs):
        """The trainer, with checkpoints written atomically unless the config brings its own CheckpointIO."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        plugins = trainer_config.get("plugins")
        plugins = list(plugins) if isinstance(plugins, list | tuple) else ([plugins] if plugins else [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        callbacks = trainer_config.get("callbacks") or []
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(cb, ProgressBar) for cb in callbacks
        ):  # a live bar on a terminal, plain lines in files and SLURM logs
            trainer_config["callbacks"] = [*callbacks, default_progress_bar()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Lock the run name's directory for the fit; the lock goes with the fit's end, error or interruption."""
        if self._lock_dir is not None:
            self.trainer.callbacks.append(RunLockCallback(RunLock(self._lock_dir)))


def _check_image_size(model: ReIDModule, datamodule: DetReIDXDataModule) -> None:
    """Refuse frames smaller than a patch; say once how a size that is not a multiple of the patch is seen."""
    backbone, (height, width) = model.backbone, datamodule.hparams.image_size
    if not hasattr(backbone, "patch_grid"):
        return
    try:
        rows, columns = backbone.patch_grid(height, width)
    except ValueError as err:
        raise ValueError(f"data.image_size {[height, width]}: {err}") from None
    patch = backbone.patch_size
    if (height % patch or width % patch) and is_launcher_process():
        print(
            f"[farreid] data.image_size {[height, width]} with {patch}-pixel patches: the backbone sees the top-left "
            f"{rows * patch}x{columns * patch} pixels ({rows}x{columns} patches; {height % patch} rows and "
            f"{width % patch} columns cropped), its position table interpolated to that grid"
        )


TOOLS = {
    "preflight": "farreid.tools.preflight",  # a few real steps of a fit: memory, speed, projected run time
    "embed": "farreid.tools.embed",  # one L2-normalised embedding + metadata per tracklet of any folder
    "export": "farreid.tools.export",  # the embedding model to ONNX
    "compare": "farreid.tools.compare",  # two test runs' per-query AP differences
    "index": "farreid.tools.index",  # a FAISS index over embed outputs, in shards
    "search": "farreid.tools.search",  # top-K of an index per query, filters, candidate re-ranking
}
DESCRIPTION = (
    "farreid: extreme far-distance aerial-ground video person ReID. Also: `farreid preflight --config C` (a few real "
    "steps: memory, speed, run time), `farreid embed CHECKPOINT FOLDER --out DIR` "
    "(embeddings of any tracklet folder), `farreid export CHECKPOINT --out MODEL.onnx` and `farreid compare RUN_A "
    "RUN_B --out DIR` (two test runs' per-query AP differences), `farreid index EMB_DIR... --out IDX` and "
    "`farreid search IDX QUERY_EMB_DIR --out DIR` (an archive index of embed outputs and its top-K); each has --help."
)


def cli_kwargs() -> dict:
    """What :class:`FarReIDCLI` is built with besides ``args`` and ``run`` (the module, datamodule, trainer...)."""
    return {
        "model_class": ReIDModule,
        "datamodule_class": DetReIDXDataModule,
        "trainer_class": FarReIDTrainer,
        "save_config_callback": LoggedConfigCallback,
        "save_config_kwargs": {"overwrite": True},
        "trainer_defaults": {"use_distributed_sampler": False},
        "parser_kwargs": {"description": DESCRIPTION},
    }


def main(args: list[str] | None = None, run: bool = True) -> FarReIDCLI:
    """Build and run the CLI; returns it (for Python use and tests: ``main(args=[...])``). Raises on failure."""
    configure_wandb_mode()
    quiet_known_messages()
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended", category=UserWarning)
    return FarReIDCLI(args=args, run=run, **cli_kwargs())


def console(argv: list[str] | None = None) -> int:
    """The ``farreid`` console script: exit status 0 on success, non-zero with a one-line error otherwise.

    128 + the signal number after a pre-emption signal (the resumable checkpoint is saved first), 1 on any other
    error, 2 on a usage error (argument parsing). ``FARREID_DEBUG=1`` prints the full traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    return guarded(lambda: main(argv))


def guarded(run) -> int:
    """``run()`` with the console script's exit statuses and one-line errors (see :func:`console`)."""
    try:
        run()
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except Preempted as err:
        print(f"farreid: {err}", file=sys.stderr)
        return 128 + int(err.signum)
    except KeyboardInterrupt:
        print("farreid: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the console script reports every failure in one line
        if os.environ.get("FARREID_DEBUG"):
            raise
        message = str(err).strip().splitlines()
        print(f"farreid: error: {type(err).__name__}: {message[0] if message else ''}", file=sys.stderr)
        for line in message[1:3]:
            print(f"  {line}", file=sys.stderr)
        print("  (FARREID_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(console())
