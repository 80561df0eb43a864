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
On the CPU independent chunks run on a few Python threads, each op single-threaded (see `chunks.chunk_workers`).

One module per step: `neighbours` (distances and neighbour lists), `encoding` (V), `expansion` (local query
expansion), `jaccard` (the final distance); `chunks` holds what they share.
The only deviations from the published function are float rounding (about 1e-7) and ties between exactly equal
distances, which `torch.topk` may order differently from NumPy's argsort.
"""

import torch

from farreid.evaluation.reranking.chunks import chunk_workers
from farreid.evaluation.reranking.encoding import encode
from farreid.evaluation.reranking.expansion import query_expansion
from farreid.evaluation.reranking.jaccard import jaccard_distances
from farreid.evaluation.reranking.neighbours import approx_neighbours, exact_neighbours

__all__ = ["re_ranking"]

# Above this many items the progress bar is shown by default.
_PROGRESS_MIN_ITEMS = 20_000


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
            nn_dist, nn_index, row_max, query_gallery = approx_neighbours(
                features, squared, width, num_query, chunk_size
            )
            full = None
        with chunk_workers(features.device) as workers:
            if approx_candidates is None:
                # Only the ranks the algorithm reads: expanded-set members beyond them get their distance from a
                # direct dot product, cheaper than a wider topk.
                width = max(k1_width, k2_width)
                nn_dist, nn_index, row_max, query_gallery, full = exact_neighbours(
                    features, squared, width, num_query, chunk_size, workers, show
                )
            encoding = encode(
                features, squared, nn_dist, nn_index, row_max, full, k1_width, half_width, chunk_size, workers, show
            )
            del nn_dist
            if k2 != 1:
                encoding = query_expansion(encoding, nn_index, k2_width, chunk_size, workers, show)
            del nn_index
            # With the whole matrix held, `query_gallery` is a view of it, read once by the Jaccard step.
            return jaccard_distances(encoding, num_query, query_gallery, row_max, lambda_value, workers, show)
