"""The shipped configs at their real sizes on the CPU (slow tier): ViT-L/14 with random weights through preflight's
real fit step, and configs/vitl14.yaml and configs/baseline.yaml unchanged through the console script on a tiny
random CLIP with the patch size of their backbone."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import CLIPConfig, CLIPModel

from farreid.tools import preflight
from farreid.tools.preflight_measure import parameter_counts
from tests.conftest import TINY_TEXT_CONFIG, TINY_VISION_CONFIG, write_clip_bpe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


class GradientRecorder(Callback):
    """Records, at the first optimizer step, which parameters have a gradient, the loss and the module's counts."""

    seen: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        GradientRecorder.seen.setdefault("loss", float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if "grads" in GradientRecorder.seen:
            return
        named = dict(pl_module.named_parameters())
        GradientRecorder.seen.update(
            grads={n for n, p in named.items() if p.grad is not None},
            trainable={n for n, p in named.items() if p.requires_grad},
            counts=parameter_counts(pl_module),
            depth=len(pl_module.backbone.blocks),
            grid=pl_module.backbone.patch_grid(256, 128),
            positions=[tuple(t.shape) for t in pl_module.backbone._pos_cache.values()],
        )


@pytest.mark.slow
def test_vitl14_at_real_size_trains_exactly_what_the_config_trains(small_release, tmp_path, monkeypatch):
    """configs/vitl14.yaml's model at ViT-L/14 size (random weights), 256x128, the config's T = 16, a batch of 2
    clips: one real training step and backward in Lightning's fit loop, then preflight's report of it."""
    monkeypatch.delenv("FARREID_CLIP", raising=False)
    GradientRecorder.seen = {}
    args = ["--config", str(CONFIGS / "vitl14.yaml"), "--data.root", small_release, "--random-weights",
            "--architecture", "vit-l-14", "--steps", "1", "--warmup", "0", "--data.p", "1", "--data.k", "2",
            "--data.batch_size_test", "2", "--data.num_frames_test", "4", "--data.num_workers", "0",
            "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.callbacks+=tests.test_real_size.GradientRecorder"]  # fmt: skip
    assert preflight.main(args) == 0
    seen = GradientRecorder.seen
    assert torch.isfinite(torch.tensor(seen["loss"]))
    assert seen["grads"] == seen["trainable"]  # a gradient on every trained weight and on nothing frozen
    trained_blocks = {n.split(".")[2] for n in seen["trainable"] if n.startswith("backbone.blocks.") and ".layer." in n}
    assert seen["depth"] == 24 and trained_blocks == {"22", "23"}  # trainable_blocks: 2, the last two
    assert not any(n.startswith("text.") for n in seen["trainable"])  # stage 2: the text side is frozen
    assert seen["grid"] == (18, 9) and (1, 163, 1024) in seen["positions"]  # 252x126 seen: 18x9 patches + CLS
    report = json.loads(next(tmp_path.glob("preflight-*/preflight.json")).read_text())
    assert report["parameters"] == seen["counts"]
    assert report["parameters"]["total"] > 300_000_000  # the ViT-L/14 vision tower alone is ~304 M


def _clip_dir(path: Path, patch: int) -> Path:
    """A tiny random CLIPModel directory (weights, config, tokenizer) whose vision tower has `patch`-pixel patches."""
    torch.manual_seed(0)
    vision = {**TINY_VISION_CONFIG, "patch_size": patch, "image_size": 4 * patch}
    CLIPModel(CLIPConfig(text_config=TINY_TEXT_CONFIG, vision_config=vision, projection_dim=16)).save_pretrained(path)
    write_clip_bpe(path, TINY_TEXT_CONFIG["bos_token_id"], TINY_TEXT_CONFIG["eos_token_id"])
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("config", "patch"), [("vitl14.yaml", 14), ("baseline.yaml", 16)])
def test_shipped_config_runs_unchanged_on_a_clip_of_its_patch_size(make_release, tmp_path, config, patch):
    """The config's own image size (256x128), T (16) and P x K (4 x 8): stage 1, then stage 2 for one step and one
    evaluation batch, through the installed console script, on a tiny random CLIP directory."""
    root = make_release(num_train_ids=8, num_test_ids=3, seed=4, min_frames=3, max_frames=5)
    env = {"FARREID_DATA": str(root), "FARREID_CLIP": str(_clip_dir(tmp_path / "clip", patch)), "WANDB_MODE": "offline"}
    (tmp_path / "configs").symlink_to(CONFIGS)
    script = Path(sys.executable).with_name("farreid")
    short = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
             "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
             "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
             "--evaluator.figures", "false"]  # fmt: skip
    for extra in (["--config", "configs/stage1.yaml"], []):
        done = subprocess.run(
            [str(script), "fit", "--config", f"configs/{config}", *extra, *short],
            cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    assert f"with {patch}-pixel patches" in done.stdout or 256 % patch == 0  # 256x128 cropped only for patch 14
    assert "val" in done.stdout and "overall" in done.stdout  # the evaluation batch was scored
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
