"""Callbacks loaded by the 2-process tests through ``--trainer.callbacks+=tests.ddp_probe.<Name>``.

Each rank writes what it saw to ``$FARREID_PROBE_DIR/rank<r>.json``: how often the evaluator scored, the
logged evaluation metrics, and the exception it ended with.
"""

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from farreid.evaluation.callback import ReIDEvaluator


class Probe(Callback):
    """Counts `ReIDEvaluator.score` calls on this rank and records the metrics and any exception."""

    def __init__(self) -> None:
        self.record = {"score_calls": 0, "metrics": {}, "exception": None}

    def _write(self, trainer) -> None:
        self.record["rank"] = trainer.global_rank
        path = Path(os.environ["FARREID_PROBE_DIR"]) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.record))

    def setup(self, trainer, pl_module, stage) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, ReIDEvaluator):
                score = callback.score

                def counted(*args, _score=score, **kwargs):
                    self.record["score_calls"] += 1
                    return _score(*args, **kwargs)

                callback.score = counted

    def _metrics(self, trainer) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("val/", "test/")):
                self.record["metrics"][key] = float(value)
        self._write(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._metrics(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._metrics(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.record["exception"] = f"{type(exception).__name__}: {exception}"
        self._write(trainer)


class NaNOnRankOne(Probe):
    """Makes the pooled features of rank 1 NaN from the second training step on (rank 0 stays finite)."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 1:
            return

        def poison(_module, _inputs, output):
            if trainer.global_step >= 1:
                return output[0] * float("nan"), output[1]
            return output

        pl_module.pooling.register_forward_hook(poison)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["steps_done"] = trainer.global_step
