"""Exact k-reciprocal re-ranking in plain torch, at about twice the cost of the bare N x N product.

Zhong, Zheng, Cao and Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017.
The conventions are those of the authors' published NumPy `re_ranking` function (see DOMAIN.md §5 and
tests/reference_reranking.py, which this matches to 1e-4): all N = Q + G items, squared Euclidean distances
divided by the maximum of their row, the item itself at rank 0 of its own neighbour list, k1-reciprocal sets
over the top k1 + 1, the 2/3 expansion with sets over the top round(k1 / 2) + 1 (half to even), Gaussian
weights exp(-d) normalised over the expanded set, local query expansion averaging the rows of the top k2
items among all N (none if k2 = 1), Jaccard distance 1 - s / (2 - s) with s = sum_k min(V_ik, V_jk).

How it stays small and fast:
- distances: up to N = 11,585 (512 MiB) the N x N squared distances are held whole, as the bare product
  `features @ features.T` holds them, and only the upper block triangle is multiplied; beyond that, one pass
  over row chunks keeps only each row's maximum, its max(k1 + 1, k2) nearest neighbours and the Q x G block
  (the output), with chunk_size x N floats per worker;
- the encodings V are sparse CSR tensors, O(N * k1^2) entries; expanded-set members outside an item's
  neighbour list get their distance from a direct dot product;
- the Jaccard sums run through an inverted index of the gallery rows (padded tables by column degree), with
  row gathers and `index_add_` into a (rows x G) accumulator per worker.
On the CPU independent chunks run on a few Python threads, each op single-threaded (see `_chunk_workers`).
The only deviations from the published function are float rounding (about 1e-7) and ties between exactly equal
distances, which `torch.topk` may order differently from NumPy's argsort.
"""

import ctypes
import functools
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from rich.progress import track

from farreid.evaluation.search import topk

C = TypeVar("C")
T = TypeVar("T")

# The distance pass takes at least this many floats per chunk (64 MB): on a 2-core CPU at N = 6,000, chunks of
# 2,048-6,000 rows ran the pass in 0.75x the time of 1,024-row chunks (larger products use the cores better).
_DISTANCE_BLOCK = 1 << 24
# Up to this many bytes the exact distance pass holds the whole N x N matrix (as `features @ features.T` does;
# N <= 11,585 in float32) and multiplies only its upper block triangle, in blocks of about this many rows.
_FULL_DISTANCE_BYTES = 1 << 29
_BLOCK_EDGE = 1024
# Columns per group of `_smallest`'s pre-selection (at N = 6,000, groups of 10-20 ran topk in 0.6x its time).
_TOPK_GROUP = 16
# Above this many items the progress bar is shown by default.
_PROGRESS_MIN_ITEMS = 20_000
# Upper bounds on the (query entry, gallery entry) pairs gathered at once by the Jaccard step, and on the
# entries of its reused (rows x G) accumulators (all workers together).
_JACCARD_PAIR_BUDGET = 1 << 21
_JACCARD_BLOCK = 1 << 24
# Row blocks of the Jaccard step aim at this many accumulator entries (2 MB: the scattered adds stay in a core's
# cache; at N = 6,000 blocks of 100-190 rows ran in 0.8x the time of 750), but take at least 64 rows.
_JACCARD_CACHE = 1 << 19
_JACCARD_MIN_ROWS = 64
# Rows gathered at once for the distances of expanded-set members outside an item's nearest (2 x 6 MB at D = 768).
_PAIR_ROWS = 2048


@contextmanager
def _chunk_workers(device: torch.device) -> Iterator[int]:
    """One intra-op thread on the CPU for the whole call; yields how many chunk workers to run instead.

    The sparse stages are many small, memory-bound gathers and scatters. With torch's intra-op threads every op
    ends at a barrier, and on 2 shared cores under load (average about 4) they ran 10x slower with two threads
    than with one (3-8 s vs 0.3-0.5 s at N = 6,000), each op waiting for a descheduled peer. Instead, independent
    chunks (blocks of the product, row strips, encoding and Jaccard row blocks) run on as many Python threads as
    torch had intra-op threads (ops release the GIL), each op single-threaded: a worker that is descheduled
    delays only its own chunks. On a GPU: one worker, the device's own parallelism.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield 1
        return
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _madvise():
    """libc's `madvise`, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    function = ctypes.CDLL(None, use_errno=True).madvise
    function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return function


