"""Exact nearest-neighbour search: FAISS flat indexes (GPU when FAISS sees one), torch fallback.

FAISS is imported lazily and used only where it helps: a small k out of a large gallery. When k is the whole
gallery (a full ranking) a chunked matrix product and `torch.topk` on the inputs' device do the same work with
no host round trip, so that path never goes through FAISS. Without FAISS, or with `use_faiss=False`, the torch
path is used too. Both paths return torch tensors.

One FAISS `StandardGpuResources` (about 1.5 GiB of scratch memory plus pinned host buffers) is created per
process and device and reused; the device is the one the query lives on, else the process's current CUDA
device (each DDP rank's own GPU), never a hard-coded GPU 0.
"""

import functools
import warnings
from types import ModuleType
from typing import Literal

import numpy as np
import torch

METRICS = ("ip", "l2")

# Bytes one chunk of a (rows x G) float32 block may use: a quarter of the free device memory on a GPU, this
# fixed budget on the CPU (farreid choice: 256 MiB keeps a CPU evaluation of 50k items within a laptop's RAM).
_CPU_CHUNK_BYTES = 256 << 20
_DEVICE_MEMORY_SHARE = 0.25
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


def chunk_rows(device: torch.device, num_cols: int, floats_per_entry: int = 3) -> int:
    """Rows of a (rows x num_cols) float32 working block that fit the device's memory budget.

    Args:
        device: where the block lives. On CUDA the budget is a quarter of the free memory reported by
            `torch.cuda.mem_get_info`; elsewhere a fixed 256 MiB.
        num_cols: columns of the block (the gallery size, or N for re-ranking).
        floats_per_entry: float32 temporaries alive per entry (scores, sort keys and indices: about 3).

    Returns:
        At least 1 row.
    """
    budget = _CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * _DEVICE_MEMORY_SHARE)
    return max(1, budget // (4 * floats_per_entry * max(num_cols, 1)))


def _torch_topk(query: torch.Tensor, gallery: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked exact search in torch; see `topk` for the outputs."""
    gallery_sq = (gallery * gallery).sum(dim=1)  # (G,)
    all_scores, all_indices = [], []
    rows = chunk_rows(query.device, gallery.shape[0])
    for start in range(0, query.shape[0], rows):
        block = query[start : start + rows]
        scores = block @ gallery.T  # (B, G)
        if metric == "l2":
            scores = (block * block).sum(dim=1, keepdim=True) + gallery_sq - 2.0 * scores
            values, indices = torch.topk(scores, k, dim=1, largest=False)
        else:
            values, indices = torch.topk(scores, k, dim=1, largest=True)
        all_scores.append(values)
        all_indices.append(indices)
    return torch.cat(all_scores), torch.cat(all_indices)


@functools.cache
def _gpu_resources(faiss: ModuleType, device: int):
    """The process's one `StandardGpuResources` for a GPU, created on first use and then reused."""
    return faiss.StandardGpuResources()


def _faiss_device(query: torch.Tensor) -> int:
    """The GPU a FAISS index should live on: the query's, else this process's current CUDA device."""
    if query.device.type == "cuda":
        return query.device.index if query.device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _faiss_topk(
    faiss: ModuleType, query: torch.Tensor, gallery: torch.Tensor, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search with a FAISS flat index; see `topk` for the outputs."""
    query_np = np.ascontiguousarray(query.detach().cpu().numpy(), dtype=np.float32)
    gallery_np = np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32)
    dim = gallery_np.shape[1]
    index = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    if k <= _FAISS_GPU_MAX_K and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        device = _faiss_device(query)
        index = faiss.index_cpu_to_gpu(_gpu_resources(faiss, device), device, index)
    index.add(gallery_np)
    scores, indices = index.search(query_np, k)
    device = query.device
    return torch.from_numpy(scores).to(device), torch.from_numpy(indices).long().to(device)


def topk(
    query: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    k: int,
    metric: Literal["ip", "l2"] = "ip",
    use_faiss: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery items of every query, exact.

    Args:
        query: (Q, D) features, numpy or torch.
        gallery: (G, D) features, numpy or torch.
        k: neighbours per query, 1 <= k <= G.
        metric: "ip" (inner product, largest first) or "l2" (squared Euclidean distance, smallest first).
        use_faiss: True requires FAISS, False forces the torch path, None uses FAISS when it is installed and
            k is smaller than the gallery (a full ranking gains nothing from FAISS).

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
    if use_faiss is None and k == gallery_t.shape[0]:
        return _torch_topk(query_t, gallery_t.to(query_t.device), k, metric)
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


def ranked_distances(query: torch.Tensor, gallery: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distances and full rankings computed on the features' device in memory-sized row chunks.

    Each chunk's (rows, G) distances and stable argsort run where the features are (a GPU in a GPU job); only
    the results are copied to host arrays, so device memory stays at one chunk.

    Args:
        query: (Q, D) L2-normalised features.
        gallery: (G, D) L2-normalised features on the same device.

    Returns:
        distmat (Q, G) float32 = 1 - cosine similarity; ranking (Q, G) int32 gallery indices, nearest first
        (ties in gallery order).
    """
    query_t, gallery_t = _as_tensor(query, "query"), _as_tensor(gallery, "gallery")
    num_query, num_gallery = query_t.shape[0], gallery_t.shape[0]
    distmat = np.empty((num_query, num_gallery), dtype=np.float32)
    ranking = np.empty((num_query, num_gallery), dtype=np.int32)  # half the host memory of int64 at 25k x 25k
    rows = chunk_rows(query_t.device, num_gallery, floats_per_entry=4)
    for start in range(0, num_query, rows):
        block = 1.0 - query_t[start : start + rows] @ gallery_t.T  # (rows, G)
        order = torch.argsort(block, dim=1, stable=True)
        distmat[start : start + rows] = block.cpu().numpy()
        ranking[start : start + rows] = order.to(torch.int32).cpu().numpy()
    return distmat, ranking
