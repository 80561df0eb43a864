"""Cross-dataset runs through the installed `farreid` console script: fit on the AG-VPReID layout, test the
checkpoint on AG-VPReID (A2G, G2A, overall) and on the MARS layout with its `info/` files (overall), with the demo
recipe of `configs/demo.yaml` (issue 12's acceptance commands)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farreid.data.layouts import write_layout
from tests.test_runs import CONFIGS, run_farreid

DEMO = [
    "--config",
    str(CONFIGS / "demo.yaml"),
    "--trainer.enable_progress_bar",
    "false",
    "--evaluator.figures",
    "false",
]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("cli-layouts")
    return {name: str(write_layout(base / name, name, 10, 4, seed=2)) for name in ("agvpreid", "mars")}


def results(run_root: Path, index: int) -> dict:
    dirs = sorted(run_root.glob("test-*"))
    return json.loads((dirs[index] / "results.json").read_text())


@pytest.mark.slow
def test_fit_on_agvpreid_then_test_on_agvpreid_and_on_mars(layouts, tmp_path):
    root = tmp_path / "runs" / "ag"
    common = [*DEMO, "--trainer.default_root_dir", str(root)]
    fit = run_farreid("fit", *common, "--data.dataset", "agvpreid", "--data.root", layouts["agvpreid"],
                      "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", cwd=tmp_path)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert (root / "checkpoints" / "last.ckpt").is_file() and len(list(root.glob("fit-*"))) == 1
    assert "A2G" in fit.stdout and "G2A" in fit.stdout  # validation re-created both cases from held-out identities

    same = run_farreid("test", *common, "--data.dataset", "agvpreid", "--data.root", layouts["agvpreid"],
                       "--ckpt_path", "last", cwd=tmp_path)  # fmt: skip
    assert same.returncode == 0, same.stderr[-2000:]
    ag = results(root, 0)
    assert set(ag) >= {"A2G", "G2A", "overall", "case_mean"} and "A2A" not in ag
    assert all(0.0 <= ag[case]["mAP"] <= 1.0 for case in ("A2G", "G2A", "overall"))
    assert ag["run"]["data"]["trained_on"]["dataset"] == "agvpreid"
    assert ag["run"]["data"]["tested_on"]["dataset"] == "agvpreid"

    cross = run_farreid("test", *common, "--data.dataset", "mars", "--data.root", layouts["mars"],
                        "--ckpt_path", "last", cwd=tmp_path)  # fmt: skip
    assert cross.returncode == 0, cross.stderr[-2000:]
    mars = results(root, 1)
    assert set(mars) >= {"all", "overall"} and 0.0 <= mars["overall"]["mAP"] <= 1.0
    assert mars["overall"]["num_query"] == 4  # one query per test identity (info/query_IDX.mat)
    assert mars["run"]["checkpoint"] == str(root / "checkpoints" / "last.ckpt")
    assert mars["run"]["data"]["trained_on"] == {"dataset": "agvpreid", "root": layouts["agvpreid"], "options": None}
    assert mars["run"]["data"]["tested_on"] == {"dataset": "mars", "root": layouts["mars"]}
