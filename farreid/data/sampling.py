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


class IdentityBatchSampler(Sampler[list[tuple[int, int]]]):
    """P identities × K tracklets per batch; an epoch is one pass over the training tracklets.

    As the baseline's ``RandomIdentitySampler`` (VReID-XFD ``datasets/sampler.py``): every epoch each identity's
    tracklets are shuffled and cut into groups of K (a remainder shorter than K waits for a later epoch; an
    identity with fewer than K tracklets gives one group drawn with replacement), and every step takes one group
    from each of P identities. So an epoch visits every tracklet about once and has
    ``sum(groups) // (P × ranks)`` steps.

    Two deliberate differences (farreid choices):
    - the identities of a step are drawn with probability proportional to their groups left, not uniformly, so
      that the epoch ends with (almost) every group used instead of leaving the large identities' groups
      unvisited; an identity runs out -> it is dealt a fresh shuffle if fewer than P × ranks still have groups;
    - every yielded item is ``(index, seed)``: the seed drives that item's frame choice and augmentation, so a
      batch is a pure function of (seed, epoch, step), independent of DataLoader workers, and a resumed run
      replays exactly what an uninterrupted one would have drawn.

    The P × ranks identities of a step are distinct and dealt P per rank, so two ranks never hold the same
    identity at the same step; every rank yields the same number of batches.

    The position of the next ``__iter__`` is (epoch, start): the epoch's shuffle and how many of its batches to
    skip (a run resumed mid-epoch). Lightning sets the epoch through :meth:`set_epoch` (it finds this object
    as ``batch_sampler.sampler``); the datamodule sets both on resume with :meth:`set_position`.

    Args:
        labels: identity label of each dataset index.
        p: identities per batch.
        k: tracklets per identity.
        seed: base seed; the same seed, epoch and labels always give the same batches on every rank.
        num_replicas: number of ranks (world size).
        rank: this process's rank in [0, num_replicas).
        passes_per_epoch: passes over the tracklets that make one epoch (>= 1; for tiny datasets).
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
        by_identity: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            by_identity[int(label)].append(index)
        self._by_identity = dict(by_identity)
        self.identities = sorted(self._by_identity)
        if len(self.identities) < p * num_replicas:
            raise ValueError(
                f"IdentityBatchSampler: {len(self.identities)} identities cannot fill one step of P={p} identities "
                f"on each of {num_replicas} ranks (needs >= {p * num_replicas}); lower p or use fewer ranks"
            )
        self.p, self.k, self.seed = p, k, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.passes_per_epoch = passes_per_epoch
        self.num_groups = sum(max(len(pool) // k, 1) for pool in self._by_identity.values())
        self.epoch = 0
        self.start = 0

    @property
    def sampler(self) -> IdentityBatchSampler:
        """Itself: Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler``, never on the batch sampler."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle :meth:`__iter__` yields; a new epoch starts at its first batch."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Resume at batch ``start`` of ``epoch`` (the next ``__iter__`` skips the batches before it)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be in [0, {len(self)}] batches, got {start}")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_groups // (self.p * self.num_replicas) * self.passes_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = random.Random(f"farreid-sampler-{self.seed}-{self.epoch}")
        start, self.start = self.start, 0  # a skip applies once, to the resumed epoch
        groups: dict[int, list[list[int]]] = {}
        step_size = self.p * self.num_replicas
        for step in range(len(self)):
            available = [i for i in self.identities if groups.get(i)]
            if len(available) < step_size:
                for identity in self.identities:
                    if not groups.get(identity):
                        groups[identity] = self._groups(identity, rng)
                available = self.identities
            chosen = _weighted_sample(available, [len(groups[i]) for i in available], step_size, rng)
            picks = [groups[identity].pop() for identity in chosen]
            seeds = [rng.getrandbits(62) for _ in range(step_size * self.k)]  # drawn on every rank alike
            if step < start:
                continue
            mine = range(self.rank * self.p, (self.rank + 1) * self.p)
            yield [(index, seeds[g * self.k + j]) for g in mine for j, index in enumerate(picks[g])]

    def _groups(self, identity: int, rng: random.Random) -> list[list[int]]:
        """The identity's tracklets shuffled and cut into groups of K (one group with replacement if fewer)."""
        pool = self._by_identity[identity]
        if len(pool) < self.k:
            return [rng.choices(pool, k=self.k)]
        order = pool[:]
        rng.shuffle(order)
        return [order[i : i + self.k] for i in range(0, len(order) - self.k + 1, self.k)]


def _weighted_sample(items: list[int], weights: list[int], n: int, rng: random.Random) -> list[int]:
    """``n`` distinct items, drawn without replacement with probability proportional to ``weights``.

    Efraimidis & Spirakis (2006): keep the n largest keys u ** (1 / w), u uniform in (0, 1).
    """
    keys = [(rng.random() ** (1.0 / w), item) for item, w in zip(items, weights, strict=True)]
    keys.sort(reverse=True)
    return [item for _, item in keys[:n]]
