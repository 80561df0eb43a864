"""Running for real: DDP on CPU, kill-and-resume, offline W&B, determinism (issue: scale out)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from farreid.cli import configure_wandb_mode, main
from farreid.runs import last_checkpoint
from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BASE = [
    *TINY_RUN,
    "--evaluator.rerank",
    "false",
    "--trainer.check_val_every_n_epoch",
    "1",
]


@pytest.fixture(scope="module")
def data_root(small_release) -> str:
    return small_release


def _farreid(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "farreid.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_ddp_fit_and_evaluation_match_one_process(data_root, tmp_path):
    """A 2-rank gloo run trains, and its gathered evaluation equals the 1-process one on the same checkpoint."""
    common = [*BASE, "--data.root", data_root, "--data.test_split", "val", "--trainer.logger", "false"]
    log = tmp_path / "batches.jsonl"
    recorder = {"class_path": "tests.recorders.Recorder", "init_args": {"path": str(log)}}
    _farreid(
        "fit",
        *common,
        f"--trainer.callbacks+={json.dumps(recorder)}",
        "--trainer.max_epochs",
        "2",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path / "fit"),
        cwd=tmp_path,
    )
    ckpts = sorted((tmp_path / "fit").rglob("last.ckpt"))
    assert ckpts, "the DDP fit wrote no checkpoint"
    # Every epoch draws new batches on every rank, and no identity is on two ranks at the same step.
    batches = [b for b in map(json.loads, log.read_text().splitlines()) if "index" in b]
    by = {(b["rank"], b["epoch"]): [] for b in batches}
    for b in batches:
        by[(b["rank"], b["epoch"])].append(b)
    assert sorted(by) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for rank in (0, 1):
        assert [b["index"] for b in by[(rank, 0)]] != [b["index"] for b in by[(rank, 1)]]
    for epoch in (0, 1):
        assert len(by[(0, epoch)]) == len(by[(1, epoch)]) > 0
        for mine, theirs in zip(by[(0, epoch)], by[(1, epoch)], strict=True):
            assert not set(mine["label"]) & set(theirs["label"])
    results = {}
    for devices in ("1", "2"):
        out = tmp_path / f"test{devices}"
        _farreid(
            "test",
            *common,
            "--ckpt_path",
            str(ckpts[0]),
            "--trainer.devices",
            devices,
            "--trainer.strategy",
            "ddp" if devices == "2" else "auto",
            "--trainer.default_root_dir",
            str(out),
            "--evaluator.figures",
            "false",
            cwd=tmp_path,
        )
        results[devices] = json.loads(next(out.glob("test-*/results.json")).read_text())
    for case in ("A2G", "G2A", "A2A", "overall"):
        assert results["1"][case]["num_query"] == results["2"][case]["num_query"]
        for metric in ("mAP", "rank1", "mINP"):
            assert results["1"][case][metric] == pytest.approx(results["2"][case][metric], abs=1e-6), (case, metric)


def test_offline_wandb_run_records_per_case_metrics(data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert configure_wandb_mode() == "offline"
    logger = [
        "--trainer.logger=WandbLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.project=farreid-test",
        "--trainer.logger.offline=true",
        "--trainer.callbacks+=LearningRateMonitor",
    ]
    cli = main(
        [
            "fit",
            *BASE,
            "--data.root",
            data_root,
            *logger,
            "--trainer.max_epochs",
            "1",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    cli.trainer.logger.experiment.finish()  # the end of a job
    expected = [f"val/{case}/mAP".encode() for case in ("A2G", "G2A", "A2A", "overall")]
    expected += [b"trainable_blocks", b"lr-Adam", b"train/loss"]  # the resolved config, the groups' LRs, the loss
    record = _wait_for_wandb_records(tmp_path, expected)
    for key in expected:
        assert key in record, key


def _wait_for_wandb_records(root: Path, expected: list[bytes], timeout: float = 120.0) -> bytes:
    """The offline run's protobuf log (metric keys and the config are stored as strings) once it holds `expected`.

    W&B's service process writes the log after `finish()` returns, on its own schedule: a single read races it (seen:
    a file holding only its header). Polls until every key is there or `timeout` seconds pass, then returns what the
    file holds, so that the caller's assertion names the missing key.
    """
    deadline = time.monotonic() + timeout
    record = b""
    while True:
        runs = sorted(root.rglob("offline-run-*/run-*.wandb"))
        record = runs[0].read_bytes() if runs else b""
        if all(key in record for key in expected) or time.monotonic() > deadline:
            assert runs, f"no offline W&B run under {root} after {timeout:.0f} s"
            return record
        time.sleep(0.2)


def test_wandb_mode_respects_credentials(tmp_path):
    env = {"WANDB_API_KEY": "x" * 40, "NETRC": str(tmp_path / "none")}
    assert configure_wandb_mode(env) == "online"
    env = {"NETRC": str(tmp_path / "none")}
    assert configure_wandb_mode(env) == "offline" and env["WANDB_MODE"] == "offline"
    assert configure_wandb_mode({"WANDB_MODE": "disabled"}) == "disabled"


def test_same_seed_gives_the_same_metrics_twice(data_root, tmp_path):
    runs = []
    for i in range(2):
        cli = main(
            [
                "fit",
                *BASE,
                "--data.root",
                data_root,
                "--trainer.logger",
                "false",
                "--trainer.max_epochs",
                "1",
                "--trainer.limit_train_batches",
                "3",
                "--trainer.default_root_dir",
                str(tmp_path / str(i)),
            ]
        )
        runs.append({k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")})
    assert runs[0] and runs[0] == runs[1]


def test_frozen_backbone_checkpoint_is_small_and_tests(data_root, tiny_clip_dir, tmp_path):
    """With a frozen pretrained backbone the checkpoint keeps only what trains; `test` restores the rest."""
    frozen = [
        *BASE,
        "--data.root",
        data_root,
        "--model.backbone.init_args.config",
        "null",
        "--model.backbone.init_args.pretrained",
        str(tiny_clip_dir),
        "--model.backbone.init_args.trainable_blocks",
        "0",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    fit = main(["fit", *frozen, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    ckpt = last_checkpoint(fit.trainer)
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert saved["farreid"]["pretrained"] == str(tiny_clip_dir)
    assert not any(k.startswith("backbone.blocks.0.layer.") for k in saved["state_dict"])
    full_bytes = sum(v.numel() * v.element_size() for v in fit.model.state_dict().values())
    kept_bytes = sum(v.numel() * v.element_size() for v in saved["state_dict"].values())
    assert kept_bytes < full_bytes
    trained = {k: v.clone() for k, v in fit.model.state_dict().items()}
    tested = main(
        ["test", *frozen, "--ckpt_path", str(ckpt), "--data.test_split", "val", "--evaluator.figures", "false"]
    )
    for key, value in tested.model.state_dict().items():
        assert torch.equal(value, trained[key]), key
