"""Metrics against brute-force per-query loops written here, closed forms and hand-computed fixtures."""

import json
import warnings

import numpy as np
import pytest
import torch

from farreid.evaluation.metrics import (
    breakdown_by_bins,
    case_mean,
    evaluate_challenge,
    evaluate_rank,
    pool_results,
    summarize,
)


def brute_force(distmat, q_pids, g_pids, junk_of, trapezoid, max_rank):
    """One query at a time, as the torchreid / devkit loops do; ties broken by gallery order (stable sort)."""
    aps, inps, firsts = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        kept = [j for j in order if not junk_of(i, j)]
        hits = [g_pids[j] == q_pids[i] for j in kept]
        if not any(hits):
            aps.append(np.nan), inps.append(np.nan), firsts.append(-1)
            continue
        ranks = [r + 1 for r, h in enumerate(hits) if h]
        if trapezoid:  # the Market-1501 devkit loop: old_precision starts at 1
            ap, old_recall, old_precision, found = 0.0, 0.0, 1.0, 0
            for position, hit in enumerate(hits, start=1):
                found += hit
                recall, precision = found / len(ranks), found / position
                ap += (recall - old_recall) * (old_precision + precision) / 2
                old_recall, old_precision = recall, precision
        else:
            ap = np.mean([(k + 1) / r for k, r in enumerate(ranks)])
        aps.append(ap), inps.append(len(ranks) / ranks[-1]), firsts.append(ranks[0] - 1)
    firsts = np.array(firsts)
    valid = firsts >= 0
    cmc = np.array([(firsts[valid] <= r).mean() for r in range(max_rank)])
    return np.array(aps), np.array(inps), firsts, cmc


def random_problem(seed, num_query=40, num_gallery=60, num_pids=12):
    rng = np.random.default_rng(seed)
    distmat = rng.integers(0, 8, size=(num_query, num_gallery)).astype(np.float32)  # many ties
    q_pids = rng.integers(0, num_pids + 4, num_query)  # pids >= num_pids have no gallery match
    g_pids = rng.integers(0, num_pids, num_gallery)
    q_cams, g_cams = rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)
    return distmat, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_rank_matches_brute_force(seed):
    distmat, q_pids, g_pids, q_cams, g_cams = random_problem(seed)
    junk = lambda i, j: g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i]  # noqa: E731
    ap, inp, first, cmc = brute_force(distmat, q_pids, g_pids, junk, trapezoid=False, max_rank=70)
    assert (first == -1).any() and (first >= 0).any()
    with pytest.warns(UserWarning, match="no true match"):
        result = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=70)
    np.testing.assert_allclose(result["AP"], ap, equal_nan=True)
    np.testing.assert_allclose(result["INP"], inp, equal_nan=True)
    np.testing.assert_array_equal(result["first_hit"], first)
    np.testing.assert_allclose(result["cmc"], cmc)  # max_rank 70 > 60 gallery items: padded with the last value
    assert result["mAP"] == pytest.approx(np.nanmean(ap)) and result["mINP"] == pytest.approx(np.nanmean(inp))
    assert result["num_valid_query"] == (first >= 0).sum() and result["num_query"] == len(q_pids)


