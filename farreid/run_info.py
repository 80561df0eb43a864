"""What a run records about itself and where it logs: W&B's mode, the git commit, the resolved config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback


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


def git_commit() -> str | None:
    """The farreid checkout's commit (with ``+dirty`` for uncommitted changes), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


class LoggedConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory and also logs the resolved config to every logger (W&B)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        import yaml

        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, format="yaml"))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})
