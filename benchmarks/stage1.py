"""Stage 1 (text prompts on the frozen image side): step time on cached image features vs the online path.

Usage: ``python benchmarks/stage1.py [--clips 4] [--frames 8] [--runs 3]``. Random weights at the real CLIP
ViT-B/16 widths and depths (vision and text towers, no download), input 256x128, the paper's adapters and camera
prompts. One training step = stage-1 losses, backward into the context vectors, AdamW step:

- online (``model.stage1_features=online``, the old default): the frozen backbone encodes the batch's clips;
- cached (the default): the clips' features are rows of the cache, computed once before training.

Both run in the same process, alternating, median over ``--runs`` after a warm-up; the ratio is what counts (the
machine may be shared). Data loading is not timed: the cached path also decodes no frame during training.
ViT-L/14 is estimated on paper: FLOPs of the same step counted on the meta device (no weights, no compute).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from farreid.models.backbone import CLIPVisionBackbone
from farreid.models.text import TextPromptLearner
from farreid.module import ReIDModule
from farreid.optim import WarmupCosine
from farreid.text_stage import cache_image_features

VISION = {
    "vitb16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   patch_size=16, image_size=224, projection_dim=512),
    "vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                   patch_size=14, image_size=224, projection_dim=768),
}  # fmt: skip
TEXT = {
    "vitb16": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                   projection_dim=512),
    "vitl14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   projection_dim=768),
}  # fmt: skip
CLIP_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
PAPER = {"trainable_blocks": 2, "adapter_dim": 256, "prompt_blocks": 9, "prompt_tokens": 4, "mid_block": -4}
NUM_CLASSES = 600  # of the order of DetReIDX's training identities; only the context rows of a batch train


def build(name: str, features: str) -> ReIDModule:
    backbone = CLIPVisionBackbone(config=VISION[name], gradient_checkpointing=False, **PAPER)
    return ReIDModule(
        backbone=backbone,
        num_classes=NUM_CLASSES,
        text=lambda n: TextPromptLearner(n, config={**TEXT[name], **CLIP_TEXT}),
        stage=1,
        stage1_features=features,
        lr_scheduler=functools.partial(WarmupCosine, warmup_steps=0),
    )


def batch(clips: int, frames: int) -> dict:
    return {
        "frames": torch.randn(clips, frames, 3, 256, 128),
        "mask": torch.ones(clips, frames, dtype=torch.bool),
        "camid": torch.arange(clips) % 3,
        "label": torch.arange(clips) % NUM_CLASSES,
        "index": torch.arange(clips),
    }


def step(model: ReIDModule, optimizer: torch.optim.Optimizer, data: dict) -> None:
    losses = model.losses(data)
    sum(losses.values()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(clips: int, frames: int, runs: int) -> None:
    torch.manual_seed(0)
    online = build("vitb16", "online").train()
    cached = build("vitb16", "cached").train()
    cached.load_state_dict(online.state_dict())
    data = batch(clips, frames)
    start = time.perf_counter()
    # The cache of one batch's clips, as on_fit_start computes it for the whole training set.
    cached.image_bank = cache_image_features(cached, [data])
    cache_seconds = (time.perf_counter() - start) / clips
    optimizers = [m.build_optimizer() for m in (online, cached)]
    times: list[list[float]] = [[], []]
    for run in range(runs + 1):
        for i, model in enumerate((online, cached)):
            start = time.perf_counter()
            step(model, optimizers[i], data)
            if run:  # the first run is a warm-up
                times[i].append(time.perf_counter() - start)
    t_online, t_cached = statistics.median(times[0]), statistics.median(times[1])
    print(f"ViT-B/16 at 256x128, {clips} clips x {frames} frames per step, CPU, {torch.get_num_threads()} threads")
    print(f"  online step (frozen backbone forward + prompts): {t_online * 1e3:9.1f} ms")
    print(f"  cached step (cache rows + prompts):              {t_cached * 1e3:9.1f} ms")
    print(f"  step-time ratio online / cached:                 {t_online / t_cached:9.1f}x")
    print(f"  one-time cache cost: {cache_seconds * 1e3:.1f} ms per training tracklet (one eval forward)")


def flops_on_paper(name: str, clips: int, frames: int) -> tuple[float, float, float]:
    """(online step, cached step, cache per tracklet) FLOPs of `name`, counted on the meta device.

    A step is the frozen image forward (online only) plus the text side: forward and backward of the batch's
    prompts through the text tower (both paths). The SupCon losses (a clips x clips matrix) are left out.
    """
    with torch.device("meta"):
        model = build(name, "online").train()
        data = batch(clips, frames)
    # Meta tensors hold no values: skip the host-side camera-id range check.
    model.backbone.camera_prompts.check_camids = lambda camids: None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(data["frames"], data["camid"])
    image = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model.text(data["label"]).float().square().sum().backward()
    text = counter.get_total_flops()
    return float(image + text), float(text), float(image / clips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=4, help="clips per training step (P x K; 32 in the recipe)")
    parser.add_argument("--frames", type=int, default=8, help="T, frames per clip")
    parser.add_argument("--runs", type=int, default=3, help="timed steps per path (after one warm-up)")
    args = parser.parse_args()
    measure(args.clips, args.frames, args.runs)
    print(f"On paper (FLOPs of one step, {32} clips x {args.frames} frames as in the recipe's P=8, K=4):")
    for name in ("vitb16", "vitl14"):
        online, cached, per_tracklet = flops_on_paper(name, 32, args.frames)
        print(
            f"  {name}: online {online / 1e12:7.2f} TFLOP, cached {cached / 1e9:7.2f} GFLOP, ratio "
            f"{online / cached:6.0f}x; cache {per_tracklet / 1e9:6.1f} GFLOP per tracklet, once"
        )


if __name__ == "__main__":
    main()
