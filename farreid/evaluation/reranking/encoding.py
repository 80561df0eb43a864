"""Step 2: the k-reciprocal encodings V: k1-reciprocal sets R(i), the 2/3 expansion with half sets, Gaussian weights.

Each row of V is sparse (O(k1^2) entries) and stored as CSR (pointers, columns, values).
"""

import threading

import torch

from farreid.evaluation.reranking.chunks import csr_pointers, row_chunks, run_chunks

# Rows gathered at once for the distances of expanded-set members outside an item's nearest (2 x 6 MB at D = 768).
_PAIR_ROWS = 2048


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

    run_chunks(reciprocal, row_chunks(neighbours.shape[0], 512, workers), workers, "re-ranking: reciprocal", False)
    return mask


def pair_distances(features, squared, left, right, scratch) -> torch.Tensor:
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


def encode(
    features, squared, nn_dist, nn_index, row_max, full, k1_width, half_width, chunk_size, workers, show, rows=None
):
    """The sparse k-reciprocal encodings V (one row per item, or of the first ``rows`` items) as CSR (pointers,
    columns, values).

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
    chunks = row_chunks(num_all if rows is None else rows, chunk_size, workers)
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
                extra_dist[miss] = pair_distances(features, squared, item, other, local.pairs)
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

    parts = run_chunks(encode, chunks, workers, "re-ranking: encodings", show)
    pointers = csr_pointers(torch.cat([part[0] for part in parts]))
    return pointers, torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])
