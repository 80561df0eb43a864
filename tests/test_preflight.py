"""`farreid preflight`: a few real steps of the configured fit; its report agrees with what `farreid fit` runs."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from farreid.cli import main
from farreid.module import ReIDModule
from farreid.tools import preflight
from farreid.tools.preflight_measure import parameter_counts

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
VITL14 = str(REPO / "configs" / "vitl14.yaml")
QUICK = ["--steps", "1", "--warmup", "0", "--data.num_workers", "0"]


def _report(root: Path) -> dict:
    found = sorted(root.glob("preflight-*/preflight.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def test_report_agrees_with_the_fit_it_previews(small_release, tmp_path):
    args = ["--config", DEMO, "--data.root", small_release, "--data.num_workers", "0"]
    assert preflight.main([*args, *QUICK[:4], "--trainer.default_root_dir", str(tmp_path / "pf")]) == 0
    report = _report(tmp_path / "pf")
    fit = main(["fit", *args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                "--trainer.default_root_dir", str(tmp_path / "fit")])  # fmt: skip
    assert report["steps_per_epoch"] == fit.trainer.num_training_batches
    assert report["parameters"] == parameter_counts(fit.model)
    assert report["verdict"] == "fits" and report["measured_steps"] == 1
    assert 0 < report["peak_memory_bytes"] < report["capacity_bytes"]
    step, loader = report["step_time_s"], report["loader_frames_per_s"]
    assert report["model_frames_per_s"] == pytest.approx(32 * 4 / step)  # P x K = 8 x 4 clips of T = 4 frames
    assert report["bottleneck"] == ("loader" if loader < report["model_frames_per_s"] else "model")
    per_step = max(step, 32 * 4 / loader)
    assert report["projected_epoch_s"] == pytest.approx(per_step * report["steps_per_epoch"])
    assert report["projected_run_s"] == pytest.approx(report["projected_epoch_s"] * 36)  # demo: 36 epochs
    assert set(report["projected_eval_s"]) == {"val", "test"} and report["eval_batch_s"] > 0
    assert not (tmp_path / "pf" / "checkpoints").exists()  # a preflight writes no checkpoint


def test_out_of_memory_is_a_verdict_with_the_setting_to_change(small_release, tmp_path, monkeypatch, capsys):
    def exhausted(self, batch, batch_idx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ReIDModule, "training_step", exhausted)
    args = ["--config", DEMO, "--data.root", small_release, *QUICK, "--trainer.default_root_dir", str(tmp_path)]
    assert preflight.main(args) == preflight.OUT_OF_MEMORY
    report = _report(tmp_path)
    assert report["verdict"] == "out_of_memory" and "Tried to allocate 20.00 GiB" in report["error"]
    assert report["change_first"].startswith("model.backbone.init_args.checkpoint_blocks (now 0 of 4)")
    assert "data.p x data.k (now 8 x 4" in " ".join(report["changes"])
    assert "out_of_memory: change model.backbone.init_args.checkpoint_blocks" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--steps", "0"], "--steps must be a positive number"), (["--steps", "-3"], "--steps must be a positive"),
     (["--model.no_such_key", "1"], "no_such_key")],
)  # fmt: skip
def test_usage_errors_exit_two_and_say_what_is_wrong(small_release, tmp_path, option, message, capsys):
    args = ["--config", DEMO, "--data.root", small_release, "--trainer.default_root_dir", str(tmp_path), *option]
    assert preflight.main(args) == 2
    assert message in capsys.readouterr().err


def test_missing_clip_directory_and_empty_training_split_are_errors(small_release, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FARREID_CLIP", raising=False)
    args = ["--config", VITL14, "--data.root", small_release, "--trainer.default_root_dir", str(tmp_path)]
    assert preflight.main(args) == 1
    assert "FARREID_CLIP" in capsys.readouterr().err  # as `farreid fit` says it
    empty = tmp_path / "empty"
    shutil.copytree(small_release, empty, ignore=lambda d, names: names if Path(d).name == "train" else [])
    args = ["--config", DEMO, "--data.root", str(empty), "--trainer.default_root_dir", str(tmp_path / "e")]
    assert preflight.main(args) == 1
    err = capsys.readouterr().err
    assert "split 'train'" in err and "holds no tracklet" in err
    assert not list((tmp_path / "e").glob("preflight-*/preflight.json"))


def test_random_weights_take_the_directorys_shapes_and_stand_in_for_the_text_prompts(
    small_release, tiny_clip_dir, tmp_path, monkeypatch
):
    shapes_only = tmp_path / "clip"
    shapes_only.mkdir()
    shutil.copy(tiny_clip_dir / "config.json", shapes_only / "config.json")  # no weights, no tokenizer
    monkeypatch.setenv("FARREID_CLIP", str(shapes_only))
    shrink = ["--data.image_size", "[32, 16]", "--data.num_frames", "2", "--data.num_frames_test", "2",
              "--data.p", "2", "--data.k", "2", "--data.batch_size_test", "4", "--trainer.accelerator", "cpu",
              "--trainer.precision", "32-true", "--model.backbone.init_args.checkpoint_blocks", "0"]  # fmt: skip
    args = ["--config", VITL14, "--data.root", small_release, *shrink, *QUICK]
    assert preflight.main([*args, "--random-weights", "--trainer.default_root_dir", str(tmp_path / "pf")]) == 0
    report = _report(tmp_path / "pf")
    monkeypatch.setenv("FARREID_CLIP", str(tiny_clip_dir))
    built = main([*args[: -len(QUICK)], "--trainer.default_root_dir", str(tmp_path / "b")], run=False)
    assert report["parameters"]["total"] == parameter_counts(built.model)["total"]  # the same shapes
    assert next((tmp_path / "pf").glob("preflight-*/random_text_prompts.pt")).is_file()


# ------------------------------------------------------------------ the documented command, as a user runs it
@pytest.mark.slow
def test_console_script_preflight_of_the_demo_matches_farreid_fit(small_release, tmp_path):
    script = Path(sys.executable).with_name("farreid")
    common = ["--config", DEMO, "--data.root", small_release]
    done = subprocess.run([str(script), "preflight", *common, "--steps", "2", "--trainer.default_root_dir",
                           str(tmp_path / "pf")], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "farreid preflight" in done.stdout and "verdict" in done.stdout
    report = _report(tmp_path / "pf")
    fit = subprocess.run([str(script), "fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
                          "--trainer.default_root_dir", str(tmp_path / "fit")], capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    steps = int(re.search(r"\[farreid\] (\d+) steps per epoch", fit.stdout + fit.stderr).group(1))
    assert report["steps_per_epoch"] == steps
    model = ReIDModule.load_from_checkpoint(next((tmp_path / "fit").rglob("last.ckpt")), map_location="cpu")
    assert report["parameters"] == parameter_counts(model)
