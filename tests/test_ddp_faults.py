"""Two real gloo processes through the `farreid` CLI: one scorer per job, and a NaN on one rank stops all ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TWO_RANKS = [
    *TINY_RUN,
    "--evaluator.rerank",
    "false",
    "--trainer.logger",
    "false",
    "--trainer.devices",
    "2",
    "--trainer.strategy",
    "ddp",
]


@pytest.fixture(scope="module")
def data_root(make_release) -> str:
    return str(make_release(num_train_ids=12, num_test_ids=4, seed=5, max_frames=6))


def _run(*args: str, cwd: Path, probe_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), FARREID_PROBE_DIR=str(probe_dir))
    cmd = [sys.executable, "-m", "farreid.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _records(probe_dir: Path) -> dict[int, dict]:
    return {r: json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)}


@pytest.mark.slow
def test_only_rank_zero_scores_and_both_ranks_log_the_same_metrics(data_root, tmp_path):
    proc = _run(
        "validate",
        *TWO_RANKS,
        "--data.root",
        data_root,
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.callbacks+=tests.ddp_probe.Probe",
        cwd=tmp_path,
        probe_dir=tmp_path,
    )
    records = _records(tmp_path)
    assert records[0]["exception"] is None and records[1]["exception"] is None, proc.stderr[-3000:]
    assert records[0]["score_calls"] == 1 and records[1]["score_calls"] == 0
    metrics = records[0]["metrics"]
    assert "val/overall/mAP" in metrics and "val/A2G/rank1" in metrics
    assert records[1]["metrics"] == metrics  # identical values on the rank that did not score


@pytest.mark.slow
def test_nan_on_rank_one_stops_every_rank_with_the_non_finite_loss_error(data_root, tmp_path):
    proc = _run(
        "fit",
        *TWO_RANKS,
        "--data.root",
        data_root,
        "--trainer.max_steps",
        "4",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.callbacks+=tests.ddp_probe.NaNOnRankOne",
        cwd=tmp_path,
        probe_dir=tmp_path,
    )
    assert proc.returncode != 0
    records = _records(tmp_path)
    for rank in (0, 1):
        # Rank 0's own loss is finite: it raises because the reduced flag says rank 1's is not, at the same step
        # (not a lost-peer error after rank 1 died).
        exception = records[rank]["exception"]
        assert exception and exception.startswith("FloatingPointError: non-finite training loss on rank(s) [1]"), (
            rank,
            exception,
            proc.stderr[-2000:],
        )
        assert "global step 1" in exception
