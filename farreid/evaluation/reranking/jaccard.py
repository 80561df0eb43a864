"""Step 4: Jaccard distances of the query rows of V to its gallery rows, mixed with the original distances."""

import threading

import torch

from farreid.evaluation.reranking.chunks import run_chunks

# Upper bounds on the (query entry, gallery entry) pairs gathered at once by the Jaccard step, and on the
# entries of its reused (rows x G) accumulators (all workers together).
_JACCARD_PAIR_BUDGET = 1 << 21
_JACCARD_BLOCK = 1 << 24
# Row blocks of the Jaccard step aim at this many accumulator entries (2 MB: the scattered adds stay in a core's
# cache; at N = 6,000 blocks of 100-190 rows ran in 0.8x the time of 750), but take at least 64 rows.
_JACCARD_CACHE = 1 << 19
_JACCARD_MIN_ROWS = 64


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
    run_chunks(build, widths[::-1], workers, "re-ranking: inverted index", False)  # widest (largest) first
    return width, slot, tables


def jaccard_distances(
    encoding, num_query: int, distances, row_max, lambda_value: float, workers: int, show: bool, num_columns=None
):
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
    # V's columns may name items beyond its rows (candidate re-ranking encodes only some of its items).
    num_all = pointers.numel() - 1 if num_columns is None else num_columns
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

    run_chunks(accumulate, list(range(len(bounds))), workers, "re-ranking: jaccard", show)
    return out