def _huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """Asks Linux for 2 MiB pages under a fresh, untouched CPU tensor (madvise MADV_HUGEPAGE, what torch's own
    THP_MEM_ALLOC_ENABLE does for every allocation); a no-op elsewhere or where the kernel declines.

    The whole N x N matrix is first touched by the product: with 4 KiB pages that is one page fault per 4 KiB
    (36,000 at N = 6,000); measured, the first touch and fill of 144 MB took 0.6x the time with huge pages.
    """
    madvise = _madvise() if tensor.device.type == "cpu" else None
    if madvise is not None:
        start, huge = tensor.data_ptr(), 2 << 20
        first, last = -(-start // huge) * huge, (start + tensor.numel() * tensor.element_size()) // huge * huge
        if last > first:
            madvise(first, last - first, 14)  # MADV_HUGEPAGE; the return value only says whether it was taken
    return tensor


def _chunks(total: int, size: int, workers: int = 1) -> list[tuple[int, int]]:
    """(start, stop) row ranges of at most `size` rows, and at least two per worker (to balance the workers)."""
    if workers > 1:
        size = min(size, -(-total // (2 * workers)))
    size = max(1, size)
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _run_chunks(function: Callable[[C], T], chunks: Sequence[C], workers: int, description: str, show: bool) -> list[T]:
    """`function(chunk)` for every chunk (row ranges, block pairs, ...), results in order, on `workers` threads; a
    rich progress bar when `show`. Functions keep their scratch buffers in a `threading.local`, one per worker."""
    if workers <= 1 or len(chunks) <= 1:
        results = map(function, chunks)
        return list(track(results, total=len(chunks), description=description, disable=not show, transient=True))
    # Grad and inference mode are per thread: the workers take the caller's (e.g. Lightning's test-time
    # inference mode, whose tensors may not be written outside it).
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def call(chunk: C) -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return function(chunk)

    with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        results = pool.map(call, chunks)
        return list(track(results, total=len(chunks), description=description, disable=not show, transient=True))


def _expand(pointers: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattens the variable-length segments `pointers[r]:pointers[r + 1]` of every r in `rows`.

    Returns:
        owner: (E,) position in `rows` of each gathered element.
        position: (E,) index of each element in the arrays that `pointers` delimits.
    """
    starts = pointers.index_select(0, rows)
    counts = pointers.index_select(0, rows + 1) - starts
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
    # Segment s starts at output offset cumsum(counts)[s] - counts[s] and at array offset starts[s].
    shift = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
    position = torch.arange(owner.numel(), device=rows.device) + shift
    return owner, position


def _pointers(counts: torch.Tensor) -> torch.Tensor:
    """CSR row pointers (R + 1,) from the (R,) entry counts of the rows."""
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _smallest(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _exact_neighbours(features, squared, width: int, num_query: int, chunk_size: int, workers: int, show: bool):
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
    blocks = _chunks(num_all, _BLOCK_EDGE, workers)

    def factors(block: tuple[int, int]) -> None:
        top, bottom = block
        torch.mul(features[top:bottom], -2.0, out=left[top:bottom, :dim])
        right[top:bottom, :dim] = features[top:bottom]
        left[top:bottom, dim], left[top:bottom, dim + 1] = 1.0, squared[top:bottom]
        right[top:bottom, dim], right[top:bottom, dim + 1] = squared[top:bottom], 1.0

    _run_chunks(factors, blocks, workers, "re-ranking: factors", False)
    full = _huge_pages(features.new_empty(num_all, num_all))
    # One product per row strip, from its diagonal block to the last column, on all threads: a few large products
    # (one barrier each) ran in 0.88x the time of the same blocks spread over single-threaded workers.
    threads = torch.get_num_threads()  # 1 inside `_chunk_workers` on the CPU
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
        nn_dist[top:bottom], nn_index[top:bottom], row_max[top:bottom] = _smallest(strip, width)

    # Strips with the most mirrored blocks first, so that the workers end together.
    _run_chunks(neighbours, list(range(len(blocks)))[::-1], workers, "re-ranking: neighbours", show)
    return nn_dist, nn_index, row_max, query_gallery, full


def _strip_neighbours(features, squared, width: int, num_query: int, chunk_size: int, workers: int, show: bool):
    """`_exact_neighbours` in one pass over row chunks of the distances: memory chunk x N per worker."""
    num_all = features.shape[0]
    # Rows per chunk: at least `_DISTANCE_BLOCK` floats (larger products run faster), at least two chunks per worker.
    chunks = _chunks(num_all, max(chunk_size, _DISTANCE_BLOCK // num_all), workers)
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
        values, indices, largest = _smallest(partial, width)
        torch.add(largest, own[:, 0], out=row_max[start:stop])
        torch.add(values, own, out=nn_dist[start:stop])
        nn_index[start:stop] = indices
        if start < num_query:
            rows = min(stop, num_query) - start
            torch.add(partial[:rows, num_query:], own[:rows], out=query_gallery[start : start + rows])

    _run_chunks(neighbours, chunks, workers, "re-ranking: neighbours", show)
    return nn_dist, nn_index, row_max, query_gallery


def _approx_neighbours(features, squared, width: int, num_query: int, chunk_size: int):
    """Like `_exact_neighbours`, with neighbours and row maxima from `search.topk` (FAISS when installed)."""
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


def _reciprocal(neighbours: torch.Tensor, workers: int) -> torch.Tensor:
    """(N, K) mask: is row i in the top K of its m-th neighbour `neighbours[i, m]`? In row chunks, whose (B, K, K)
    gathers stay in cache."""
    mask = torch.empty(neighbours.shape, dtype=torch.bool, device=neighbours.device)

    def reciprocal(chunk: tuple[int, int]) -> None:
        start, stop = chunk
        rows = neighbours[start:stop]
        their = neighbours.index_select(0, rows.flatten()).view(*rows.shape, -1)  # (B, K, K)
        own = torch.arange(start, stop, device=neighbours.device)[:, None, None]
        torch.any(their == own, dim=-1, out=mask[start:stop])

    _run_chunks(reciprocal, _chunks(neighbours.shape[0], 512, workers), workers, "re-ranking: reciprocal", False)
    return mask


def _pair_distances(features, squared, left, right, scratch) -> torch.Tensor:
    """Squared distances between the rows `left[m]` and `right[m]` of `features`, gathered in blocks.

    The gathers go into the preallocated `scratch` (2, rows, D): on the CPU a fresh multi-MB tensor per gather
    costs more in page faults than the copy (measured: 10 ms vs 1.8 ms for 6,000 x 768 floats).
    """
    products = features.new_empty(left.numel())
    rows = scratch.shape[1]
    for start in range(0, left.numel(), rows):
        stop = min(start + rows, left.numel())
        a = torch.index_select(features, 0, left[start:stop], out=scratch[0, : stop - start])
        b = torch.index_select(features, 0, right[start:stop], out=scratch[1, : stop - start])
        torch.sum(a.mul_(b), dim=1, out=products[start:stop])
    return squared.index_select(0, left) + squared.index_select(0, right) - 2.0 * products


def _encode(features, squared, nn_dist, nn_index, row_max, full, k1_width, half_width, chunk_size, workers, show):
    """The sparse k-reciprocal encodings V (one row per item) as CSR (pointers, columns, values).

    `full` is the whole (N, N) distance matrix when the distance pass held it (members' distances are then read
    from it), else None (they come from the neighbour lists, or from a direct dot product outside them).

    Row i holds R*(i) = R(i) plus every accepted half set Rh(c), c in R(i), with Gaussian weights normalised over
    the row. Within a row, the members of R(i) come first (nearest first), then the added members by index.
    """
    num_all, device = features.shape[0], features.device
    top = nn_index[:, :k1_width]
    recip = _reciprocal(top, workers)
    half = nn_index[:, :half_width]
    recip_half = _reciprocal(half, workers)
    if full is None:
        # The distances already known (each row's M nearest) as one sorted key array row * N + column, so that any
        # (row, column) pair is looked up by a single 1-D searchsorted.
        known_index, order = torch.sort(nn_index, dim=1)
        known_key = (torch.arange(num_all, device=device)[:, None] * num_all + known_index).flatten()
        known_dist = nn_dist.gather(1, order).flatten()
    chunks = _chunks(num_all, chunk_size, workers)
    local = threading.local()

    def encode(chunk: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start, stop = chunk
        size = stop - start
        if not hasattr(local, "in_set"):  # per-worker scratch: dense rows marking R(i), reset after each chunk
            local.in_set = torch.zeros(chunks[0][1], num_all, dtype=torch.bool, device=device)
        in_set = local.in_set[:size]
        r_index, r_mask = top[start:stop], recip[start:stop]  # (B, K1)
        cand = half.index_select(0, r_index.flatten()).view(size, k1_width, half_width)  # neighbours' half sets
        cand_mask = recip_half.index_select(0, r_index.flatten()).view(cand.shape) & r_mask[:, :, None]
        in_set.scatter_(1, r_index, r_mask)
        in_r = in_set.gather(1, cand.flatten(1)).view(cand.shape)  # (B, K1, Kh)
        in_set.scatter_(1, r_index, False)
        # The published rule |Rh(c) & R(i)| > 2/3 |Rh(c)|, in integers: for every set size up to 5,000 it decides
        # exactly as the float expression does.
        accept = r_mask & (3 * (in_r & cand_mask).sum(-1) > 2 * cand_mask.sum(-1))
        # Members the accepted half sets add beyond R(i), each once (np.unique): keys (row in chunk) * N + item.
        extra = (cand_mask & accept[:, :, None] & ~in_r).flatten(1)  # (B, K1 * Kh)
        rows = torch.arange(size, device=device)[:, None].expand_as(extra)
        key = torch.unique(rows.masked_select(extra) * num_all + cand.flatten(1).masked_select(extra))
        extra_row, extra_item = torch.div(key, num_all, rounding_mode="floor"), key % num_all
        # Their distances: from the whole matrix when it is held; else known ones by lookup in the neighbour
        # lists and the rest (outside the row's M nearest) computed directly.
        global_key = key + start * num_all
        if full is not None:
            extra_dist = full.view(-1).index_select(0, global_key)
        else:
            slot = torch.searchsorted(known_key, global_key).clamp_(max=known_key.numel() - 1)
            extra_dist = known_dist.index_select(0, slot)
            miss = (known_key.index_select(0, slot) != global_key).nonzero()[:, 0]
            if miss.numel():
                if not hasattr(local, "pairs"):  # per-worker gather blocks, only on this path
                    local.pairs = features.new_empty(2, _PAIR_ROWS, features.shape[1])
                item, other = extra_row.index_select(0, miss) + start, extra_item.index_select(0, miss)
                extra_dist[miss] = _pair_distances(features, squared, item, other, local.pairs)
        # One padded (B, K1 + A) block per chunk: R(i) in the first K1 lanes, the added members after them.
        counts = torch.bincount(extra_row, minlength=size)
        lanes = int(counts.max()) if key.numel() else 0
        lane = torch.arange(key.numel(), device=device) - (torch.cumsum(counts, 0) - counts).index_select(0, extra_row)
        members = torch.cat([r_index, r_index.new_zeros(size, lanes)], 1)
        dist = torch.cat([nn_dist[start:stop, :k1_width], nn_dist.new_zeros(size, lanes)], 1)
        valid = torch.cat([r_mask, r_mask.new_zeros(size, lanes)], 1)
        flat = extra_row * (k1_width + lanes) + k1_width + lane
        members.view(-1)[flat] = extra_item
        dist.view(-1)[flat] = extra_dist
        valid.view(-1)[flat] = True
        weight = torch.exp(-dist / row_max[start:stop, None]).masked_fill_(~valid, 0.0)
        weight = weight / weight.sum(1, keepdim=True)
        # Row-major selection keeps the entries grouped by row.
        return valid.sum(1), members.masked_select(valid), weight.masked_select(valid)

    parts = _run_chunks(encode, chunks, workers, "re-ranking: encodings", show)
    pointers = _pointers(torch.cat([part[0] for part in parts]))
    return pointers, torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])


def _query_expansion(encoding, nn_index, k2_width, chunk_size, workers, show):
    """Local query expansion: row i becomes the mean of the rows of its top-k2 items (CSR in, CSR out)."""
    pointers, columns, values = encoding
    num_all = nn_index.shape[0]
    # Keys (row in chunk) * N + column: int32 when they fit, which halves the sort behind `unique`.
    key_type = torch.int32 if chunk_size * num_all < 2**31 else torch.int64

    def expand(chunk: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start, stop = chunk
        sources = nn_index[start:stop, :k2_width].flatten()  # (B, k2) -> (B * k2,)
        owner, position = _expand(pointers, sources)
        row = torch.div(owner, k2_width, rounding_mode="floor").to(key_type)
        key = row * num_all + columns.index_select(0, position).to(key_type)
        unique, inverse = torch.unique(key, return_inverse=True)
        summed = values.new_zeros(unique.numel()).index_add_(0, inverse, values.index_select(0, position))
        unique = unique.long()
        return torch.div(unique, num_all, rounding_mode="floor") + start, unique % num_all, summed / k2_width

    parts = _run_chunks(expand, _chunks(num_all, chunk_size, workers), workers, "re-ranking: query expansion", show)
    rows = torch.cat([part[0] for part in parts])
    counts = torch.bincount(rows, minlength=num_all)  # rows arrive sorted
    return _pointers(counts), torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])


def _jaccard_tables(columns, values, gallery_rows, num_all: int, workers: int):
    """The inverted index of the gallery rows of V, as padded tables grouped by column degree.

    Column k's gallery entries (row j, value V_jk) fill one row of the table of width w(k): its degree rounded up
    to a quarter-octave step (exact up to 8, then 10, 12, 14, 16, 20, 24, ...: at most 25% padding); padding
    lanes hold row 0 and value 0, which add min(v, 0) = 0, an exact no-op. Fixed widths turn the gathers of the
    Jaccard step into row copies instead of per-element gathers.

    Returns:
        width: (N,) table width of each column (0 when no gallery row has it).
        slot: (N,) row of each column in its table.
        tables: {width: ((C_w, width) int32 gallery rows, (C_w, width) values)}.
    """
    device = columns.device
    degree = torch.bincount(columns, minlength=num_all)  # (N,)
    # Any grouping by column works (the sums are order-independent up to rounding): int32 keys sort faster.
    order = torch.sort(columns.to(torch.int32)).indices
    inv_rows, inv_values = gallery_rows.index_select(0, order), values.index_select(0, order)
    first = torch.cumsum(degree, 0) - degree  # (N,) offset of each column's entries
    step = torch.pow(2, (torch.log2((degree - 1).clamp(min=1).double()).floor().long() - 2).clamp(min=0))
    width = torch.div(degree + step - 1, step, rounding_mode="floor") * step  # 0 where no gallery row has k
    present = degree > 0
    slot, tables = torch.zeros_like(degree), {}

    def build(lanes: int) -> None:  # one table; tables hold disjoint columns, so workers write disjoint slots
        cols = (width == lanes).nonzero()[:, 0]
        slot[cols] = torch.arange(cols.numel(), device=device)
        lane = torch.arange(lanes, device=device)
        valid = lane < degree.index_select(0, cols)[:, None]  # (C, lanes)
        index = (first.index_select(0, cols)[:, None] + lane).clamp_(max=max(inv_rows.numel() - 1, 0)).view(-1)
        rows = inv_rows.index_select(0, index).view(valid.shape).masked_fill_(~valid, 0)
        tables[lanes] = (rows, inv_values.index_select(0, index).view(valid.shape).masked_fill_(~valid, 0.0))

    widths = torch.unique(width[present]).tolist()
    _run_chunks(build, widths[::-1], workers, "re-ranking: inverted index", False)  # widest (largest) first
    return width, slot, tables


def _jaccard(encoding, num_query: int, distances, row_max, lambda_value: float, workers: int, show: bool):
    """Mixes the Jaccard distances of the query rows to the gallery rows of V into `out` (Q, G), in place.

    Returns (Q, G) (1 - lambda) * Jaccard + lambda * original, the original being the raw query-to-gallery squared
    `distances` (written over when contiguous, else read from) divided by `row_max` of their query row. Since the
    Jaccard distance is 1 - s / (2 - s) = 2 - 2 / (2 - s), the result is
    lambda * d / max + 2 (1 - lambda) - 2 (1 - lambda) / (2 - s): one pass over the output before the sums and
    one after, the accumulator holding 2 - s directly.
    The sums s_ij = sum_k min(V_ik, V_jk) run over (query entry, gallery entry) pairs sharing a column k: each
    query entry gathers its column's row of the padded inverted index and adds its minima into a dense block.
    """
    pointers, columns, values = encoding
    num_all = pointers.numel() - 1
    num_gallery = distances.shape[1]
    out = distances if distances.is_contiguous() else distances.new_empty(distances.shape)
    device = columns.device
    counts = pointers[1:] - pointers[:-1]
    first_gallery = int(pointers[num_query])
    # Flat indices into a (rows x G) block stay below 2^31 (`_JACCARD_BLOCK`): int32 halves their traffic.
    gallery_rows = torch.repeat_interleave(
        torch.arange(num_gallery, device=device, dtype=torch.int32), counts[num_query:]
    )
    width, slot, tables = _jaccard_tables(
        columns[first_gallery:], values[first_gallery:], gallery_rows, num_all, workers
    )
    query_columns, query_values = columns[:first_gallery], values[:first_gallery]
    query_rows = torch.repeat_interleave(torch.arange(num_query, device=device), counts[:num_query])
    entry_width = width.index_select(0, query_columns)  # (E,) padded pairs of each query entry
    # Row blocks of about equal work (padded pairs), at least two per worker, each within one accumulator.
    work = torch.cumsum(entry_width, 0)
    work = torch.cat([work.new_zeros(1), work])[pointers[: num_query + 1]]  # (Q + 1,) pairs before each row
    max_rows = max(_JACCARD_MIN_ROWS, _JACCARD_CACHE // num_gallery)
    max_rows = max(1, min(num_query, max_rows, _JACCARD_BLOCK // (num_gallery * workers)))  # memory cap
    share = max(1, -(-int(work[-1]) // (2 * workers)))
    start, bounds = 0, []
    while start < num_query:
        stop = min(int(torch.searchsorted(work, work[start] + share, right=True)) - 1, start + max_rows)
        bounds.append((start, max(stop, start + 1)))
        start = bounds[-1][1]
    # The query entries sorted once by (row block, table width): each block's width groups are then contiguous
    # slices, split into pieces of at most `_JACCARD_PAIR_BUDGET` padded pairs.
    block_of_row = torch.repeat_interleave(
        torch.arange(len(bounds), device=device), torch.tensor([stop - start for start, stop in bounds], device=device)
    )
    block_start = torch.tensor([start for start, _ in bounds], device=device)
    entry_block = block_of_row.index_select(0, query_rows)
    stride = int(width.max()) + 1
    key, order = torch.sort(entry_block * stride + entry_width)
    entry_slot = slot.index_select(0, query_columns.index_select(0, order))
    entry_value = query_values.index_select(0, order)[:, None]
    entry_offset = ((query_rows - block_start.index_select(0, entry_block)) * num_gallery).to(torch.int32)
    entry_offset = entry_offset.index_select(0, order)[:, None]  # start of each entry's row in its accumulator
    groups: list[list[tuple[int, int, int]]] = [[] for _ in bounds]  # per block: (width, first, last) entries
    first = 0
    group_keys, group_sizes = torch.unique_consecutive(key, return_counts=True)
    for group_key, size in zip(group_keys.tolist(), group_sizes.tolist(), strict=True):
        block, lanes = divmod(group_key, stride)
        if lanes:
            piece = max(1, _JACCARD_PAIR_BUDGET // lanes)
            groups[block] += [(lanes, a, min(a + piece, first + size)) for a in range(first, first + size, piece)]
        first += size
    constant, one = out.new_full((1, 1), 2.0 * (1.0 - lambda_value)), out.new_ones(1, 1)
    local = threading.local()

    def accumulate(block: int) -> None:
        start, stop = bounds[block]
        if not hasattr(local, "scratch"):  # per-worker (rows x G) accumulator
            local.scratch = values.new_empty(max_rows * num_gallery)
        # lambda * d / max + 2 (1 - lambda), in place (the constant comes in as a broadcast (1, 1) tensor).
        rows = out[start:stop]
        torch.addcdiv(constant, distances[start:stop], row_max[start:stop, None], value=lambda_value, out=rows)
        total = local.scratch[: (stop - start) * num_gallery].fill_(2.0)
        for lanes, a, b in groups[block]:
            table_rows, table_values = tables[lanes]
            row = entry_slot[a:b]
            shared = torch.minimum(table_values.index_select(0, row), entry_value[a:b])
            flat = table_rows.index_select(0, row).add_(entry_offset[a:b])
            total.index_add_(0, flat.view(-1), shared.view(-1), alpha=-1.0)  # 2 - s
        rows.addcdiv_(one, total.view(stop - start, num_gallery), value=-2.0 * (1.0 - lambda_value))

    _run_chunks(accumulate, list(range(len(bounds))), workers, "re-ranking: jaccard", show)
    return out


def re_ranking(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    chunk_size: int = 1024,
    progress: bool | None = None,
    approx_candidates: int | None = None,
) -> torch.Tensor:
    """k-reciprocal re-ranked query-to-gallery distances (Zhong et al., CVPR 2017).

    Args:
        query_features: (Q, D) features, preferably L2-normalised; the computation runs on their device.
        gallery_features: (G, D) features on the same device.
        k1: size of the k-reciprocal neighbourhood (the top k1 + 1 including the item itself).
        k2: size of the local query expansion; 1 disables it.
        lambda_value: weight of the original (row-normalised squared Euclidean) distance.
        chunk_size: at most this many rows per chunk of the encodings and, above N = 11,585, of the distance
            pass (there at least 2^24 floats per chunk: larger products run faster; chunk x N floats per worker).
        progress: show a progress bar; None shows it when Q + G >= 20,000.
        approx_candidates: C, or None for exact. With C, neighbours come from `search.topk` (FAISS when
            installed, on a GPU when it sees one) and only each item's C nearest are read: k1 + 1,
            round(k1 / 2) + 1 and k2 are each capped at C, so a small C shrinks the neighbourhoods. Row maxima
            come from an exact farthest-neighbour search; expanded-set members outside the C nearest get their
            exact distance. With C >= max(k1 + 1, k2) it equals the exact mode up to rounding and ties.

    Returns:
        (Q, G) float32 tensor: (1 - lambda) * Jaccard + lambda * normalised squared Euclidean distance.
    """
    q_shape, g_shape = tuple(query_features.shape), tuple(gallery_features.shape)
    if len(q_shape) != 2 or len(g_shape) != 2 or q_shape[1] != g_shape[1]:
        raise ValueError(f"expected (Q, D) query and (G, D) gallery features, got {q_shape} and {g_shape}")
    num_query, num_gallery = q_shape[0], g_shape[0]
    if num_query < 1 or num_gallery < 1 or k1 < 1 or k2 < 1:
        raise ValueError(f"need Q, G, k1, k2 >= 1, got Q={num_query}, G={num_gallery}, k1={k1}, k2={k2}")
    if approx_candidates is not None and approx_candidates < 1:
        raise ValueError(f"approx_candidates must be a positive int or None, got {approx_candidates}")
    features = torch.cat([query_features, gallery_features]).float()  # (N, D)
    num_all = features.shape[0]
    show = num_all >= _PROGRESS_MIN_ITEMS if progress is None else progress
    k1_width = min(k1 + 1, num_all)
    half_width = min(round(k1 / 2) + 1, num_all)
    k2_width = min(k2, num_all)
    with torch.no_grad():
        squared = torch.linalg.vector_norm(features, dim=1).square_()  # (N,) |f_i|^2, shared by every stage
        if approx_candidates is not None:  # FAISS (or torch) search with all of its threads
            width = min(num_all, approx_candidates)
            k1_width, half_width, k2_width = min(k1_width, width), min(half_width, width), min(k2_width, width)
            nn_dist, nn_index, row_max, query_gallery = _approx_neighbours(
                features, squared, width, num_query, chunk_size
            )
            full = None
        with _chunk_workers(features.device) as workers:
            if approx_candidates is None:
                # Only the ranks the algorithm reads: expanded-set members beyond them get their distance from a
                # direct dot product, cheaper than a wider topk.
                width = max(k1_width, k2_width)
                nn_dist, nn_index, row_max, query_gallery, full = _exact_neighbours(
                    features, squared, width, num_query, chunk_size, workers, show
                )
            encoding = _encode(
                features, squared, nn_dist, nn_index, row_max, full, k1_width, half_width, chunk_size, workers, show
            )
            del nn_dist
            if k2 != 1:
                encoding = _query_expansion(encoding, nn_index, k2_width, chunk_size, workers, show)
            del nn_index
            # With the whole matrix held, `query_gallery` is a view of it, read once by the Jaccard step.
            return _jaccard(encoding, num_query, query_gallery, row_max, lambda_value, workers, show)
