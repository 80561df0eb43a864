"""Which queries and tracklets the test figures show: worst/median/best by AP, long unpadded tracklets, each once."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from farreid.data.protocols import EvalSet, released_cases
from farreid.evaluation import plots, reporting
from farreid.evaluation.callback import ReIDEvaluator
from farreid.evaluation.reporting import select_attention_tracklets, select_queries


def test_worst_median_best_by_ap():
    rng = np.random.default_rng(0)
    ap = rng.random(41)
    ap[[3, 17, 30, 35]] = np.nan  # queries without a true match are never shown
    picks = select_queries(ap, 3)
    valid = np.flatnonzero(np.isfinite(ap))
    by_ap = sorted(valid, key=lambda i: ap[i])
    assert picks == [
        ("worst", int(np.nanargmin(ap))),
        ("median", int(by_ap[len(by_ap) // 2])),
        ("best", int(by_ap[-1])),
    ]
    assert ap[picks[1][1]] == np.median(ap[valid])  # 37 valid queries: an exact median
    spread = select_queries(ap, 5)
    assert [tag for tag, _ in spread][0] == "worst" and spread[-1] == ("best", int(np.nanargmax(ap)))
    assert [ap[i] for _, i in spread] == sorted(ap[i] for _, i in spread)


def test_ties_and_tiny_sets():
    assert select_queries(np.array([0.5, 0.5, 0.5]), 3) == [("worst", 0), ("median", 1), ("best", 2)]
    assert select_queries(np.array([np.nan, 0.2]), 3) == [("worst", 1)]  # one valid query is shown once
    assert select_queries(np.array([np.nan, np.nan]), 3) == []


@pytest.fixture(scope="module")
def cases(make_release) -> EvalSet:
    root = make_release(num_train_ids=4, num_test_ids=4, seed=5, max_frames=9)
    return released_cases(str(root))


def test_attention_tracklets_are_long_and_distinct(cases):
    n, t = len(cases), 6
    rng = np.random.default_rng(1)
    weights = rng.dirichlet(np.ones(t), size=n)
    chosen = select_attention_tracklets(cases, weights, count=5)
    assert 0 < len(chosen) <= 5
    assert all(len(cases.tracklets[i].frames) >= t for i in chosen)  # no padding repeats in the figure
    assert len({cases.tracklets[i].frames[0] for i in chosen}) == len(chosen)  # never the same tracklet twice
    spread = weights.max(1) - weights.min(1)
    eligible = sorted(
        {cases.tracklets[i].frames[0]: i for i in range(n) if len(cases.tracklets[i].frames) >= t}.values()
    )
    assert spread[chosen[0]] == max(spread[i] for i in eligible)
    assert list(spread[chosen]) == sorted(spread[chosen], reverse=True)


def test_write_figures_labels_and_distances(cases, tmp_path, monkeypatch):
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(len(cases), 16), dim=1)
    weights = torch.softmax(torch.randn(len(cases), 4), dim=1)
    results = ReIDEvaluator().score(cases, feats, rerank=False)
    calls = []
    real = plots.plot_ranked_lists
    monkeypatch.setattr(plots, "plot_ranked_lists", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    paths = reporting.write_figures(tmp_path, cases, weights, {"plain": ({}, results)}, 3, features=feats)
    assert {p.name for p in paths} >= {"cmc_plain.png", "ranked_A2G.png", "ranked_A2A.png", "attention.png"}
    for (_args, kwargs), (case, (q, g)) in zip(calls, cases.cases.items(), strict=True):
        ap = results["cases"][case]["AP"]
        picks = select_queries(ap, 3)
        assert [label.split(":")[0] for label in kwargs["query_labels"]] == [tag for tag, _ in picks]
        for row, (_tag, j) in zip(kwargs["gallery_labels"], picks, strict=True):
            ranked = results["rankings"][case][j, :10]
            shown = [float(label.split("d=")[1].split()[0]) for label in row]
            expected = [1.0 - float(feats[q[j]] @ feats[g[k]]) for k in ranked]
            np.testing.assert_allclose(shown, expected, atol=5e-4)
            assert shown == sorted(shown)  # the plain ranking sorts by this distance
            assert all(f"ID {cases.tracklets[g[k]].pid}" in label for k, label in zip(ranked, row, strict=True))
    assert Path(tmp_path / "ranked_A2G.png").stat().st_size > 10_000
