"""A plain NumPy transcription of k-reciprocal re-ranking, the reference for tests and benchmarks.

Zhong, Zheng, Cao and Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017.
This follows the conventions of the authors' published NumPy `re_ranking` function on purpose, loops and
dense N x N arrays included, so that `farreid.evaluation.reranking.re_ranking` can be checked against it:

- all N = Q + G items, squared Euclidean distances, each column divided by its maximum then transposed
  (the distances are symmetric, so row i ends up divided by the maximum of row i);
- neighbour lists from a full argsort of each row, the item itself included at rank 0;
- k1-reciprocal sets over the top k1 + 1, the 2/3 expansion with sets over the top round(k1 / 2) + 1
  (NumPy rounds half to even, as does Python's `round`);
- local query expansion averages the rows of all N items over the top k2 (self included), skipped if k2 = 1;
- Jaccard through an inverted index, then (1 - lambda) * Jaccard + lambda * distance on the query rows.

It is deliberately slow (Python loops) and memory-hungry (several float32 N x N arrays): never use it in farreid.
"""

import numpy as np


def pairwise_squared_euclidean(features: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances |a|^2 + |b|^2 - 2ab between all rows.

    Args:
        features: (N, D) float array.

    Returns:
        (N, N) float32 array.
    """
    features = np.asarray(features, dtype=np.float32)
    squared_norms = (features**2).sum(axis=1, keepdims=True)  # (N, 1)
    return (squared_norms + squared_norms.T - 2.0 * features @ features.T).astype(np.float32)


def re_ranking_reference(
    query_features: np.ndarray, gallery_features: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """Re-ranked (Q, G) distances, transcribed from the authors' published NumPy function.

    Args:
        query_features: (Q, D) float array.
        gallery_features: (G, D) float array.
        k1: size of the k-reciprocal neighbourhood.
        k2: size of the local query expansion (1 disables it).
        lambda_value: weight of the original distance in the final distance.

    Returns:
        (Q, G) float32 array of final distances.
    """
    query_num = query_features.shape[0]
    features = np.concatenate([query_features, gallery_features], axis=0)
    all_num = features.shape[0]
    original_dist = pairwise_squared_euclidean(features)
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist).astype(np.int32)

    half = int(np.around(k1 / 2))
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, : k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_forward = initial_rank[candidate, : half + 1]
            candidate_backward = initial_rank[candidate_forward, : half + 1]
            fi_candidate = np.where(candidate_backward == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward[fi_candidate]
            overlap = len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index))
            if overlap > 2 / 3 * len(candidate_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = weight / np.sum(weight)

    original_dist = original_dist[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank

    inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        ind_non_zero = np.where(V[i, :] != 0)[0]
        ind_images = [inv_index[ind] for ind in ind_non_zero]
        for j in range(len(ind_non_zero)):
            temp_min[0, ind_images[j]] = temp_min[0, ind_images[j]] + np.minimum(
                V[i, ind_non_zero[j]], V[ind_images[j], ind_non_zero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)

    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]
