"""Exact search: FAISS and the torch fallback against a NumPy brute force."""

import numpy as np
import pytest
import torch

from farreid.evaluation import search
from farreid.evaluation.search import cosine_distance, topk


def features(num: int, dim: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((num, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def brute_force(query: np.ndarray, gallery: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    q, g = query.astype(np.float64), gallery.astype(np.float64)
    if metric == "ip":
        scores = q @ g.T
        order = np.argsort(-scores, axis=1)[:, :k]
    else:
        scores = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
        order = np.argsort(scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("use_faiss", [True, False])
def test_topk_matches_brute_force(metric, use_faiss):
    if use_faiss:
        pytest.importorskip("faiss")
    query, gallery = features(37, seed=1), features(211, seed=2)
    expected_scores, expected_index = brute_force(query, gallery, 9, metric)
    scores, index = topk(query, torch.from_numpy(gallery), 9, metric=metric, use_faiss=use_faiss)
    assert isinstance(scores, torch.Tensor) and index.dtype == torch.int64 and scores.shape == (37, 9)
    np.testing.assert_array_equal(index.numpy(), expected_index)
    np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_and_torch_agree_on_the_whole_gallery(metric):
    pytest.importorskip("faiss")
    query, gallery = torch.from_numpy(features(50, seed=3)), torch.from_numpy(features(80, seed=4))
    faiss_scores, faiss_index = topk(query, gallery, 80, metric=metric, use_faiss=True)
    torch_scores, torch_index = topk(query, gallery, 80, metric=metric, use_faiss=False)
    np.testing.assert_array_equal(faiss_index.numpy(), torch_index.numpy())
    np.testing.assert_allclose(faiss_scores.numpy(), torch_scores.numpy(), atol=1e-5)


def test_missing_faiss(monkeypatch):
    monkeypatch.setattr(search, "_load_faiss", lambda: None)
    query, gallery = features(5, seed=5), features(12, seed=6)
    with pytest.raises(ImportError, match="faiss"):
        topk(query, gallery, 3, use_faiss=True)
    with pytest.warns(UserWarning, match="falling back to torch"):
        _, index = topk(query, gallery, 3)
    np.testing.assert_array_equal(index.numpy(), brute_force(query, gallery, 3, "ip")[1])


def test_rejects_bad_arguments():
    query, gallery = features(4), features(6)
    with pytest.raises(ValueError, match="gallery size"):
        topk(query, gallery, 7)
    with pytest.raises(ValueError, match="metric"):
        topk(query, gallery, 2, metric="cosine")
    with pytest.raises(ValueError, match="dim"):
        topk(query, gallery[:, :5], 2)


def test_cosine_distance():
    query, gallery = features(6, seed=7), features(9, seed=8)
    cosine = (query @ gallery.T) / np.outer(np.linalg.norm(query, axis=1), np.linalg.norm(gallery, axis=1))
    np.testing.assert_allclose(cosine_distance(query, torch.from_numpy(gallery)).numpy(), 1 - cosine, atol=1e-6)


class _FakeGpuFaiss:
    """Stands in for a FAISS build that sees 2 GPUs: records resources and device choices, searches on the CPU."""

    def __init__(self, real) -> None:
        self.real, self.resources, self.devices = real, 0, []
        self.IndexFlatIP, self.IndexFlatL2 = real.IndexFlatIP, real.IndexFlatL2

    def get_num_gpus(self) -> int:
        return 2

    def StandardGpuResources(self):  # noqa: N802 (FAISS's name)
        self.resources += 1
        return object()

    def index_cpu_to_gpu(self, _resources, device: int, index):
        self.devices.append(device)
        return index


def test_faiss_is_used_only_below_the_whole_gallery_and_reuses_one_gpu_resource(monkeypatch):
    """k < G: FAISS on this process's GPU with one StandardGpuResources reused; k = G: the exact torch path."""
    faiss = pytest.importorskip("faiss")
    fake = _FakeGpuFaiss(faiss)
    monkeypatch.setattr(search, "_load_faiss", lambda: fake)
    monkeypatch.setattr(search.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(search.torch.cuda, "current_device", lambda: 1)  # the rank's own GPU, not GPU 0
    search._gpu_resources.cache_clear()
    query, gallery = features(6, seed=7), features(20, seed=8)
    for _ in range(3):
        _, index = topk(query, gallery, 4)
        np.testing.assert_array_equal(index.numpy(), brute_force(query, gallery, 4, "ip")[1])
    assert fake.resources == 1 and fake.devices == [1, 1, 1]
    _, index = topk(query, gallery, 20)  # a full ranking: no FAISS
    np.testing.assert_array_equal(index.numpy(), brute_force(query, gallery, 20, "ip")[1])
    assert fake.devices == [1, 1, 1]
    search._gpu_resources.cache_clear()


def test_ranked_distances_in_chunks_match_brute_force(monkeypatch):
    monkeypatch.setattr(search, "_CPU_CHUNK_BYTES", 4 * 4 * 30 * 3)  # 3 rows per chunk at G = 30
    assert search.chunk_rows(torch.device("cpu"), 30, floats_per_entry=4) == 3
    query, gallery = features(10, seed=9), features(30, seed=10)
    distmat, ranking = search.ranked_distances(torch.from_numpy(query), torch.from_numpy(gallery))
    expected = 1.0 - query.astype(np.float64) @ gallery.astype(np.float64).T
    np.testing.assert_allclose(distmat, expected, atol=1e-6)
    np.testing.assert_array_equal(ranking, np.argsort(expected, axis=1, kind="stable"))
