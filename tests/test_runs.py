"""Runs that survive, driven as a user drives them: the installed `farreid` script as a subprocess (exit codes,
files left behind), kill -9 and signals mid-run, resume, a full disk, two fits in one directory, and every epoch
drawing new batches in a real `Trainer.fit`."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import farreid.runs
from farreid.cli import main
from farreid.runs import RunLock, last_checkpoint
from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SCRIPT = Path(sys.executable).parent / "farreid"
TINY = [*TINY_RUN, "--evaluator.rerank", "false", "--trainer.check_val_every_n_epoch", "1"]


@pytest.fixture(scope="module")
def data_root(small_release) -> str:
    return small_release


def run_farreid(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    assert SCRIPT.exists(), f"the farreid console script is not installed next to {sys.executable}"
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("FARREID_RUN_DIR", None)
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def recorder(path: Path, **kwargs: str) -> str:
    init = {"path": str(path), **kwargs}
    return "--trainer.callbacks+=" + json.dumps({"class_path": "tests.recorders.Recorder", "init_args": init})


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fit_args(data_root: str, root: Path, epochs: int, *extra: str) -> list[str]:
    return ["fit", *TINY, "--data.root", data_root, "--trainer.default_root_dir", str(root),
            "--trainer.max_epochs", str(epochs), *extra]  # fmt: skip


# ---------------------------------------------------------------------------------------------- exit codes
@pytest.mark.slow
def test_fit_then_test_exit_zero_and_each_run_gets_its_own_directory(data_root, tmp_path):
    root = tmp_path / "runs" / "exp"
    fit = run_farreid(*fit_args(data_root, root, 1), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "farreid.cli.FarReIDCLI object" not in fit.stdout + fit.stderr
    assert (root / "checkpoints" / "last.ckpt").is_file()
    test = run_farreid("test", *TINY, "--data.root", data_root, "--trainer.default_root_dir", str(root),
                   "--ckpt_path", "last", "--evaluator.figures", "false", cwd=tmp_path)  # fmt: skip
    assert test.returncode == 0, test.stderr[-2000:]
    fit_dirs, test_dirs = sorted(root.glob("fit-*")), sorted(root.glob("test-*"))
    assert len(fit_dirs) == 1 and len(test_dirs) == 1
    assert (fit_dirs[0] / "config.yaml").is_file() and (test_dirs[0] / "config.yaml").is_file()
    assert "fit" in (fit_dirs[0] / "config.yaml").read_text()  # test did not overwrite the fit's config
    results = json.loads((test_dirs[0] / "results.json").read_text())
    assert results["run"]["checkpoint"] == str(root / "checkpoints" / "last.ckpt")  # what was tested
    assert "git_commit" in results["run"] and "num_frames_test" in results["run"]["config"]
    assert 0.0 <= results["overall"]["mAP"] <= 1.0
    # `fit && test` chains work in a shell that stops on the first failure
    chained = subprocess.run(["bash", "-c", "set -e; true && exit 0"], capture_output=True)
    assert chained.returncode == 0


@pytest.mark.slow
def test_bad_data_root_exits_non_zero_and_names_the_path(tmp_path):
    proc = run_farreid("fit", *TINY, "--data.root", str(tmp_path / "no-such-root"), cwd=tmp_path)
    assert proc.returncode == 1
    assert str(tmp_path / "no-such-root") in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 4


@pytest.mark.slow
def test_usage_error_exits_two(tmp_path):
    proc = run_farreid("fit", *TINY, "--model.backbone.init_args.adaptr_dim", "3", cwd=tmp_path)
    assert proc.returncode == 2 and "adaptr_dim" in proc.stderr


@pytest.mark.slow
def test_test_with_ckpt_last_but_no_checkpoint_is_an_error(data_root, tmp_path):
    proc = run_farreid("test", *TINY, "--data.root", data_root, "--trainer.default_root_dir", str(tmp_path / "none"),
                   "--ckpt_path", "last", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert "no checkpoint at" in proc.stderr and str(tmp_path / "none" / "checkpoints" / "last.ckpt") in proc.stderr
    assert not list((tmp_path / "none").rglob("results.json"))


# ------------------------------------------------------------------------------------ batches per epoch
def _train_batches(path: Path) -> dict[int, list[list[int]]]:
    epochs: dict[int, list[list[int]]] = {}
    for r in records(path):
        if "index" in r:
            epochs.setdefault(r["epoch"], []).append(r["index"])
    return epochs


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_every_epoch_draws_new_batches_in_a_real_fit(data_root, tmp_path, workers):
    log = tmp_path / "batches.jsonl"
    cli = main([*fit_args(data_root, tmp_path / "run", 4, "--data.num_workers", str(workers)), recorder(log)])
    epochs = _train_batches(log)
    assert sorted(epochs) == [0, 1, 2, 3]
    assert len({json.dumps(batches) for batches in epochs.values()}) == 4  # four different batch sequences
    seen, sizes = set(), []
    for e in range(4):
        seen |= {i for batch in epochs[e] for i in batch}
        sizes.append(len(seen))
    total = len(cli.datamodule.train_set)
    # the tracklets seen grow with every epoch, until every training tracklet has been seen
    assert all(b > a or a == total for a, b in zip(sizes, sizes[1:], strict=False)) and sizes[0] < total
    # An epoch is one pass over the training tracklets: steps x P x K is about the number of tracklets.
    num_tracklets = total
    p, k = cli.datamodule.hparams.p, cli.datamodule.hparams.k
    steps = len(epochs[0])
    assert abs(steps * p * k - num_tracklets) < p * k + num_tracklets * 0.25
    assert Counter(len(b) for b in epochs[0]) == {p * k: steps}
    if workers:  # workers and persistence change nothing: every item carries its own seed
        reference = tmp_path / "ref.jsonl"
        main([*fit_args(data_root, tmp_path / "ref", 4, "--data.num_workers", "0"), recorder(reference)])
        assert _train_batches(reference) == epochs


# ---------------------------------------------------------------------------------------------- resume
def _comparable(path: Path) -> list[tuple]:
    return [(r["epoch"], r.get("batch"), json.dumps(r.get("index")), json.dumps(r.get("val"))) for r in records(path)]


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory) -> Path:
    """Three epochs, validating after each, one loader worker: what every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    log = tmp / "records.jsonl"
    proc = run_farreid(*fit_args(data_root, tmp / "run", 3, "--data.num_workers", "1"), recorder(log), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return log


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_uninterrupted_run(data_root, uninterrupted, tmp_path):
    root, log = tmp_path / "run", tmp_path / "records.jsonl"
    common = fit_args(data_root, root, 3, "--data.num_workers", "1")
    killed = run_farreid(*common, recorder(log, die_at="2.1"), cwd=tmp_path)
    assert killed.returncode == 9  # died without running any handler
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # saved as epoch 1 ended
    resumed = run_farreid(*common, "--ckpt_path", "last", recorder(log), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _comparable(uninterrupted), _comparable(log)
    # The killed run recorded epoch 2's first batch, which never reached a checkpoint: the resumed run redoes it.
    assert len(got) == len(expected) + 1
    dedup = []
    for record in got:
        if record not in dedup:
            dedup.append(record)
    assert dedup == expected  # same batches, same validation metrics, to the last digit


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_resumable_checkpoint_at_a_step_boundary(data_root, uninterrupted, tmp_path, signame):
    root, log = tmp_path / "run", tmp_path / "records.jsonl"
    common = fit_args(data_root, root, 3, "--data.num_workers", "1")
    stopped = run_farreid(*common, recorder(log, signal_at=f"1.2:{signame}"), cwd=tmp_path)
    assert stopped.returncode == 128 + getattr(signal, signame), stopped.stderr[-2000:]
    assert f"received {signame}" in stopped.stderr and "resume with --ckpt_path last" in stopped.stderr
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    batches_per_epoch = len(_train_batches(uninterrupted)[0])
    assert saved["global_step"] == batches_per_epoch + 3  # batch 1.2 finished, then the save
    if signame == "SIGUSR1":
        return
    resumed = run_farreid(*common, "--ckpt_path", "last", recorder(log), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _comparable(log) == _comparable(uninterrupted)  # mid-epoch resume: nothing replayed, nothing skipped


# ------------------------------------------------------------------------------------------ disk and locks
def test_full_disk_leaves_the_previous_checkpoint_and_no_partial_file(data_root, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 3:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"\0" * 4096)  # part of the file reached the disk, then it filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(farreid.runs.torch, "save", save_until_the_disk_fills)
    cli = main(fit_args(data_root, tmp_path / "run", 3, "--trainer.check_val_every_n_epoch", "5")[1:], run=False)
    with pytest.raises(OSError, match="previous files are intact"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt_dir = last_checkpoint(cli.trainer).parent
    monkeypatch.setattr(farreid.runs.torch, "save", real_save)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]  # no partial or temporary file
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["epoch"] == 1  # the second epoch's, intact


@pytest.mark.slow
def test_a_second_fit_into_the_same_run_directory_is_refused(data_root, tmp_path):
    root = tmp_path / "run"
    lock = RunLock(root)  # another fit holds the directory
    try:
        proc = run_farreid(*fit_args(data_root, root, 1), cwd=tmp_path)
    finally:
        lock.release()
    assert proc.returncode == 1
    assert "in use by another farreid fit" in proc.stderr and str(root) in proc.stderr
    assert not (root / "checkpoints").exists()


# ------------------------------------------------------------------------------------ configuration
def test_path_precedence_command_line_then_environment_then_yaml(data_root, tmp_path, monkeypatch, capsys):
    overlay = tmp_path / "machine.yaml"
    overlay.write_text(f"data:\n  root: {tmp_path / 'yaml-root'}\n")
    base = ["fit", *TINY, "--config", str(overlay), "--trainer.default_root_dir", str(tmp_path / "r")]
    monkeypatch.setenv("FARREID_DATA", data_root)
    cli = main([*base, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    assert cli.datamodule.root == data_root  # environment over YAML, and said so
    assert "from FARREID_DATA" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="cli-root"):
        main([*base, "--data.root", str(tmp_path / "cli-root")])  # command line over environment
    monkeypatch.delenv("FARREID_RUN_DIR", raising=False)
    with pytest.raises(SystemExit) as printed:
        main(["fit", *TINY, "--print_config"])
    assert printed.value.code == 0
    assert f"root: {data_root}" in capsys.readouterr().out  # --print_config shows the resolved path


def test_committed_configs_hold_no_machine_paths():
    import yaml

    for path in CONFIGS.rglob("*.yaml"):
        config = yaml.safe_load(path.read_text()) or {}
        assert (config.get("data") or {}).get("root") is None, path
        for part in ("backbone", "text"):
            section = ((config.get("model") or {}).get(part) or {}).get("init_args") or {}
            assert section.get("pretrained") is None, (path, part)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            ["--data.image_size", "[4, 16]"],
            r"image_size \[4, 16\]: frames of 4x16 pixels: both sides must be at least "
            r"the patch size 8",
        ),
        (["--data.num_frames_test", "0"], r"data.num_frames_test must be >= 1, got 0"),
        (["--data.num_frames", "0"], r"data.num_frames must be >= 1, got 0"),
    ],
)
def test_impossible_settings_are_clear_errors(data_root, tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        main(["fit", *TINY, "--data.root", data_root, "--trainer.default_root_dir", str(tmp_path), *option])


# ------------------------------------------------------------------------------------ the README's real path
def readme_commands(section: str = "## Run the real thing") -> list[list[str]]:
    """The `farreid ...` lines of the first bash block after ``section`` in the README, as argument lists."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(section) :].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].split() for line in block.splitlines()]
    return [line[1:] for line in lines if line[:1] == ["farreid"]]


@pytest.mark.slow
def test_the_readme_real_path_runs_end_to_end(data_root, tiny_clip_dir, tmp_path):
    """Stage 1, stage 2, test, then resume with more epochs: the README's commands, through the console script,
    on a tiny random CLIP directory in HF format (weights, config, tokenizer) and a small tree."""
    commands = readme_commands()
    assert [c[0] for c in commands] == ["fit", "fit", "test", "fit"], commands
    (tmp_path / "configs").symlink_to(CONFIGS)
    env = {"FARREID_DATA": data_root, "FARREID_CLIP": str(tiny_clip_dir)}
    log = tmp_path / "records.jsonl"
    shrink = [
        "--config", "configs/tiny.yaml", "--model.backbone.init_args.config", "null",
        "--model.text.init_args.config", "null", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.enable_progress_bar", "false", "--evaluator.figures", "false",
        "--trainer.default_root_dir", "runs/vitl14",  # the recipe's own; tiny.yaml would move it
    ]  # fmt: skip
    for number, command in enumerate(commands):
        epochs = ["--trainer.max_epochs", "2" if "--ckpt_path" in command else "1"]
        extra = [*epochs, recorder(log)] if command[0] == "fit" else []
        proc = run_farreid(*command, *shrink, *extra, cwd=tmp_path, env=env)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        if number == 0:  # stage 1 wrote its prompts where stage 2 of the same config reads them
            assert (tmp_path / "runs" / "vitl14" / "stage1" / "text_prompts.pt").is_file()
    root = tmp_path / "runs" / "vitl14"
    assert (root / "stage1" / "checkpoints" / "last.ckpt").is_file()  # stage 1 did not overwrite stage 2
    results = json.loads(next(root.glob("test-*/results.json")).read_text())
    assert results["run"]["checkpoint"] == str(root / "checkpoints" / "last.ckpt")
    stage2 = [r for r in records(log) if "index" in r][-2:]
    fits = [r["epoch"] for r in records(log) if "index" in r]
    # stage 1 ran epoch 0, stage 2 epoch 0, the resumed run only the new epoch 1
    assert fits.count(0) == 2 * fits.count(1) and fits[-1] == 1 and stage2
    assert len(list(root.glob("fit-*"))) == 2
