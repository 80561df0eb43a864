"""k-reciprocal re-ranking against the plain NumPy transcription of the published function."""

import numpy as np
import pytest
import torch

from farreid.evaluation.reranking import encoding, jaccard, neighbours, re_ranking
from tests.reference_reranking import re_ranking_reference


def clustered_features(num: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """L2-normalised points around num / 6 random centres, so neighbourhoods overlap like identities do."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, num // 6), dim))
    points = centres[rng.integers(0, len(centres), num)] + 0.6 * rng.standard_normal((num, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def run(features: np.ndarray, num_query: int, *args, **kwargs) -> np.ndarray:
    query, gallery = torch.from_numpy(features[:num_query]), torch.from_numpy(features[num_query:])
    return re_ranking(query, gallery, *args, **kwargs).numpy()


@pytest.mark.parametrize(
    ("num", "num_query", "k1", "k2", "lambda_value"),
    [
        (120, 30, 20, 6, 0.3),  # the defaults
        (120, 30, 20, 1, 0.3),  # no query expansion
        (90, 20, 7, 3, 0.0),  # Jaccard only; odd k1 (round(3.5) = 4)
        (90, 20, 5, 2, 1.0),  # original distance only; round(2.5) = 2 (half to even)
        (9, 3, 20, 6, 0.3),  # k1 + 1 > N: neighbour lists hold every item
    ],
)
def test_matches_reference(num, num_query, k1, k2, lambda_value):
    features = clustered_features(num, seed=num + k1)
    expected = re_ranking_reference(features[:num_query], features[num_query:], k1, k2, lambda_value)
    result = run(features, num_query, k1, k2, lambda_value)
    assert result.shape == (num_query, num - num_query) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, atol=1e-4, rtol=0)


def identity_features(num: int, cluster_size: int, noise: float, dim: int = 48, seed: int = 0) -> np.ndarray:
    """L2-normalised points around num / cluster_size centres (unit Gaussian) plus Gaussian noise of std `noise`:
    small clusters with strong noise make large expanded sets and many members beyond each item's k1 + 1."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, num // cluster_size), dim))
    points = centres[rng.integers(0, len(centres), num)] + noise * rng.standard_normal((num, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("cluster_size", "noise"), [(2, 1.0), (6, 2.0), (50, 0.5)])
def test_matches_reference_in_small_pieces_on_two_workers(monkeypatch, cluster_size, noise):
    """Every piece boundary the large-N path has: row blocks, width groups cut into pieces, gathers of
    out-of-list distances in blocks, and two chunk workers; results equal the published function's."""
    num, num_query = 480, 120
    features = identity_features(num, cluster_size, noise, seed=cluster_size)
    expected = re_ranking_reference(features[:num_query], features[num_query:])
    calls = []
    pair_distances = encoding.pair_distances
    monkeypatch.setattr(encoding, "pair_distances", lambda *a: calls.append(1) or pair_distances(*a))
    monkeypatch.setattr(encoding, "_PAIR_ROWS", 16)
    monkeypatch.setattr(jaccard, "_JACCARD_PAIR_BUDGET", 64)
    monkeypatch.setattr(jaccard, "_JACCARD_BLOCK", 8 * (num - num_query))
    monkeypatch.setattr(neighbours, "_DISTANCE_BLOCK", 1)
    monkeypatch.setattr(neighbours, "_BLOCK_EDGE", 64)  # the whole-matrix pass: 8 x 8 blocks, 28 of them mirrored
    monkeypatch.setattr(neighbours, "_TOPK_GROUP", 3)  # neighbour lists through the grouped pre-selection
    threads = torch.get_num_threads()
    results = []
    try:
        for full_matrix in (True, False):  # below and above `_FULL_DISTANCE_BYTES`
            monkeypatch.setattr(neighbours, "_FULL_DISTANCE_BYTES", 1 << 40 if full_matrix else 0)
            for workers in (1, 2):
                torch.set_num_threads(workers)
                results.append(run(features, num_query, chunk_size=50))
                assert torch.get_num_threads() == workers  # the caller's thread count is restored
    finally:
        torch.set_num_threads(threads)
    assert calls, "no expanded-set member outside the k1 + 1 nearest: the test misses that path"
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-4, rtol=0)
        # Paths and worker counts change only rounding (block shapes, so the products' summation orders).
        np.testing.assert_allclose(result, results[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("rows", "length", "k"), [(7, 1000, 21), (5, 1003, 21), (3, 500, 7), (4, 100, 21)])
def test_smallest_equals_topk(rows, length, k):
    """The grouped pre-selection returns topk's values and indices, remainder columns and ties included."""
    generator = torch.Generator().manual_seed(length)
    values = torch.rand(rows, length, generator=generator)
    values[:, -1] = -1.0  # the smallest entry in the remainder columns (length % 16 of them) when there are any
    values[1, -2] = 2.0  # and the largest, in row 1
    values[0, 10:40] = values[0, 3]  # a run of ties
    expected = torch.topk(values, k, dim=1, largest=False)
    got = neighbours.smallest(values, k)
    torch.testing.assert_close(got[0], expected.values, rtol=0, atol=0)
    torch.testing.assert_close(got[2], values.amax(dim=1), rtol=0, atol=0)
    assert torch.equal(values.gather(1, got[1]), got[0])  # the indices point at those values
    assert all(len(set(row)) == k for row in got[1].tolist())  # k distinct columns per row


def test_runs_inside_inference_mode_on_two_workers():
    """Lightning tests under `torch.inference_mode()`, which is per thread: the chunk workers must share it, or
    their in-place writes to tensors made in the caller fail."""
    features = torch.from_numpy(clustered_features(200, seed=7))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = re_ranking(features[:50], features[50:])
        with torch.inference_mode():
            got = re_ranking(features[:50], features[50:])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_chunk_size_invariance():
    features = clustered_features(150, seed=3)
    reference = run(features, 40, chunk_size=1024)
    for chunk_size in (1, 7, 64):
        np.testing.assert_allclose(run(features, 40, chunk_size=chunk_size), reference, atol=1e-6, rtol=0)


def test_approx_with_all_candidates_equals_exact():
    features = clustered_features(130, seed=4)
    exact = run(features, 30)
    np.testing.assert_allclose(run(features, 30, approx_candidates=130), exact, atol=1e-5, rtol=0)
    # k1 + 1 candidates suffice: members of the expanded sets outside them get their exact distance.
    np.testing.assert_allclose(run(features, 30, approx_candidates=21), exact, atol=1e-5, rtol=0)


def test_approx_with_few_candidates_equals_smaller_k1():
    # C = 8 caps k1 + 1 at 8 (k1 = 7) and round(k1 / 2) + 1 = 11 at 8 as well: a documented deviation.
    features = clustered_features(100, seed=5)
    result = run(features, 25, 20, 6, 0.3, approx_candidates=8)
    assert np.isfinite(result).all()
    assert np.abs(result - run(features, 25, 20, 6, 0.3)).max() > 1e-3  # it does differ from the exact result


def test_query_equals_gallery_item_ranks_it_first():
    features = clustered_features(60, seed=6)
    query = np.concatenate([features[10:13], features[3:]])  # queries 0..2 duplicate gallery items 7..9
    result = run(query, 3)
    assert result.argmin(axis=1).tolist() == [7, 8, 9]


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="features"):
        re_ranking(torch.zeros(3, 4), torch.zeros(5, 6))
    with pytest.raises(ValueError, match="k1"):
        re_ranking(torch.zeros(3, 4), torch.zeros(5, 4), k1=0)
