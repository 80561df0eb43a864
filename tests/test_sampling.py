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


def make_labels(num_ids: int, rng: random.Random) -> list[int]:
    labels = [i for i in range(num_ids) for _ in range(rng.randint(1, 6))]
    rng.shuffle(labels)
    return labels


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_batches_are_p_identities_times_k(replicas):
    labels = make_labels(23, random.Random(1))
    p, k = 3, 4
    per_rank = [
        list(IdentityBatchSampler(labels, p, k, seed=5, num_replicas=replicas, rank=r)) for r in range(replicas)
    ]
    expected_len = 23 // (p * replicas)
    for r in range(replicas):
        assert len(per_rank[r]) == expected_len == len(IdentityBatchSampler(labels, p, k, 5, replicas, r))
    for step in range(expected_len):
        step_ids = []
        for r in range(replicas):
            batch = per_rank[r][step]
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


def test_identities_appear_once_per_pass():
    labels = make_labels(16, random.Random(2))
    sampler = IdentityBatchSampler(labels, p=4, k=2, seed=0, passes_per_epoch=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 12
    for start in range(0, 12, 4):
        ids = [labels[i] for batch in batches[start : start + 4] for i in batch[::2]]
        assert sorted(ids) == list(range(16))


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


def test_too_few_identities_is_an_error():
    with pytest.raises(ValueError, match=r"5 identities .* P=3 .* 2 ranks"):
        IdentityBatchSampler([0, 1, 2, 3, 4], p=3, k=2, num_replicas=2)
