"""ReIDEvaluator glue on fixed features with known PIDs: exact metrics against brute-force references written here.

Each test is aimed at a realistic one-line bug in the glue (issue 10 item 11): query and gallery swapped, the
re-ranked run scored on plain distances, similarity used as distance, "overall" as the case mean, altitude and
distance swapped in the breakdown; and at the merge contract (dense rows, sampler repeats, unreadable and
non-finite tracklets), run through a real Trainer.
"""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from farreid.cli import main
from farreid.data.protocols import EvalSet
from farreid.data.tracklets import Tracklet
from farreid.evaluation.callback import ReIDEvaluator
from farreid.evaluation.reporting import metadata_breakdowns
from tests.conftest import TINY_RUN
from tests.reference_reranking import re_ranking_reference

MAX_RANK = 10


def _tracklet(i: int, pid: int, camid: int, altitude: float = 0.0, distance: float = 0.0) -> Tracklet:
    view = "ground" if camid == 0 else "aerial"
    return Tracklet(pid, camid, view, altitude, distance, 30.0, f"t{i:02d}_p{pid}_c{camid}", (f"t{i}/0.jpg",))


def _eval_set() -> EvalSet:
    """8 identities: ground (cam 0) and two aerial sessions; the cases have different query counts."""
    tracklets, i = [], 0
    for pid in range(8):
        for camid in (0, 1, 2) if pid < 5 else (0, 1):
            tracklets.append(_tracklet(i, pid, camid, altitude=10.0 + 25 * camid + pid, distance=100.0 - 10 * pid))
            i += 1
    cams = np.array([t.camid for t in tracklets])
    aerial, ground = np.flatnonzero(cams != 0), np.flatnonzero(cams == 0)
    cases = {
        "A2G": (aerial, ground),
        "G2A": (ground, aerial),
        "A2A": (np.flatnonzero(cams == 1), np.flatnonzero(cams == 2)),
    }
    return EvalSet(tracklets, cases)


