"""Step 3: local query expansion, each row of V replaced by the mean of the rows of its k2 nearest items."""

import torch

from farreid.evaluation.reranking.chunks import csr_pointers, expand_segments, row_chunks, run_chunks


def query_expansion(encoding, nn_index, k2_width, chunk_size, workers, show, num_columns=None):
    """Local query expansion: row i of ``nn_index`` becomes the mean of the rows of V of its top-k2 items (CSR in,
    CSR out). ``num_columns`` bounds V's columns when they are not the rows of ``nn_index`` (default: its rows)."""
    pointers, columns, values = encoding
    num_rows = nn_index.shape[0]
    num_all = num_rows if num_columns is None else num_columns
    # Keys (row in chunk) * N + column: int32 when they fit, which halves the sort behind `unique`.
    key_type = torch.int32 if chunk_size * num_all < 2**31 else torch.int64

    def expand(chunk: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start, stop = chunk
        sources = nn_index[start:stop, :k2_width].flatten()  # (B, k2) -> (B * k2,)
        owner, position = expand_segments(pointers, sources)
        row = torch.div(owner, k2_width, rounding_mode="floor").to(key_type)
        key = row * num_all + columns.index_select(0, position).to(key_type)
        unique, inverse = torch.unique(key, return_inverse=True)
        summed = values.new_zeros(unique.numel()).index_add_(0, inverse, values.index_select(0, position))
        unique = unique.long()
        return torch.div(unique, num_all, rounding_mode="floor") + start, unique % num_all, summed / k2_width

    parts = run_chunks(expand, row_chunks(num_rows, chunk_size, workers), workers, "re-ranking: query expansion", show)
    rows = torch.cat([part[0] for part in parts])
    counts = torch.bincount(rows, minlength=num_rows)  # rows arrive sorted
    return csr_pointers(counts), torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])
