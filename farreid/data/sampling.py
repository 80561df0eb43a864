"""Which frames of a tracklet to load, and which tracklets form a P×K identity batch."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


def frame_indices(
    num_available: int, num_frames: int, training: bool, rng: random.Random
) -> tuple[list[int], list[bool]]:
    """Choose ``num_frames`` frame indices of a tracklet (restricted random sampling).

    The tracklet is split into T = ``num_frames`` equal blocks; training takes one uniformly random frame per
    block, test the first frame of each block. A tracklet shorter than T is padded by repetition, each frame
    repeated in order (e.g. 3 frames, T=8 -> [0, 0, 0, 1, 1, 1, 2, 2]).

    Args:
        num_available: number of frames in the tracklet (>= 1).
        num_frames: T, the clip length (>= 1).
        training: random frame per block if True, first frame per block otherwise.
        rng: source of the random choices (unused at test time).

    Returns:
        (indices, mask): T sorted frame indices, and T flags that are False on repeated copies, so exactly
        min(num_available, T) entries are True.
    """
    if num_available < 1:
        raise ValueError(f"num_available must be >= 1 (a tracklet needs a frame), got {num_available}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_available < num_frames:
        indices = [(i * num_available) // num_frames for i in range(num_frames)]
        mask = [i == 0 or indices[i] != indices[i - 1] for i in range(num_frames)]
        return indices, mask
    indices = []
    for block in range(num_frames):
        start = (block * num_available) // num_frames
        end = ((block + 1) * num_available) // num_frames  # > start because num_available >= num_frames
        indices.append(rng.randrange(start, end) if training else start)
    return indices, [True] * num_frames


class IdentityBatchSampler(Sampler[list[int]]):
    """P identities × K tracklets per batch, with identities split across ranks (use as ``batch_sampler``).

    Each epoch shuffles the identities (seeded by ``seed + epoch``), chunks them into groups of P and deals the
    groups round-robin to the ranks, so two ranks never hold the same identity at the same step and every rank
    gets the same number of batches. Identities left over after the last full round (fewer than
    P × num_replicas) wait for a later epoch's shuffle. An identity with at least K tracklets gives K distinct
    ones; with fewer they are drawn with replacement.

    Args:
        labels: identity label of each dataset index.
        p: identities per batch.
        k: tracklets per identity.
        seed: base seed; the same seed, epoch and labels always give the same batches on every rank.
        num_replicas: number of ranks (world size).
        rank: this process's rank in [0, num_replicas).
        passes_per_epoch: how many shuffled passes over the identity list make an epoch (>= 1).
    """

    def __init__(
        self,
        labels: Sequence[int],
        p: int,
        k: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        passes_per_epoch: int = 1,
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"IdentityBatchSampler needs p >= 1 and k >= 1, got p={p}, k={k}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        if passes_per_epoch < 1:
            raise ValueError(f"passes_per_epoch must be >= 1, got {passes_per_epoch}")
        self._by_identity: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            self._by_identity[int(label)].append(index)
        self.identities = sorted(self._by_identity)
        if len(self.identities) < p * num_replicas:
            raise ValueError(
                f"IdentityBatchSampler: {len(self.identities)} identities cannot fill one step of P={p} identities "
                f"on each of {num_replicas} ranks (needs >= {p * num_replicas}); lower p or use fewer ranks"
            )
        self.p, self.k, self.seed = p, k, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.passes_per_epoch = passes_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle :meth:`__iter__` yields (Lightning calls this every epoch)."""
        self.epoch = epoch

    def _steps_per_pass(self) -> int:
        return len(self.identities) // (self.p * self.num_replicas)

    def __len__(self) -> int:
        return self._steps_per_pass() * self.passes_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        group_size = self.p * self.num_replicas
        steps = self._steps_per_pass()
        for _ in range(self.passes_per_epoch):
            order = self.identities[:]
            rng.shuffle(order)
            # The tracklet draws of each step come from one shared stream, so all ranks stay in sync.
            for step in range(steps):
                chunk = order[step * group_size : (step + 1) * group_size]
                picks = [self._pick(identity, rng) for identity in chunk]
                yield [index for group in picks[self.rank * self.p : (self.rank + 1) * self.p] for index in group]

    def _pick(self, identity: int, rng: random.Random) -> list[int]:
        pool = self._by_identity[identity]
        if len(pool) >= self.k:
            return rng.sample(pool, self.k)
        return rng.choices(pool, k=self.k)
