"""Callbacks that tests add to real `farreid` runs (``--trainer.callbacks+=tests.recorders.Recorder``)."""

from __future__ import annotations

import json
import os
import signal

from lightning.pytorch.callbacks import Callback


class Recorder(Callback):
    """Appends one JSON line per training batch and per validation to ``path``; can kill or signal the run.

    Args:
        path: the JSON-lines file (appended to, so a resumed run continues it).
        die_at: "EPOCH.BATCH": ``os._exit(9)`` before that training batch (a kill -9 stand-in that runs no
            handler); "valEPOCH": the same inside that epoch's validation.
        signal_at: "EPOCH.BATCH:SIGNAME": send that signal to this process before that batch.
        nan_at: "EPOCH.BATCH": fill that batch's frames with NaN.
    """

    def __init__(
        self, path: str, die_at: str | None = None, signal_at: str | None = None, nan_at: str | None = None
    ) -> None:
        self.path, self.die_at, self.signal_at, self.nan_at = path, die_at, signal_at, nan_at

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        where = f"{trainer.current_epoch}.{batch_idx}"
        if where == self.die_at:
            os._exit(9)
        if self.signal_at and self.signal_at.split(":")[0] == where:
            os.kill(os.getpid(), getattr(signal, self.signal_at.split(":")[1]))
        if where == self.nan_at:
            batch["frames"].fill_(float("nan"))
        self._write(
            {
                "epoch": trainer.current_epoch,
                "batch": batch_idx,
                "rank": trainer.global_rank,
                "index": batch["index"].tolist(),
                "label": batch["label"].tolist(),
                "step": trainer.global_step,
            }
        )

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and self.die_at == f"val{trainer.current_epoch}":
            os._exit(9)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self._write({"epoch": trainer.current_epoch, "val": metrics, "rank": trainer.global_rank})
