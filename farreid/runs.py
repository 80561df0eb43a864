"""Runs that survive: one directory per run, a lock per checkpoint directory, atomic checkpoint files, a fresh
``last.ckpt`` every epoch and before every validation, pre-emption at a step boundary, saved RNG states.

Layout of a run whose ``trainer.default_root_dir`` is ``ROOT`` (stage 1 adds ``/stage1`` to it)::

    ROOT/checkpoints/last.ckpt, best-*.ckpt   one stable directory per run name: `--ckpt_path last` resumes here
    ROOT/<subcommand>-<time>/                 one per fit / test / predict: config.yaml, logs, results.json
    ROOT/stage1/text_prompts.pt               stage 1's output, read by stage 2 (same ROOT)
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse import Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

LAST = "last.ckpt"
LOCK = ".fit.lock"


class Preempted(Exception):
    """A signal asked the run to stop; a resumable checkpoint was saved first."""

    def __init__(self, signum: int, path: Path, requeued: bool) -> None:
        self.signum, self.path, self.requeued = signum, path, requeued
        what = "requeued the SLURM job" if requeued else "resume with --ckpt_path last"
        super().__init__(f"received {signal.Signals(signum).name}: saved {path} at a step boundary; {what}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same directory, then renames it into place.

    A failed write (full disk, quota, a kill) therefore leaves the previous file intact and no partial file
    behind: readers only ever see complete checkpoints.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OSError(
                    err.errno,
                    f"could not write checkpoint {path} ({err.strerror}); the previous files "
                    "are intact, no partial file was left",
                ) from err
            raise


class RunCheckpoint(Callback):
    """Keeps ``last.ckpt`` fresh and turns pre-emption signals into a resumable checkpoint.

    - ``last.ckpt`` is written at the end of every training epoch and before every validation during fit (so a
      crash in validation loses nothing), independently of any monitored metric.
    - SIGTERM / SIGUSR1 only set a flag; the checkpoint is saved at the next step boundary (saving inside the
      handler, mid-step, can hang a distributed run), then the run stops with :class:`Preempted`. Under SLURM
      with ``requeue`` the job is requeued first (``scontrol requeue``), as Lightning's SLURM plugin does.
    - The checkpoint holds the RNG states of torch, NumPy and Python; they are restored on resume. The
      sampler's position is a function of the restored loop (see ``farreid.data.datamodule``).

    Args:
        dirpath: checkpoint directory; None = ``<trainer.default_root_dir>/checkpoints`` (the CLI sets it).
        signals: names of the signals that trigger a pre-emption checkpoint.
        requeue: under SLURM (``SLURM_JOB_ID`` set), requeue the job after saving.
    """

    def __init__(
        self, dirpath: str | None = None, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), requeue: bool = True
    ) -> None:
        self.dirpath = dirpath
        self.signals = tuple(signals)
        self.requeue = requeue
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    # ----------------------------------------------------------------------------------------- paths
    def last_path(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / LAST

    def _save(self, trainer: L.Trainer, why: str) -> Path:
        path = self.last_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        rank_zero_info(f"[farreid] saved {path} ({why}, epoch {trainer.current_epoch}, step {trainer.global_step})")
        return path

    # --------------------------------------------------------------------------------------- signals
    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self._received = signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._received = None
        for name in self.signals:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: the launcher handles signals
                break

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        received = self._received is not None
        if trainer.world_size > 1:  # every rank must save together: stop if any rank was signalled
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            if _validates_after(trainer, batch_idx):
                # Saved here rather than in on_validation_start: a run resumed from this state re-runs the
                # validation that a crash interrupted (Lightning resumes a step-boundary state exactly).
                self._save(trainer, "before validation")
            return
        signum = self._received or signal.SIGTERM
        path = self._save(trainer, f"received {signal.Signals(signum).name}")
        requeued = False
        if self.requeue and os.environ.get("SLURM_JOB_ID") and trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
            if os.environ.get("SLURM_ARRAY_TASK_ID"):
                job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            requeued = subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
        raise Preempted(signum, path, requeued)

    # ------------------------------------------------------------------------------------ last.ckpt
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, "end of epoch")

    # ------------------------------------------------------------------------------------------- RNG
    def state_dict(self) -> dict[str, Any]:
        # Tensors and plain tuples only, so that the checkpoint loads with torch.load(weights_only=True).
        name, keys, pos, has_gauss, cached = np.random.get_state()
        numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def last_checkpoint(trainer: L.Trainer) -> Path:
    """Where the run's ``last.ckpt`` is (the :class:`RunCheckpoint` of this trainer decides)."""
    keeper = next((cb for cb in trainer.callbacks if isinstance(cb, RunCheckpoint)), None)
    if keeper is None:
        raise RuntimeError("this trainer has no RunCheckpoint callback (the farreid CLI adds one)")
    return keeper.last_path(trainer)


