"""The GPU tier (`make test-gpu`, marker `gpu`): what only a CUDA device can show. Skipped, with the reason, without
one: bf16 autocast with float32 losses, device scoring and re-ranking equal to the CPU, faiss-gpu equal to exact
search, activation checkpointing's memory saving against docs/GPU.md, `compile: true` against eager, 2-GPU DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from farreid.cli import main
from tests.conftest import TINY_RUN

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the GPU tier needs one"),
]
GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
# docs/GPU.md: a checkpointed ViT-L/14 block frees its saved activations but its input, (40.1 - 4) KiB per token.
PREDICTED_KIB_PER_TOKEN_PER_BLOCK = 36.1


def clustered(num: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, num // 6), dim, generator=g)
    points = centres[torch.randint(len(centres), (num,), generator=g)] + 0.6 * torch.randn(num, dim, generator=g)
    return F.normalize(points, dim=1)


class LossDtypes(Callback):
    seen: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        LossDtypes.seen.append((outputs["loss"].dtype, torch.isfinite(outputs["loss"]).item()))


def test_bf16_fit_keeps_the_losses_in_float32(small_release, tmp_path):
    LossDtypes.seen = []
    args = ["fit", *TINY_RUN, *GPU, "--data.root", small_release, "--trainer.precision", "bf16-mixed",
            "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir",
            str(tmp_path), "--trainer.callbacks+=tests.test_gpu.LossDtypes"]  # fmt: skip
    fit = main(args)
    assert fit.model.device.type == "cuda"
    assert LossDtypes.seen and all(dtype == torch.float32 and finite for dtype, finite in LossDtypes.seen)


def test_device_scoring_and_reranking_equal_the_cpu():
    from farreid.evaluation.scoring import distances

    feats = clustered(600)
    query, gallery = feats[:150], feats[150:]
    params = {"k1": 20, "k2": 6, "lambda_value": 0.3, "approx_candidates": None}
    for rerank in (None, params):
        cpu, cpu_rank = distances(query, gallery, rerank)
        gpu, gpu_rank = distances(query.cuda(), gallery.cuda(), rerank)
        np.testing.assert_allclose(gpu, cpu, atol=1e-5, rtol=0)
        assert (gpu_rank[:, :10] == cpu_rank[:, :10]).mean() > 0.99  # ties may swap


def test_faiss_gpu_search_equals_exact_search():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("this FAISS build has no GPU support (install the `gpu` extra: faiss-gpu)")
    from farreid.evaluation.search import topk

    feats = clustered(3000, dim=128, seed=1)
    query, gallery = feats[:300], feats[300:]
    exact, exact_idx = topk(query, gallery, 20, use_faiss=False)
    found, found_idx = topk(query.cuda(), gallery.cuda(), 20, use_faiss=True)
    torch.testing.assert_close(found.cpu(), exact.cpu(), atol=1e-4, rtol=0)
    assert (found_idx.cpu() == exact_idx.cpu()).float().mean() > 0.99


def _peak(checkpoint_blocks: int, frames: torch.Tensor, camids: torch.Tensor) -> tuple[int, int]:
    from farreid.models.backbone import CLIPVisionBackbone
    from farreid.models.clip_dir import ARCHITECTURES

    torch.manual_seed(0)
    backbone = CLIPVisionBackbone(
        config=ARCHITECTURES["vit-l-14"]["vision"], trainable_blocks=2, adapter_dim=256, prompt_blocks=9,
        checkpoint_blocks=checkpoint_blocks,
    ).cuda().train()  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = backbone.forward_features(frames, camids)
    peak = torch.cuda.max_memory_allocated() - base
    out.cls.float().sum().backward()
    tokens = frames.shape[0] * frames.shape[1] * (1 + backbone.patch_grid(*frames.shape[-2:])[0]
                                                  * backbone.patch_grid(*frames.shape[-2:])[1])  # fmt: skip
    del backbone, out
    torch.cuda.empty_cache()
    return peak, tokens


def test_activation_checkpointing_frees_what_docs_gpu_predicts_per_block():
    frames = torch.randn(2, 8, 3, 256, 128, device="cuda")
    camids = torch.tensor([0, 1], device="cuda")
    full, tokens = _peak(0, frames, camids)
    saved, _ = _peak(8, frames, camids)
    per_block_kib = (full - saved) / 8 / tokens / 1024
    assert 0.75 * PREDICTED_KIB_PER_TOKEN_PER_BLOCK < per_block_kib < 1.25 * PREDICTED_KIB_PER_TOKEN_PER_BLOCK, (
        f"{per_block_kib:.1f} KiB per token per checkpointed block (docs/GPU.md: {PREDICTED_KIB_PER_TOKEN_PER_BLOCK})"
    )


def test_compiled_blocks_run_and_match_eager():
    from farreid.models.backbone import CLIPVisionBackbone
    from tests.conftest import TINY_VISION_CONFIG

    torch.manual_seed(0)
    eager = CLIPVisionBackbone(config=TINY_VISION_CONFIG, adapter_dim=8, prompt_blocks=1).cuda().eval()
    compiled = CLIPVisionBackbone(config=TINY_VISION_CONFIG, adapter_dim=8, prompt_blocks=1, compile=True).cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.eval()
    frames, camids = torch.randn(2, 3, 3, 32, 16, device="cuda"), torch.tensor([0, 2], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(compiled(frames, camids), eager(frames, camids), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over 2 GPUs needs 2 CUDA devices")
def test_two_gpu_ddp_fit_and_test_match_one_gpu(small_release, tmp_path):
    script = Path(sys.executable).with_name("farreid")
    env = {**os.environ, "WANDB_MODE": "offline"}
    common = [*TINY_RUN, "--data.root", small_release, "--evaluator.rerank", "false", "--trainer.logger", "false",
              "--trainer.accelerator", "gpu", "--data.test_split", "val", "--evaluator.figures", "false"]  # fmt: skip
    fit = [str(script), "fit", *common, "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "fit")]  # fmt: skip
    assert subprocess.run(fit, env=env, capture_output=True, text=True, timeout=900).returncode == 0
    ckpt = str(next((tmp_path / "fit").rglob("last.ckpt")))
    results = {}
    for devices, strategy in (("1", "auto"), ("2", "ddp")):
        out = tmp_path / f"test{devices}"
        run = [str(script), "test", *common, "--ckpt_path", ckpt, "--trainer.devices", devices, "--trainer.strategy",
               strategy, "--trainer.default_root_dir", str(out)]  # fmt: skip
        done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        results[devices] = json.loads(next(out.glob("test-*/results.json")).read_text())
    for case in ("A2G", "G2A", "A2A", "overall"):
        assert results["1"][case]["mAP"] == pytest.approx(results["2"][case]["mAP"], abs=1e-6)
