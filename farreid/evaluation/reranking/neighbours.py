"""Step 1: squared Euclidean distances of all N = Q + G items, their row maxima and each item's nearest neighbours.

Exact (the whole N x N matrix held up to `_FULL_DISTANCE_BYTES`, else one pass over row strips) or from FAISS
candidates (`approx_neighbours`).
"""

import threading

import torch
from rich.progress import track

from farreid.evaluation.reranking.chunks import huge_pages, row_chunks, run_chunks
from farreid.evaluation.search import topk

# The distance pass takes at least this many floats per chunk (64 MB): on a 2-core CPU at N = 6,000, chunks of
# 2,048-6,000 rows ran the pass in 0.75x the time of 1,024-row chunks (larger products use the cores better).
_DISTANCE_BLOCK = 1 << 24
# Up to this many bytes the exact distance pass holds the whole N x N matrix (as `features @ features.T` does;
# N <= 11,585 in float32) and multiplies only its upper block triangle, in blocks of about this many rows.
_FULL_DISTANCE_BYTES = 1 << 29
_BLOCK_EDGE = 1024
# Columns per group of `smallest`'s pre-selection (at N = 6,000, groups of 10-20 ran topk in 0.6x its time).
_TOPK_GROUP = 16


def smallest(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch.topk(rows, k, dim=1, largest=False)` (sorted) and the row maxima, about 1.6x faster on long rows.

    The columns are split into groups {a * S + b : a < L} of L = `_TOPK_GROUP` (S = n // L groups, plus the last
    n - S * L columns). The k smallest entries of a row lie in the k groups with the smallest minima (any k of its
    entries outside them would have k smaller group minima beside them), so only those k * L + (n - S * L)
    candidates go through the exact topk. Ties between equal values may be ordered differently, as with topk.

    Returns:
        (B, k) values, (B, k) their columns, (B,) row maxima.
    """
    num_rows, length = rows.shape
    groups = length // _TOPK_GROUP
    if groups < 4 * k:
        return *torch.topk(rows, k, dim=1, largest=False), rows.amax(dim=1)
    grid = rows[:, : groups * _TOPK_GROUP].unflatten(1, (_TOPK_GROUP, groups))  # (B, L, S), [a, b] = a * S + b
    # Two reductions: `torch.aminmax` over the same grid measured 8x slower than `amin` plus `amax` (torch 2.13).
    chosen = torch.topk(grid.amin(dim=1), k, dim=1, largest=False).indices  # (B, k)
    top = rows.amax(dim=1)
    offsets = torch.arange(_TOPK_GROUP, device=rows.device)[None, :, None] * groups  # (1, L, 1)
    rest = torch.arange(groups * _TOPK_GROUP, length, device=rows.device).expand(num_rows, -1)
    columns = torch.cat([(offsets + chosen[:, None, :]).flatten(1), rest], 1)  # (B, L * k + rest)
    values, pick = torch.topk(rows.gather(1, columns), k, dim=1, largest=False)
    return values, columns.gather(1, pick), top


def exact_neighbours(features, squared, width: int, num_query: int, chunk_size: int, workers: int, show: bool):
    """All pairwise squared distances, their row maxima, each row's `width` nearest and the Q x G block.

    Up to `_FULL_DISTANCE_BYTES` the N x N matrix is held whole, as the bare product holds it, and only its upper
    block triangle is multiplied (the rest is mirrored): about 0.6x the multiply-adds. Above, one pass over row
    chunks keeps only what the algorithm reads (`_strip_neighbours`).

    Returns:
        (N, width) nearest squared distances and (N, width) their indices, nearest first, self included;
        (N,) row maxima; (Q, G) the query-to-gallery block of squared distances; the whole (N, N) matrix, or None
        when it was not held.
    """
    num_all = features.shape[0]
    if num_all * num_all * features.element_size() > _FULL_DISTANCE_BYTES:
        return *_strip_neighbours(features, squared, width, num_query, chunk_size, workers, show), None
    # |f_i|^2 + |f_j|^2 - 2 f_i.f_j as one product of (N, D + 2) factors: [-2 f_i, 1, |f_i|^2] . [f_j, |f_j|^2, 1].
    dim = features.shape[1]
    left, right = features.new_empty(num_all, dim + 2), features.new_empty(num_all, dim + 2)
    blocks = row_chunks(num_all, _BLOCK_EDGE, workers)

    def factors(block: tuple[int, int]) -> None:
        top, bottom = block
        torch.mul(features[top:bottom], -2.0, out=left[top:bottom, :dim])
        right[top:bottom, :dim] = features[top:bottom]
        left[top:bottom, dim], left[top:bottom, dim + 1] = 1.0, squared[top:bottom]
        right[top:bottom, dim], right[top:bottom, dim + 1] = squared[top:bottom], 1.0

    run_chunks(factors, blocks, workers, "re-ranking: factors", False)
    full = huge_pages(features.new_empty(num_all, num_all))
    # One product per row strip, from its diagonal block to the last column, on all threads: a few large products
    # (one barrier each) ran in 0.88x the time of the same blocks spread over single-threaded workers.
    threads = torch.get_num_threads()  # 1 inside `chunk_workers` on the CPU
    torch.set_num_threads(max(threads, workers))
    try:
        for top, bottom in track(blocks, description="re-ranking: distances", disable=not show, transient=True):
            torch.mm(left[top:bottom], right[top:].T, out=full[top:bottom, top:])
    finally:
        torch.set_num_threads(threads)
    nn_dist = features.new_empty(num_all, width)
    nn_index = torch.empty(num_all, width, dtype=torch.long, device=features.device)
    row_max = features.new_empty(num_all)
    query_gallery = full[:num_query, num_query:]  # a view: the Jaccard step reads it and writes its own output

    def neighbours(row: int) -> None:
        top, bottom = blocks[row]
        for first, last in blocks[:row]:  # the lower blocks of this row strip, mirrored from the upper ones
            full[top:bottom, first:last].copy_(full[first:last, top:bottom].T)
        strip = full[top:bottom]
        nn_dist[top:bottom], nn_index[top:bottom], row_max[top:bottom] = smallest(strip, width)

    # Strips with the most mirrored blocks first, so that the workers end together.
    run_chunks(neighbours, list(range(len(blocks)))[::-1], workers, "re-ranking: neighbours", show)
    return nn_dist, nn_index, row_max, query_gallery, full


def _strip_neighbours(features, squared, width: int, num_query: int, chunk_size: int, workers: int, show: bool):
    """`exact_neighbours` in one pass over row chunks of the distances: memory chunk x N per worker."""
    num_all = features.shape[0]
    # Rows per chunk: at least `_DISTANCE_BLOCK` floats (larger products run faster), at least two chunks per worker.
    chunks = row_chunks(num_all, max(chunk_size, _DISTANCE_BLOCK // num_all), workers)
    chunk_size = chunks[0][1]
    nn_dist = features.new_empty(num_all, width)
    nn_index = torch.empty(num_all, width, dtype=torch.long, device=features.device)
    row_max = features.new_empty(num_all)
    query_gallery = features.new_empty(num_query, num_all - num_query)
    local = threading.local()

    def neighbours(chunk: tuple[int, int]) -> None:
        start, stop = chunk
        if not hasattr(local, "scratch"):
            # One block per worker for all its chunks: a fresh multi-MB tensor costs a page fault per 4 kB page.
            local.scratch = features.new_empty(min(chunk_size, num_all), num_all)
        # |f_j|^2 - 2 f_i.f_j in one fused product; the per-row constant |f_i|^2 is added to the kept values only.
        partial = torch.addmm(
            squared[None, :], features[start:stop], features.T, alpha=-2.0, out=local.scratch[: stop - start]
        )
        own = squared[start:stop, None]  # (B, 1)
        values, indices, largest = smallest(partial, width)
        torch.add(largest, own[:, 0], out=row_max[start:stop])
        torch.add(values, own, out=nn_dist[start:stop])
        nn_index[start:stop] = indices
        if start < num_query:
            rows = min(stop, num_query) - start
            torch.add(partial[:rows, num_query:], own[:rows], out=query_gallery[start : start + rows])

    run_chunks(neighbours, chunks, workers, "re-ranking: neighbours", show)
    return nn_dist, nn_index, row_max, query_gallery


def approx_neighbours(features, squared, width: int, num_query: int, chunk_size: int):
    """Like `exact_neighbours`, with neighbours and row maxima from `search.topk` (FAISS when installed)."""
    nn_dist, nn_index = topk(features, features, width, metric="l2")
    # Farthest item by an inner-product search: max_j |f_j|^2 - 2 f_i.f_j = max_j <[-2 f_i, 1], [f_j, |f_j|^2]>.
    ones = squared.new_ones(features.shape[0], 1)
    far, _ = topk(torch.cat([-2.0 * features, ones], 1), torch.cat([features, squared[:, None]], 1), 1, metric="ip")
    row_max = squared + far[:, 0].to(features.device)
    gallery = features[num_query:]
    query_gallery = features.new_empty(num_query, gallery.shape[0])
    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        block = features[start:stop] @ gallery.T  # (B, G)
        query_gallery[start:stop] = squared[start:stop, None] + squared[None, num_query:] - 2.0 * block
    return nn_dist.to(features.device), nn_index.to(features.device), row_max, query_gallery
