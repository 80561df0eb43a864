"""Exact nearest-neighbour search: FAISS flat indexes (GPU when FAISS sees one), torch fallback.

FAISS is imported lazily: without it, or with `use_faiss=False`, the same search runs as chunked matrix
products and `torch.topk` on the device of the inputs. Both paths return torch tensors.
"""

import warnings
from types import ModuleType

import numpy as np
import torch

METRICS = ("ip", "l2")

# Rows of the query matrix scored at once by the torch fallback: bounds memory to chunk x G scores.
_CHUNK_ROWS = 1024
# FAISS GPU indexes answer at most this many neighbours per query; larger k stays on the CPU index.
_FAISS_GPU_MAX_K = 2048


def _load_faiss() -> ModuleType | None:
    """Returns the faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _as_tensor(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """Float32 2-D tensor view of `x` (kept on its device when it already is a tensor)."""
    tensor = torch.as_tensor(x)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (num, dim) array, got shape {tuple(tensor.shape)}")
    return tensor.float()


def _torch_topk(query: torch.Tensor, gallery: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked exact search in torch; see `topk` for the outputs."""
    gallery_sq = (gallery * gallery).sum(dim=1)  # (G,)
    all_scores, all_indices = [], []
    for start in range(0, query.shape[0], _CHUNK_ROWS):
        block = query[start : start + _CHUNK_ROWS]
        scores = block @ gallery.T  # (B, G)
        if metric == "l2":
            scores = (block * block).sum(dim=1, keepdim=True) + gallery_sq - 2.0 * scores
            values, indices = torch.topk(scores, k, dim=1, largest=False)
        else:
            values, indices = torch.topk(scores, k, dim=1, largest=True)
        all_scores.append(values)
        all_indices.append(indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def _faiss_topk(
    faiss: ModuleType, query: torch.Tensor, gallery: torch.Tensor, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search with a FAISS flat index; see `topk` for the outputs."""
    query_np = np.ascontiguousarray(query.detach().cpu().numpy(), dtype=np.float32)
    gallery_np = np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32)
    dim = gallery_np.shape[1]
    index = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    if k <= _FAISS_GPU_MAX_K and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(gallery_np)
    scores, indices = index.search(query_np, k)
    device = query.device
    return torch.from_numpy(scores).to(device), torch.from_numpy(indices).long().to(device)


def topk(
    query: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    k: int,
    metric: str = "ip",
    use_faiss: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery items of every query, exact.

    Args:
        query: (Q, D) features, numpy or torch.
        gallery: (G, D) features, numpy or torch.
        k: neighbours per query, 1 <= k <= G.
        metric: "ip" (inner product, largest first) or "l2" (squared Euclidean distance, smallest first).
        use_faiss: True requires FAISS, False forces the torch path, None uses FAISS when it is installed.

    Returns:
        scores: (Q, k) float32 inner products or squared distances, best first.
        indices: (Q, k) int64 gallery indices. Both on the device of `query` (CPU for numpy input).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    query_t, gallery_t = _as_tensor(query, "query"), _as_tensor(gallery, "gallery")
    if query_t.shape[1] != gallery_t.shape[1]:
        raise ValueError(f"query dim {query_t.shape[1]} != gallery dim {gallery_t.shape[1]}")
    if not 1 <= k <= gallery_t.shape[0]:
        raise ValueError(f"k must be in [1, {gallery_t.shape[0]}] (the gallery size), got {k}")
    faiss = _load_faiss() if use_faiss is not False else None
    if use_faiss and faiss is None:
        raise ImportError("use_faiss=True but faiss is not installed: pip install faiss-cpu (or faiss-gpu)")
    if faiss is None:
        if use_faiss is None:
            warnings.warn("faiss is not installed: falling back to torch search", stacklevel=2)
        return _torch_topk(query_t, gallery_t, k, metric)
    return _faiss_topk(faiss, query_t, gallery_t, k, metric)


def cosine_distance(query: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity for L2-normalised features.

    Args:
        query: (Q, D) L2-normalised features.
        gallery: (G, D) L2-normalised features.

    Returns:
        (Q, G) float32 distances in [0, 2].
    """
    query_t, gallery_t = _as_tensor(query, "query"), _as_tensor(gallery, "gallery")
    return 1.0 - query_t @ gallery_t.T
