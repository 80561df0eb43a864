"""One index over several processes (``torch.distributed``, gloo): each rank holds some shards, rank 0 the queries.

Rank r opens shards r, r + W, r + 2W, ... of the saved index (W ranks; S >= W shards). Rank 0 reads the queries and
broadcasts them; :class:`ShardedIndex` then answers ``search`` and ``reconstruct`` collectively: every rank searches
its shards, the per-shard top-k lists are gathered and merged on every rank with the same merge a single process
uses (:func:`~farreid.search.index.merge_topk`), so with exact shards the result equals the single-index search.
Candidate re-ranking runs unchanged on top, every rank computing the same steps in lockstep.

The process group comes from the environment: ``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or SLURM's
``srun`` (SLURM_PROCID, SLURM_NTASKS; MASTER_ADDR and MASTER_PORT exported by the job script).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from farreid.search.build import open_index
from farreid.search.index import merge_topk


def world_from_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's or SLURM's variables; (0, 1) when neither is set."""
    for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if size_key in os.environ:
            return int(os.environ.get(rank_key, 0)), int(os.environ[size_key])
    return 0, 1


def init_group() -> tuple[int, int]:
    """Join (or reuse) the gloo process group; returns (rank, world size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, size = world_from_env()
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if size > 1 and missing:
        raise RuntimeError(
            f"--distributed over {size} ranks needs {' and '.join(missing)} in the environment (torchrun sets "
            "them; under srun export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) and "
            "MASTER_PORT)"
        )
    dist.init_process_group("gloo", rank=rank, world_size=size)
    return rank, size


class ShardedIndex:
    """The shards of an index spread over the ranks; same ``search``/``reconstruct``/``table`` as ArchiveIndex."""

    def __init__(self, folder: str | os.PathLike) -> None:
        rank, size = dist.get_rank(), dist.get_world_size()
        probe = open_index(folder, shards=[])
        num_shards = len(probe.offsets) - 1
        if num_shards < size:
            raise ValueError(f"{folder} has {num_shards} shards for {size} ranks: build it with --shards >= {size}")
        self.local = open_index(folder, shards=range(rank, num_shards, size))
        self.table, self.dim, self.spec, self.offsets = probe.table, probe.dim, probe.spec, probe.offsets

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def search(self, queries: np.ndarray, k: int, *, allowed=None, nprobe=None, ef=None):
        """Collective: every rank calls it with the same arguments; returns the merged (Q, k) lists on every rank."""
        if not 1 <= k <= len(self):
            raise ValueError(f"k = {k}: expected 1 <= k <= {len(self)}, the rows of this index")
        held = sum(int(self.offsets[s + 1] - self.offsets[s]) for s in self.local.shards)
        part = self.local.search(queries, min(k, held), allowed=allowed, nprobe=nprobe, ef=ef)
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
        return merge_topk(parts, k)

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        """Collective: the stored vectors of ``rows``, each filled by the rank that holds it."""
        rows = np.asarray(rows, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        mine = np.isin(shard_of, list(self.local.shards))
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        if mine.any():
            out[mine] = self.local.reconstruct(rows[mine])
        tensor = torch.from_numpy(out)
        dist.all_reduce(tensor)  # each row is non-zero on exactly one rank
        return tensor.numpy()


def broadcast(value, src: int = 0):
    """``value`` of rank ``src`` on every rank (a picklable object: the query embeddings, or an error)."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]
