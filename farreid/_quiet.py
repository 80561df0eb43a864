"""Quiet, readable logs: the known-benign library messages are filtered by their exact text, and progress is printed
as plain lines when stdout is not a terminal (files, SLURM logs), where a live progress bar only shows at the end.

``quiet_known_messages()`` is called once by ``farreid.cli.main``; ``default_progress_bar()`` picks the bar.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from typing import Any, TextIO

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

# (message regex, why it is benign for farreid). Matched against the start of the message, as `warnings` does.
BENIGN_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning's own pytree helper on torch >= 2.10; nothing for a user to change",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "the frozen CLIP towers are kept in eval mode on purpose (no dropout in weights that never train)",
    ),
)
# Log records dropped by their text: (logger name, message regex, why).
BENIGN_RECORDS: tuple[tuple[str, str, str], ...] = (
    (
        "lightning.pytorch",
        r"💡 Tip: For seamless cloud logging",
        "an advertisement for an optional Lightning service",
    ),
    (
        "transformers",
        r"\S* ?\w+ LOAD REPORT",
        "loading a CLIPModel directory into one tower leaves the other tower's keys unused; farreid's loaders check "
        "missing and mismatched keys themselves and raise (models/backbone.py, models/text.py)",
    ),
)


class _DropMessages(logging.Filter):
    """Drops records whose formatted message matches one of ``patterns`` (ANSI colour codes ignored)."""

    _ansi = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = self._ansi.sub("", record.getMessage()).lstrip()
        return not any(p.match(message) for p in self.patterns)


def quiet_known_messages() -> None:
    """Filter the known-benign warnings and log records listed in this module (idempotent)."""
    from transformers.utils import logging as hf_logging

    # A per-file tqdm bar while loading a local directory: a few seconds, and a stream of carriage returns in logs.
    hf_logging.disable_progress_bar()
    for pattern, _why in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _why in BENIGN_RECORDS:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        if name == "transformers":
            hf_logging.get_logger()  # creates the library's handler, where its records end (no propagation)
        targets = [logging.getLogger(name), *logging.getLogger(name).handlers]
        for target in targets:
            if not any(isinstance(f, _DropMessages) for f in target.filters):
                target.addFilter(_DropMessages(patterns))
    # Child loggers' records skip a parent's own filters: filter the handlers that print them too.
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropMessages) for f in handler.filters):
            handler.addFilter(_DropMessages([p for _n, p, _w in BENIGN_RECORDS]))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgressBar(ProgressBar):
    """Progress as one plain line every ``every_n_seconds`` (and at the end of each stage), for files and SLURM logs.

    Example line: ``[farreid] train epoch 3/59 step 120/400 (2.31 it/s, eta 0:02:01) train/loss=1.234``.

    Args:
        every_n_seconds: minimum time between two lines of the same stage.
        stream: where lines go (stdout by default).
    """

    def __init__(self, every_n_seconds: float = 30.0, stream: TextIO | None = None) -> None:
        super().__init__()
        self.every_n_seconds = every_n_seconds
        self.stream = stream
        self._enabled = True
        self._start = self._last = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _write(self, text: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(f"[farreid] {text}", file=self.stream or sys.stdout, flush=True)

    def _restart(self) -> None:
        self._start = self._last = time.monotonic()

    def _line(self, stage: str, done: int, total: int | float, metrics: dict[str, Any] | None, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_n_seconds:
            return
        self._last = now
        rate = done / max(now - self._start, 1e-9)
        known = total not in (None, float("inf"))
        where = f"step {done}/{int(total)}" if known else f"step {done}"
        eta = f", eta {_duration((total - done) / rate)}" if known and rate > 0 else ""
        epoch = f" epoch {self.trainer.current_epoch}/{self.trainer.max_epochs - 1}" if stage == "train" else ""
        shown = ""
        if metrics:
            shown = " " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "v_num"
            )
        self._write(f"{stage}{epoch} {where} ({rate:.2f} it/s{eta}){shown}")

    # ------------------------------------------------------------------------------------------- hooks
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._restart()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done, total = batch_idx + 1, self.total_train_batches
        self._line("train", done, total, self.get_metrics(trainer, pl_module), force=done == total)

    def _eval_epoch_start(self, trainer, pl_module) -> None:
        self.reset_dataloader_idx_tracker()
        self._restart()

    on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = _eval_epoch_start

    def _eval_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.has_dataloader_changed(dataloader_idx):  # also tells the base class which loader's total to use
            self._restart()

    on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _eval_batch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            total = self.total_val_batches_current_dataloader
            self._line("validate", batch_idx + 1, total, None, force=batch_idx + 1 == total)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        total = self.total_test_batches_current_dataloader
        self._line("test", batch_idx + 1, total, None, force=batch_idx + 1 == total)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        total = self.total_predict_batches_current_dataloader
        self._line("predict", batch_idx + 1, total, None, force=batch_idx + 1 == total)


def default_progress_bar(stream: TextIO | None = None) -> ProgressBar:
    """A live Rich bar on a terminal, :class:`PlainProgressBar` lines otherwise (redirected output, SLURM)."""
    stream = stream or sys.stdout
    return RichProgressBar() if stream.isatty() else PlainProgressBar(stream=stream)