def _features(eval_set: EvalSet, seed: int = 0, noise: float = 0.9) -> torch.Tensor:
    """Identity centres plus enough noise that rankings are imperfect (metrics strictly between 0 and 1)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, 16, generator=gen)
    pids = torch.tensor([t.pid for t in eval_set.tracklets])
    return F.normalize(centres[pids] + noise * torch.randn(len(pids), 16, generator=gen), dim=1)


def _reference(distmat: np.ndarray, q_pids, g_pids, q_cams, g_cams) -> dict:
    """Market-1501 protocol by plain loops: per-query AP, INP and first-hit rank (NaN / -1 without a match)."""
    ap, inp, first = [], [], []
    for i in range(distmat.shape[0]):
        order = sorted(range(distmat.shape[1]), key=lambda j: (distmat[i, j], j))
        kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        hits = [g_pids[j] == q_pids[i] for j in kept]
        if not any(hits):
            ap.append(np.nan), inp.append(np.nan), first.append(-1)
            continue
        positions = [r for r, h in enumerate(hits) if h]
        ap.append(np.mean([(n + 1) / (r + 1) for n, r in enumerate(positions)]))
        inp.append(len(positions) / (positions[-1] + 1))
        first.append(positions[0])
    return {"AP": np.array(ap), "INP": np.array(inp), "first": np.array(first)}


def _metrics(per_query: dict) -> dict:
    valid = ~np.isnan(per_query["AP"])
    first = per_query["first"][valid]
    return {
        "mAP": per_query["AP"][valid].mean(),
        "mINP": per_query["INP"][valid].mean(),
        "rank1": (first < 1).mean(),
        "rank5": (first < 5).mean(),
    }


def _reference_run(eval_set: EvalSet, feats: torch.Tensor, rerank: bool) -> dict:
    """Per-case and pooled reference metrics on cosine (1 - similarity) or re-ranked distances."""
    f = feats.double().numpy()
    tr = eval_set.tracklets
    per_case = {}
    for case, (q, g) in eval_set.cases.items():
        if rerank:
            distmat = re_ranking_reference(f[q], f[g], k1=4, k2=2, lambda_value=0.3)
        else:
            distmat = 1.0 - f[q] @ f[g].T
        per_case[case] = _reference(
            distmat, [tr[i].pid for i in q], [tr[i].pid for i in g], [tr[i].camid for i in q], [tr[i].camid for i in g]
        )
    pooled = {k: np.concatenate([r[k] for r in per_case.values()]) for k in ("AP", "INP", "first")}
    return {"cases": {c: _metrics(r) for c, r in per_case.items()}, "overall": _metrics(pooled)}


def _check(summary: dict, reference: dict) -> None:
    for group, expected in [*reference["cases"].items(), ("overall", reference["overall"])]:
        for metric, value in expected.items():
            assert summary[group][metric] == pytest.approx(value, abs=1e-6), (group, metric)


def _evaluator(**kwargs) -> ReIDEvaluator:
    return ReIDEvaluator(max_rank=MAX_RANK, k1=4, k2=2, lambda_value=0.3, **kwargs)


def test_plain_run_matches_brute_force_and_overall_is_pooled():
    eval_set, evaluator = _eval_set(), _evaluator()
    feats = _features(eval_set)
    summary = evaluator._summary(evaluator.score(eval_set, feats, rerank=False), eval_set)
    reference = _reference_run(eval_set, feats, rerank=False)
    _check(summary, reference)
    case_mean = np.mean([m["mAP"] for m in reference["cases"].values()])
    assert summary["case_mean"]["mAP"] == pytest.approx(case_mean, abs=1e-6)
    # The fixture makes the distinctions observable: pooled != case mean, metrics not saturated.
    assert abs(reference["overall"]["mAP"] - case_mean) > 1e-3
    assert 0.2 < reference["overall"]["mAP"] < 0.95


def test_rerank_run_is_scored_on_re_ranked_distances():
    eval_set, evaluator = _eval_set(), _evaluator(rerank=True)
    feats = _features(eval_set)
    summary = evaluator._summary(evaluator.score(eval_set, feats, rerank=True), eval_set)
    reference = _reference_run(eval_set, feats, rerank=True)
    _check(summary, reference)
    plain = _reference_run(eval_set, feats, rerank=False)
    assert any(abs(reference["cases"][c]["mAP"] - plain["cases"][c]["mAP"]) > 1e-3 for c in plain["cases"]), (
        "fixture too easy: re-ranking does not change any case"
    )


def test_rankings_are_nearest_first():
    eval_set, evaluator = _eval_set(), _evaluator()
    feats = _features(eval_set)
    results = evaluator.score(eval_set, feats, rerank=False)
    q, g = eval_set.cases["A2G"]
    expected = np.argsort(1.0 - feats[q].double().numpy() @ feats[g].double().numpy().T, axis=1, kind="stable")
    np.testing.assert_array_equal(results["rankings"]["A2G"], expected)


def test_breakdown_bins_altitude_and_distance_apart():
    """Hand-made: altitudes all in the 20-40 m bin, distances spread over three bins; the counts must follow."""
    tracklets = [
        _tracklet(0, 0, 1, altitude=25.0, distance=10.0),
        _tracklet(1, 1, 1, altitude=30.0, distance=40.0),
        _tracklet(2, 2, 2, altitude=35.0, distance=70.0),
        _tracklet(3, 0, 0),
    ]
    eval_set = EvalSet(tracklets, {"A2G": (np.array([0, 1, 2]), np.array([3]))})
    ap = np.array([1.0, 0.5, 0.25])
    breakdown = metadata_breakdowns(eval_set, {"A2G": {"AP": ap}})
    altitude = {(row["low"], row["high"]): (row["count"], row["mAP"]) for row in breakdown["altitude (m)"]}
    assert altitude[(20.0, 40.0)] == (3, pytest.approx(ap.mean()))
    distance = {(row["low"], row["high"]): (row["count"], row["mAP"]) for row in breakdown["distance (m)"]}
    assert distance[(0.0, 30.0)] == (1, 1.0) and distance[(30.0, 60.0)] == (1, 0.5)
    assert distance[(60.0, 90.0)] == (1, 0.25)


# ------------------------------------------------------------------------------ through a real Trainer
class _FixedModel(L.LightningModule):
    """Returns stored features per evaluation row, as ReIDModule._eval_step shapes them."""

    def __init__(self, rows: list[dict]) -> None:
        super().__init__()
        self.rows = rows
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def test_step(self, batch, batch_idx):
        rows = [self.rows[int(r)] for r in batch["row"]]
        return {
            "features": torch.stack([r["features"] for r in rows]),
            "weights": torch.ones(len(rows), 2) / 2,
            "index": torch.tensor([r["index"] for r in rows]),
            "item": torch.tensor([r["item"] for r in rows]),
            "valid": torch.tensor([r["valid"] for r in rows]),
        }


class _FixedData(L.LightningDataModule):
    def __init__(self, eval_set: EvalSet, num_rows: int) -> None:
        super().__init__()
        self.set, self.num_rows = eval_set, num_rows

    def test_dataloader(self):
        return DataLoader([{"row": r} for r in range(self.num_rows)], batch_size=5)

    def eval_set(self, stage: str) -> EvalSet:
        return self.set


def _trainer_test(tmp_path, eval_set: EvalSet, rows: list[dict]) -> ReIDEvaluator:
    evaluator = _evaluator(figures=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[evaluator],
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.test(_FixedModel(rows), datamodule=_FixedData(eval_set, len(rows)))
    return evaluator


def test_dense_rows_repeats_and_unreadable_tracklets_through_a_trainer(tmp_path):
    """Two chunk rows per tracklet are averaged, a sampler repeat of an item is ignored, an unreadable tracklet
    is dropped from query and gallery and counted in results.json."""
    eval_set = _eval_set()
    feats = _features(eval_set)
    gen = torch.Generator().manual_seed(1)
    rows, item = [], 0
    bad = 4  # pid 1's session-1 tracklet: an A2G and A2A query, a G2A gallery item
    for index in range(len(eval_set)):
        # Two chunks whose normalised mean is the tracklet's feature direction.
        offset = 0.5 * torch.randn(16, generator=gen)
        for sign in (1.0, -1.0):
            chunk = feats[index] + sign * offset
            if index == bad:  # whatever the model made of blank frames, NaN included: never scored, no error
                chunk = torch.full((16,), float("nan"))
            rows.append({"features": chunk, "index": index, "item": item, "valid": index != bad})
            item += 1
    rows.append(dict(rows[3], features=torch.full((16,), 5.0)))  # a repeat of item 3: its first copy counts
    evaluator = _trainer_test(tmp_path, eval_set, rows)

    keep = np.array([i != bad for i in range(len(eval_set))])
    scored = EvalSet(eval_set.tracklets, {c: (q[keep[q]], g[keep[g]]) for c, (q, g) in eval_set.cases.items()})
    _check(evaluator.last_results, _reference_run(scored, feats, rerank=False))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["unreadable"] == {"count": 1, "tracklets": [eval_set.tracklets[bad].name]}
    assert written["overall"]["mAP"] == pytest.approx(evaluator.last_results["overall"]["mAP"])


def test_non_finite_embedding_names_the_tracklet(tmp_path):
    eval_set = _eval_set()
    feats = _features(eval_set).clone()
    feats[5, 0] = float("nan")
    rows = [{"features": feats[i], "index": i, "item": i, "valid": True} for i in range(len(eval_set))]
    with pytest.raises(FloatingPointError, match=eval_set.tracklets[5].name):
        _trainer_test(tmp_path, eval_set, rows)
    all_bad = [dict(r, features=torch.full((16,), float("nan"))) for r in rows]
    with pytest.raises(FloatingPointError, match="checkpoint"):
        _trainer_test(tmp_path, eval_set, all_bad)


# ------------------------------------------------------------------ the documented commands (issue 10 item 2)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_NO_TEXT = [
    *TINY_RUN,
    "--data.batch_size_test",
    "4",  # so that 2 evaluation batches see only part of the tracklets,
]


@pytest.fixture(scope="module")
def small_root(make_release) -> str:
    return str(make_release(num_train_ids=10, num_test_ids=4, seed=2, max_frames=5))


def test_fast_dev_run_scores_the_batches_it_saw(small_root, tmp_path, capsys):
    """The tiny.yaml header command: 2 evaluation batches of 4 are a partial evaluation, scored and said so."""
    cli = main(
        [
            "fit",
            *TINY_NO_TEXT,
            "--data.root",
            small_root,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.fast_dev_run",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert "partial evaluation (limited batches): 8 of" in out
    assert "val/unreadable" in cli.trainer.callback_metrics


def test_sanity_check_is_not_scored_and_later_validation_is(small_root, tmp_path, capsys):
    """Lightning's 2-batch sanity check is skipped (said once); the epoch's full validation is scored."""
    main(
        [
            "fit",
            *TINY_NO_TEXT,
            "--data.root",
            small_root,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--trainer.num_sanity_val_steps",
            "2",
            "--trainer.check_val_every_n_epoch",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert out.count("sanity check: evaluation ran on a few batches only") == 1
    assert "val (epoch 0)" in out and "partial evaluation" not in out