@pytest.mark.parametrize("seed", [3, 4])
def test_evaluate_challenge_matches_devkit_loop(seed):
    distmat, q_pids, g_pids, _, _ = random_problem(seed)
    g_names = np.array([f"t{j}" for j in range(len(g_pids))])
    # Odd queries are gallery tracklets themselves (junk for the challenge rule), even ones are not.
    q_names = np.array([f"t{i}" if i % 2 else f"query{i}" for i in range(len(q_pids))])
    junk = lambda i, j: g_names[j] == q_names[i]  # noqa: E731
    ap, inp, first, cmc = brute_force(distmat, q_pids, g_pids, junk, trapezoid=True, max_rank=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate_challenge(torch.from_numpy(distmat), q_pids, g_pids, q_names, g_names, max_rank=20)
    np.testing.assert_allclose(result["AP"], ap, equal_nan=True)
    np.testing.assert_allclose(result["INP"], inp, equal_nan=True)
    np.testing.assert_array_equal(result["first_hit"], first)
    np.testing.assert_allclose(result["cmc"], cmc)


def test_market_closed_form():
    # Sorted gallery: [hit, junk (same pid and cam), miss, hit, miss] -> kept ranks of the hits are 1 and 3.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    g_pids, g_cams = np.array([7, 7, 1, 7, 2]), np.array([1, 0, 1, 1, 1])
    result = evaluate_rank(distmat, np.array([7]), g_pids, np.array([0]), g_cams, max_rank=5)
    assert result["AP"][0] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert result["mINP"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(result["cmc"], [1, 1, 1, 1, 1])
    assert result["first_hit"][0] == 0


def test_trapezoid_hand_computed():
    # Hits at ranks 2 and 3 of 4: (0 + 1/2) / 2 / 2 + (1/2 + 2/3) / 2 / 2 = 1/8 + 7/24 = 5/12.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    g_pids = np.array([0, 5, 5, 0])
    g_names = np.array(["a", "b", "c", "d"])
    result = evaluate_challenge(distmat, np.array([5, 0]), g_pids, np.array(["q", "a"]), g_names, max_rank=3)
    assert result["AP"][0] == pytest.approx(5 / 12)
    # Query 1 is tracklet "a" itself (junk); its only other match "d" is at rank 3: (0 + 1/3) / 2 = 1/6.
    assert result["AP"][1] == pytest.approx(1 / 6)
    assert result["first_hit"].tolist() == [1, 2]
    np.testing.assert_allclose(result["cmc"], [0, 0.5, 1])
    # The same first query under the Market rule: (1/2 + 2/3) / 2 = 7/12.
    market = evaluate_rank(distmat[:1], np.array([5]), g_pids, np.array([0]), np.array([1, 1, 1, 1]), max_rank=3)
    assert market["AP"][0] == pytest.approx(7 / 12)


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_rank(np.zeros((2, 3)), [1, 2], [3, 4, 5], [0, 0], [1, 1, 1])


def test_pool_results_equals_one_concatenated_problem():
    a = random_problem(5, num_pids=10)
    b = random_problem(6, num_pids=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res_a, res_b = evaluate_rank(*a, max_rank=30), evaluate_rank(*b, max_rank=30)
        pooled = pool_results([res_a, res_b], max_rank=30)
        # One problem holding both: pids of case b shifted apart, other cases' galleries far behind.
        far = np.full((40, 60), 1e6, dtype=np.float32)
        distmat = np.block([[a[0], far], [far, b[0]]])
        joint = evaluate_rank(
            distmat, np.r_[a[1], b[1] + 100], np.r_[a[2], b[2] + 100], np.r_[a[3], b[3]], np.r_[a[4], b[4]], 30
        )
    for key in ("mAP", "mINP", "num_valid_query", "num_query"):
        assert pooled[key] == pytest.approx(joint[key])
    np.testing.assert_allclose(pooled["cmc"], joint["cmc"])
    mean = case_mean({"A": res_a, "B": res_b})
    assert mean["mAP"] == pytest.approx((res_a["mAP"] + res_b["mAP"]) / 2)
    np.testing.assert_allclose(mean["cmc"], (res_a["cmc"] + res_b["cmc"]) / 2)


def test_summarize_is_plain_json():
    distmat, q_pids, g_pids, q_cams, g_cams = random_problem(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    summary = json.loads(json.dumps(summarize(result)))
    assert summary["rank1"] == pytest.approx(result["cmc"][0]) and summary["rank10"] == pytest.approx(result["cmc"][9])
    assert summary["num_valid_query"] == result["num_valid_query"] < summary["num_query"] == 40
    with pytest.raises(ValueError, match="length >= 10"):
        summarize({**result, "cmc": result["cmc"][:5]})


def test_breakdown_by_bins_matches_loop():
    rng = np.random.default_rng(8)
    ap = rng.random(50)
    ap[::7] = np.nan
    values = rng.uniform(0, 130, 50)
    values[0] = 120.0  # on the last edge: belongs to the last bin
    edges = [0, 30, 60, 120]
    with pytest.warns(UserWarning, match="outside bins"):
        rows = breakdown_by_bins(ap, values, edges)
    for b, row in enumerate(rows):
        upper = values <= edges[b + 1] if b == len(edges) - 2 else values < edges[b + 1]
        members = ap[(values >= edges[b]) & upper]
        assert row["count"] == members.size
        assert row["mAP"] == pytest.approx(np.nanmean(members))
    assert sum(r["count"] for r in rows) == (values <= 120).sum()
