"""The DataLoaders of the datamodule: P×K identity batches that resume exactly, evaluation loaders split over ranks,
and the thread policy of a process that feeds them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from farreid.data.sampling import IdentityBatchSampler

if TYPE_CHECKING:  # annotations only: the loaders read a trainer's loop state, so the module runs without Lightning
    import lightning as L


def compute_threads(requested: int | None, num_workers: int) -> int | None:
    """Intra-op threads for ``data.compute_threads``: None (torch's default), 0 (usable cores minus the loader
    workers, at least 1) or the count itself."""
    if requested is None or requested > 0:
        return requested
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable - num_workers)


def train_loader(
    dataset: Dataset,
    *,
    p: int,
    k: int,
    passes_per_epoch: int,
    seed: int,
    num_workers: int,
    trainer: L.Trainer | None,
) -> TrainLoader:
    """P×K batches of ``dataset`` (whose ``labels`` are the training identities), this rank's share of them, placed
    at the position of the trainer's fit loop (see :func:`loop_position`)."""
    sampler = IdentityBatchSampler(
        dataset.labels,
        p=p,
        k=k,
        passes_per_epoch=passes_per_epoch,
        seed=seed,
        num_replicas=1 if trainer is None else trainer.world_size,
        rank=0 if trainer is None else trainer.global_rank,
    )
    if trainer is not None:
        sampler.set_position(*loop_position(trainer, len(sampler)))
    return TrainLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def eval_loader(dataset: Dataset, *, batch_size: int, num_workers: int, world_size: int, rank: int) -> DataLoader:
    """In-order batches of an evaluation dataset; with several ranks each reads its share."""
    sampler = None
    if world_size > 1:
        # Padded to equal length per rank; the evaluator drops the repeats by dataset index after gathering.
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,  # workers kept across validations
    )


def select_rows(value, keep: torch.Tensor):
    """The rows ``keep`` (a (B,) bool mask) of every (B, ...) tensor in a collated batch, nested dicts included."""
    if isinstance(value, dict):
        return {k: select_rows(v, keep) for k, v in value.items()}
    if torch.is_tensor(value) and value.shape[:1] == keep.shape:
        return value[keep]
    if isinstance(value, list) and len(value) == len(keep):
        return [v for v, k in zip(value, keep.tolist(), strict=True) if k]
    return value


def loop_position(trainer: L.Trainer, num_batches: int) -> tuple[int, int]:
    """(epoch, first batch) the fit loop continues from: (0, 0) fresh, (e, n) resumed after n batches of epoch e.

    Lightning builds the training iterator once, before the first epoch, and on resume does not rebuild it; with
    DataLoader workers the first indices are drawn at that moment, before Lightning's ``set_epoch``. So the
    sampler is put at the restored position here (the module looks up the run's total steps lazily, so that
    this loader is built after the checkpoint is restored).
    """
    epoch = trainer.fit_loop.epoch_progress.current.processed
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return epoch, done if 0 < done < num_batches else 0


class TrainLoader(DataLoader):
    """The training DataLoader, resumable in Lightning's sense (``state_dict``/``load_state_dict``).

    Its position needs no state of its own (it is a function of the restored fit loop, see :func:`loop_position`);
    the state records what the batches are drawn from, so that resuming on other data or another P×K is an
    error instead of a silent change of the batch sequence.
    """

    def state_dict(self) -> dict:
        sampler: IdentityBatchSampler = self.batch_sampler
        return {"num_tracklets": len(self.dataset), "num_batches": len(sampler), "seed": sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = {k: (v, mine.get(k)) for k, v in state.items() if mine.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: checkpoint {old} vs now {new}" for k, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume: the training data or sampler differ from the checkpoint's ({details}); resume with "
                "the same data.root, data.val_share, data.p/k and seed, or start a new run"
            )
