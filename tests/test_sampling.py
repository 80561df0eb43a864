"""Frame selection per tracklet and the P×K identity batch sampler."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from farreid.data.sampling import IdentityBatchSampler, frame_indices


@pytest.mark.parametrize("num_available", [8, 9, 13, 20, 100])
@pytest.mark.parametrize("training", [True, False])
def test_one_frame_per_block(num_available, training):
    t = 8
    rng = random.Random(num_available)
    for _ in range(20):
        indices, mask = frame_indices(num_available, t, training, rng)
        assert len(indices) == t and mask == [True] * t
        assert indices == sorted(indices) and len(set(indices)) == t
        for block, index in enumerate(indices):
            start, end = block * num_available // t, (block + 1) * num_available // t
            assert start <= index < end
            if not training:
                assert index == start


def test_training_draws_cover_each_block():
    rng = random.Random(0)
    seen = [set() for _ in range(4)]
    for _ in range(400):
        indices, _ = frame_indices(12, 4, True, rng)
        for block, index in enumerate(indices):
            seen[block].add(index)
    assert seen == [{0, 1, 2}, {3, 4, 5}, {6, 7, 8}, {9, 10, 11}]


@pytest.mark.parametrize("num_available", [1, 2, 3, 5, 7])
def test_short_tracklets_are_padded_by_repetition(num_available):
    indices, mask = frame_indices(num_available, 8, True, random.Random(0))
    assert len(indices) == 8 and indices == sorted(indices)
    assert set(indices) == set(range(num_available))  # every frame used, in order
    assert sum(mask) == num_available
    # The True entries mark exactly the first copy of each frame.
    assert [i for i, m in zip(indices, mask, strict=True) if m] == list(range(num_available))
    counts = Counter(indices)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_padding_example():
    assert frame_indices(3, 8, False, random.Random(0)) == (
        [0, 0, 0, 1, 1, 1, 2, 2],
        [True, False, False, True, False, False, True, False],
    )


def test_frame_indices_rejects_empty():
    with pytest.raises(ValueError, match="num_available"):
        frame_indices(0, 8, False, random.Random(0))


def make_labels(num_ids: int, rng: random.Random, most: int = 6) -> list[int]:
    labels = [i for i in range(num_ids) for _ in range(rng.randint(1, most))]
    rng.shuffle(labels)
    return labels


def indices(batch: list[tuple[int, int]]) -> list[int]:
    return [index for index, _ in batch]


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_batches_are_p_identities_times_k(replicas):
    labels = make_labels(23, random.Random(1))
    p, k = 3, 4
    per_rank = [
        list(IdentityBatchSampler(labels, p, k, seed=5, num_replicas=replicas, rank=r)) for r in range(replicas)
    ]
    groups = sum(max(labels.count(i) // k, 1) for i in set(labels))  # the baseline's groups of K per identity
    expected_len = groups // (p * replicas)
    for r in range(replicas):
        assert len(per_rank[r]) == expected_len == len(IdentityBatchSampler(labels, p, k, 5, replicas, r))
    for step in range(expected_len):
        step_ids = []
        for r in range(replicas):
            batch = indices(per_rank[r][step])
            assert len(batch) == p * k
            ids = [labels[i] for i in batch]
            counts = Counter(ids)
            assert len(counts) == p and set(counts.values()) == {k}
            for identity in counts:
                picked = [i for i in batch if labels[i] == identity]
                if labels.count(identity) >= k:  # without replacement when there are enough tracklets
                    assert len(set(picked)) == k
            step_ids.extend(counts)
        assert len(step_ids) == len(set(step_ids))  # no identity on two ranks at the same step


@pytest.mark.parametrize(("num_ids", "most", "p", "k"), [(40, 12, 4, 4), (25, 30, 8, 4), (60, 5, 8, 2), (16, 9, 2, 8)])
def test_an_epoch_is_one_pass_over_the_tracklets(num_ids, most, p, k):
    """Each tracklet about once per epoch, as the baseline's RandomIdentitySampler; steps × P × K ~ tracklets."""
    labels = make_labels(num_ids, random.Random(num_ids), most)
    sampler = IdentityBatchSampler(labels, p=p, k=k, seed=0)
    seen = Counter(i for batch in sampler for i in indices(batch))
    usable = sum(max(labels.count(i) // k, 1) * k for i in set(labels))  # tracklets in full groups of K
    assert len(sampler) * p * k > usable - p * k
    # Groups are drawn by how many each identity has left, so the pass ends with (almost) every group used.
    grouped = [i for i in range(len(labels)) if labels.count(labels[i]) >= k]
    assert sum(1 for i in grouped if seen[i]) >= 0.9 * sum(labels.count(i) // k * k for i in set(labels))
    assert max(seen[i] for i in grouped) <= 2  # a second visit only where an identity was dealt a fresh shuffle


def test_epochs_differ_and_seen_tracklets_grow():
    labels = make_labels(30, random.Random(4))
    sampler = IdentityBatchSampler(labels, p=4, k=4, seed=3)
    epochs, seen = [], set()
    sizes = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
        seen |= {i for batch in epochs[-1] for i in indices(batch)}
        sizes.append(len(seen))
    assert len({str(e) for e in epochs}) == 4
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]


def test_every_item_carries_its_own_seed():
    labels = make_labels(20, random.Random(5))
    batches = list(IdentityBatchSampler(labels, p=4, k=2, seed=1))
    seeds = [seed for batch in batches for _, seed in batch]
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(seed, int) and 0 <= seed < 2**62 for seed in seeds)


def test_seed_reproducible_and_epoch_changes_order():
    labels = make_labels(20, random.Random(3))
    a, b = IdentityBatchSampler(labels, 4, 2, seed=7), IdentityBatchSampler(labels, 4, 2, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(IdentityBatchSampler(labels, 4, 2, seed=8)) != first


@pytest.mark.parametrize("replicas", [1, 2])
def test_resumed_position_skips_exactly_the_batches_done(replicas):
    labels = make_labels(30, random.Random(6))
    for rank in range(replicas):
        sampler = IdentityBatchSampler(labels, 3, 2, seed=2, num_replicas=replicas, rank=rank)
        sampler.set_epoch(3)
        full = list(sampler)
        sampler.set_position(3, 5)
        assert list(sampler) == full[5:]
        assert list(sampler) == full  # the skip applies to the resumed epoch only
        sampler.set_position(3, 5)
        sampler.set_epoch(3)  # Lightning's set_epoch for the same epoch keeps the skip
        assert list(sampler) == full[5:]


def test_lightning_finds_set_epoch():
    """Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler`` only (fabric ``_set_sampler_epoch``)."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = IdentityBatchSampler(make_labels(12, random.Random(0)), 2, 2)
    _set_sampler_epoch(DataLoader(list(range(100)), batch_sampler=sampler), 5)
    assert sampler.epoch == 5


def test_too_few_identities_is_an_error():
    with pytest.raises(ValueError, match=r"5 identities .* P=3 .* 2 ranks"):
        IdentityBatchSampler([0, 1, 2, 3, 4], p=3, k=2, num_replicas=2)