def _validates_after(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether Lightning runs validation right after training batch ``batch_idx`` of this epoch."""
    every = trainer.check_val_every_n_epoch
    if not trainer.enable_validation or (every is not None and (trainer.current_epoch + 1) % every):
        return False
    interval = trainer.val_check_batch
    is_last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    return is_last or (isinstance(interval, int) and (batch_idx + 1) % interval == 0)


def new_run_dir(root: Path, subcommand: str) -> Path:
    """A fresh directory ``root/<subcommand>-<YYYYmmdd-HHMMSS>[-N]`` (never one that exists).

    Processes of one distributed job must share it: the first process exports ``FARREID_RUN_DIR`` and the ranks
    Lightning launches inherit it; under SLURM every task derives the same name from the job id.
    """
    if not is_launcher_process() and (inherited := os.environ.get("FARREID_RUN_DIR")):
        path = Path(inherited)
        path.mkdir(parents=True, exist_ok=True)
        return path
    if job := os.environ.get("SLURM_JOB_ID"):
        path = root / f"{subcommand}-slurm{job}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        path.mkdir(parents=True, exist_ok=True)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            path = root / (f"{subcommand}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        else:
            raise RuntimeError(f"could not create a new run directory under {root}")
    os.environ["FARREID_RUN_DIR"] = str(path)
    return path


def is_launcher_process() -> bool:
    """True in the process a user started (not a rank that Lightning's launcher or SLURM started for it)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"


class RunLock:
    """An exclusive lock on a run name's directory, held for the life of a fit (released by the OS on any exit)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK
        self._file = open(self.path, "a+")  # noqa: SIM115 - held open until release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "another process"
            self._file.close()
            raise RuntimeError(
                f"{directory} is in use by another farreid fit ({owner}); wait for it, or give this run its own "
                "--trainer.default_root_dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {os.uname().nodename}")
        self._file.flush()

    def release(self) -> None:
        """Unlock (idempotent)."""
        if self._file.closed:
            return
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


class RunLockCallback(Callback):
    """Holds a :class:`RunLock` for the life of a fit: released when the fit ends, fails or is interrupted."""

    def __init__(self, lock: RunLock) -> None:
        self.lock = lock

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.lock.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.lock.release()


def route_loggers(cfg: Namespace, run_dir: Path) -> None:
    """Every logger writes into the run directory, whatever its own versioning would pick."""
    logger = cfg.trainer.get("logger")
    if logger is True or logger is None:
        cfg.trainer.logger = Namespace(
            class_path="lightning.pytorch.loggers.CSVLogger",
            init_args=Namespace(save_dir=str(run_dir), name="", version=""),
        )
        return
    for item in logger if isinstance(logger, list) else [logger]:
        if not isinstance(item, Namespace):
            continue
        args = item.get("init_args") or Namespace()
        if item.class_path.endswith(("CSVLogger", "TensorBoardLogger")):
            args.save_dir, args.name, args.version = str(run_dir), "", ""
        else:
            args.save_dir = str(run_dir)
        item.init_args = args


def route_checkpoints(cfg: Namespace, ckpt_dir: Path) -> None:
    """ModelCheckpoints write into the run name's stable directory; last.ckpt belongs to RunCheckpoint."""
    for cb in cfg.trainer.get("callbacks") or []:
        if isinstance(cb, Namespace) and cb.class_path.endswith("ModelCheckpoint"):
            args = cb.get("init_args") or Namespace()
            if not args.get("dirpath"):
                args.dirpath = str(ckpt_dir)
            args.save_last = False
            cb.init_args = args
