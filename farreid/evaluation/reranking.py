"""k-reciprocal re-ranking in plain torch, with memory that grows with N * k instead of N * N.

Zhong, Zheng, Cao and Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017.
The conventions are those of the authors' published NumPy `re_ranking` function (see DOMAIN.md §5 and
tests/reference_reranking.py, which this matches to 1e-4): all N = Q + G items, squared Euclidean distances
divided by the maximum of their row, the item itself at rank 0 of its own neighbour list, k1-reciprocal sets
over the top k1 + 1, the 2/3 expansion with sets over the top round(k1 / 2) + 1 (half to even), Gaussian
weights exp(-d) normalised over the expanded set, local query expansion averaging the rows of the top k2
items among all N (none if k2 = 1), Jaccard distance 1 - s / (2 - s) with s = sum_k min(V_ik, V_jk).

How it stays small: one pass over row chunks of the N x N distances keeps only each row's maximum, its
max(k1 + 1, k2) nearest neighbours and the Q x G block (the output); the encodings V are sparse CSR tensors;
the Jaccard sums run through an inverted index (V by column) with gathers and `index_add_`. Memory is the
output plus O(N * k1^2) for the encodings plus max(chunk_size * N, 2^24) floats for one distance block.
The only deviations from the published function are float rounding (about 1e-7) and ties between exactly equal
distances, which `torch.topk` may order differently from NumPy's argsort.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from rich.progress import track

from farreid.evaluation.search import topk

# The distance pass takes at least this many floats per chunk (64 MB): on a 2-core CPU at N = 6,000, chunks of
# 2,048-6,000 rows ran the pass in 0.75x the time of 1,024-row chunks (larger products use the cores better).
_DISTANCE_BLOCK = 1 << 24
# Above this many items the progress bar is shown by default.
_PROGRESS_MIN_ITEMS = 20_000
# Upper bounds on the (query entry, gallery entry) pairs gathered at once by the Jaccard step, and on the
# entries of its reused (rows x G) accumulator.
_JACCARD_PAIR_BUDGET = 1 << 20
_JACCARD_BLOCK = 1 << 24


@contextmanager
def _sparse_threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU for the sparse stages, restored afterwards.

    Those stages are many small, memory-bound gathers and scatters. Measured at N = 6,000 on 2 shared cores
    (load average about 4): 0.3-0.5 s with one thread, 3-8 s with two, because the OpenMP workers of every
    small op wait for a descheduled peer. The distance pass, one large product, keeps every thread.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _chunks(total: int, size: int, description: str, show: bool) -> list[tuple[int, int]] | object:
    """(start, stop) row ranges of at most `size`, wrapped in a rich progress bar when `show`."""
    ranges = [(start, min(start + size, total)) for start in range(0, total, size)]
    return track(ranges, description=description, disable=not show, transient=True)


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


def _pointers(row_of_entry: torch.Tensor, num_rows: int) -> torch.Tensor:
    """CSR row pointers (num_rows + 1,) for entries already sorted by row."""
    counts = torch.bincount(row_of_entry, minlength=num_rows)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _exact_neighbours(features: torch.Tensor, width: int, num_query: int, chunk_size: int, show: bool):
    """One chunked pass over all pairwise squared distances.

    Returns:
        (N, width) nearest squared distances and (N, width) their indices, nearest first, self included;
        (N,) row maxima; (Q, G) the query-to-gallery block of squared distances.
    """
    num_all = features.shape[0]
    chunk_size = max(chunk_size, _DISTANCE_BLOCK // num_all)
    squared = (features * features).sum(dim=1)  # (N,)
    nn_dist, nn_index = [], []
    row_max = features.new_empty(num_all)
    query_gallery = features.new_empty(num_query, num_all - num_query)
    # One scratch block for all chunks: fresh multi-MB allocations cost a page fault per 4 kB page on every chunk.
    scratch = features.new_empty(min(chunk_size, num_all), num_all)
    for start, stop in _chunks(num_all, chunk_size, "re-ranking: neighbours", show):
        # |f_j|^2 - 2 f_i.f_j in one fused product; the per-row constant |f_i|^2 is added to the kept values only.
        partial = torch.addmm(
            squared[None, :], features[start:stop], features.T, alpha=-2.0, out=scratch[: stop - start]
        )
        own = squared[start:stop, None]  # (B, 1)
        row_max[start:stop] = partial.max(dim=1).values + own[:, 0]
        values, indices = torch.topk(partial, width, dim=1, largest=False)
        nn_dist.append(values + own)
        nn_index.append(indices)
        if start < num_query:
            rows = min(stop, num_query) - start
            torch.add(partial[:rows, num_query:], own[:rows], out=query_gallery[start : start + rows])
    return torch.cat(nn_dist), torch.cat(nn_index), row_max, query_gallery


def _approx_neighbours(features: torch.Tensor, width: int, num_query: int, chunk_size: int):
    """Like `_exact_neighbours`, with neighbours and row maxima from `search.topk` (FAISS when installed)."""
    squared = (features * features).sum(dim=1)  # (N,)
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


def _reciprocal(neighbours: torch.Tensor) -> torch.Tensor:
    """(N, K) mask: is row i in the top K of its m-th neighbour `neighbours[i, m]`?"""
    own = torch.arange(neighbours.shape[0], device=neighbours.device)[:, None, None]
    return (neighbours[neighbours] == own).any(dim=-1)  # (N, K, K) -> (N, K)


def _encode(features, nn_dist, nn_index, row_max, k1_width, half_width, chunk_size, show):
    """The sparse k-reciprocal encodings V (one row per item) as CSR (pointers, columns, values)."""
    num_all = features.shape[0]
    squared = (features * features).sum(dim=1)  # (N,)
    top = nn_index[:, :k1_width]
    recip = _reciprocal(top)
    half = nn_index[:, :half_width]
    recip_half = _reciprocal(half)
    # Dense scratch rows marking the members of R(i), reset after each chunk.
    in_set = torch.zeros(min(chunk_size, num_all), num_all, dtype=torch.bool, device=features.device)
    # The distances already known (each row's M nearest), sorted by item index for searchsorted.
    known_index, order = torch.sort(nn_index, dim=1)
    known_dist = nn_dist.gather(1, order)
    counts_out, cols_out, vals_out = [], [], []
    for start, stop in _chunks(num_all, chunk_size, "re-ranking: encodings", show):
        size = stop - start
        r_index, r_mask = top[start:stop], recip[start:stop]  # (B, K1)
        cand = half.index_select(0, r_index.flatten()).view(size, k1_width, half_width)  # neighbours' half sets
        cand_mask = recip_half.index_select(0, r_index.flatten()).view(cand.shape) & r_mask[:, :, None]
        in_set[:size].scatter_(1, r_index, r_mask)
        in_r = in_set[:size].gather(1, cand.flatten(1)).view(cand.shape)  # (B, K1, Kh)
        in_set[:size].scatter_(1, r_index, False)
        # The published rule |Rh(c) & R(i)| > 2/3 |Rh(c)|, in integers: for every set size up to 5,000 it decides
        # exactly as the float expression does.
        accept = r_mask & (3 * (in_r & cand_mask).sum(-1) > 2 * cand_mask.sum(-1))
        members = torch.cat([r_index, cand.flatten(1)], 1)  # (B, K1 + K1 * Kh)
        valid = torch.cat([r_mask, (cand_mask & accept[:, :, None]).flatten(1)], 1)
        members = torch.where(valid, members, num_all).sort(dim=1).values
        valid = members < num_all
        valid[:, 1:] &= members[:, 1:] != members[:, :-1]  # drop repeats (np.unique)
        safe = members.clamp(max=num_all - 1)
        slot = torch.searchsorted(known_index[start:stop], safe).clamp_(max=known_index.shape[1] - 1)
        dist = known_dist[start:stop].gather(1, slot)
        miss = valid & (known_index[start:stop].gather(1, slot) != safe)
        if miss.any():  # members outside the row's M nearest: compute those few distances directly
            row, col = miss.nonzero(as_tuple=True)
            item, other = row + start, safe[row, col]
            dist[row, col] = squared[item] + squared[other] - 2.0 * (features[item] * features[other]).sum(1)
        weight = torch.exp(-dist / row_max[start:stop, None]).masked_fill_(~valid, 0.0)
        weight = weight / weight.sum(1, keepdim=True)
        counts_out.append(valid.sum(1))
        cols_out.append(members.masked_select(valid))  # row-major, so the entries stay grouped by row
        vals_out.append(weight.masked_select(valid))
    counts = torch.cat(counts_out)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]), torch.cat(cols_out), torch.cat(vals_out)


def _query_expansion(encoding, nn_index, k2_width, chunk_size, show):
    """Local query expansion: row i becomes the mean of the rows of its top-k2 items (CSR in, CSR out)."""
    pointers, columns, values = encoding
    num_all = nn_index.shape[0]
    rows_out, cols_out, vals_out = [], [], []
    for start, stop in _chunks(num_all, chunk_size, "re-ranking: query expansion", show):
        sources = nn_index[start:stop, :k2_width].flatten()  # (B, k2) -> (B * k2,)
        owner, position = _expand(pointers, sources)
        key = torch.div(owner, k2_width, rounding_mode="floor") * num_all + columns.index_select(0, position)
        unique, inverse = torch.unique(key, return_inverse=True)
        summed = values.new_zeros(unique.numel()).index_add_(0, inverse, values.index_select(0, position))
        rows_out.append(torch.div(unique, num_all, rounding_mode="floor") + start)
        cols_out.append(unique % num_all)
        vals_out.append(summed / k2_width)
    return _pointers(torch.cat(rows_out), num_all), torch.cat(cols_out), torch.cat(vals_out)


def _jaccard(encoding, num_query: int, out: torch.Tensor, lambda_value: float, show: bool) -> torch.Tensor:
    """Mixes the Jaccard distances of the query rows to the gallery rows of V into `out` (Q, G), in place.

    `out` holds the normalised original distances and ends as (1 - lambda) * Jaccard + lambda * original.
    """
    pointers, columns, values = encoding
    num_all = pointers.numel() - 1
    device = columns.device
    row_of = torch.repeat_interleave(torch.arange(num_all, device=device), pointers[1:] - pointers[:-1])
    # Inverted index over gallery rows only: for each column k, the gallery items j with V[j, k] != 0.
    first_gallery = int(pointers[num_query])
    order = torch.sort(columns[first_gallery:], stable=True).indices
    inv_rows = row_of[first_gallery:].index_select(0, order) - num_query
    inv_values = values[first_gallery:].index_select(0, order)
    inv_pointers = _pointers(columns[first_gallery:].index_select(0, order), num_all)
    degree = inv_pointers[1:] - inv_pointers[:-1]  # (N,)
    work = torch.cumsum(degree.index_select(0, columns[:first_gallery]), 0)  # pairs needed up to each query entry
    work = torch.cat([work.new_zeros(1), work])[pointers[: num_query + 1]]  # (Q + 1,) pairs before each row
    num_gallery = out.shape[1]
    max_rows = max(1, min(num_query, _JACCARD_BLOCK // num_gallery))
    start, bounds = 0, []
    while start < num_query:
        target = work[start] + _JACCARD_PAIR_BUDGET
        stop = min(int(torch.searchsorted(work, target, right=True)) - 1, start + max_rows)
        bounds.append((start, max(stop, start + 1)))
        start = bounds[-1][1]
    scratch = values.new_empty(max_rows * num_gallery)
    for start, stop in track(bounds, description="re-ranking: jaccard", disable=not show, transient=True):
        low, high = int(pointers[start]), int(pointers[stop])
        owner, position = _expand(inv_pointers, columns[low:high])
        shared = torch.minimum(values[low:high].index_select(0, owner), inv_values.index_select(0, position))
        flat = (row_of[low:high] - start).index_select(0, owner) * num_gallery + inv_rows.index_select(0, position)
        total = scratch[: (stop - start) * num_gallery].zero_().index_add_(0, flat, shared)
        total = total.view(stop - start, num_gallery)  # (B * G,) -> (B, G)
        jaccard = total.neg_().add_(2.0).reciprocal_().mul_(-2.0).add_(2.0)  # 1 - s / (2 - s) = 2 - 2 / (2 - s)
        out[start:stop].mul_(lambda_value).add_(jaccard, alpha=1.0 - lambda_value)
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
        chunk_size: rows processed at once; memory is about max(chunk_size * N, 2^24) floats for the distance
            pass (the pass takes at least 64 MB blocks, which run faster).
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
        if approx_candidates is None:
            # Only the ranks the algorithm reads: the few expanded-set members beyond them (about 2 per item on
            # clustered features) get their distance from a direct dot product, cheaper than a wider topk.
            width = max(k1_width, k2_width)
            nn_dist, nn_index, row_max, query_gallery = _exact_neighbours(features, width, num_query, chunk_size, show)
        else:
            width = min(num_all, approx_candidates)
            k1_width, half_width, k2_width = min(k1_width, width), min(half_width, width), min(k2_width, width)
            nn_dist, nn_index, row_max, query_gallery = _approx_neighbours(features, width, num_query, chunk_size)
        with _sparse_threads(features.device):
            encoding = _encode(features, nn_dist, nn_index, row_max, k1_width, half_width, chunk_size, show)
            del nn_dist
            if k2 != 1:
                encoding = _query_expansion(encoding, nn_index, k2_width, chunk_size, show)
            del nn_index
            query_gallery /= row_max[:num_query, None]
            return _jaccard(encoding, num_query, query_gallery, lambda_value, show)
