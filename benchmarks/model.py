"""Backbone cost at real CLIP shapes: parameters, checkpoint bytes and CPU seconds per clip.

Usage: ``python benchmarks/model.py [--models vitb16 vitl14] [--frames 8] [--runs 3]``. Random weights with the
real widths and depths (no download); input 256x128, batch 1, the paper's settings (last 2 blocks train, adapters
of width 256 in every block, camera prompts in the first 9 blocks). Forward time is the median of ``--runs``
no-grad forwards after one warm-up, with adapters and prompts on and off (plain CLIP loop, run in turn), and the ratio.
"""

import argparse
import io
import statistics
import time

import torch

from farreid.models.backbone import CLIPVisionBackbone
from farreid.models.clip_dir import ARCHITECTURES

SHAPES: dict[str, dict] = {"vitb16": ARCHITECTURES["vit-b-16"]["vision"], "vitl14": ARCHITECTURES["vit-l-14"]["vision"]}
PAPER = {"trainable_blocks": 2, "adapter_dim": 256, "prompt_blocks": 9, "prompt_tokens": 4, "mid_block": -4}
PLAIN = {**PAPER, "adapter_dim": 0, "prompt_blocks": 0}


def saved_bytes(state: dict[str, torch.Tensor]) -> int:
    """Size in bytes of `state` written with torch.save."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def seconds_per_clip(models: list[CLIPVisionBackbone], frames: int, runs: int) -> list[tuple[float, float]]:
    """(CPU seconds of this process, wall seconds) of a batch-1 no-grad forward over a (1, frames, 3, 256, 128)
    clip, median over `runs` after one warm-up each; the models run in turn, so load from other processes
    affects them alike."""
    clip, camids = torch.randn(1, frames, 3, 256, 128), torch.tensor([1])
    samples: list[list[tuple[float, float]]] = [[] for _ in models]
    with torch.no_grad():
        for run in range(runs + 1):
            for model, sample in zip(models, samples, strict=True):
                model.eval()
                cpu, wall = time.process_time(), time.perf_counter()
                model(clip, camids)
                if run:  # run 0 is the warm-up
                    sample.append((time.process_time() - cpu, time.perf_counter() - wall))
    return [tuple(statistics.median(t[i] for t in sample) for i in range(2)) for sample in samples]


def report(name: str, frames: int, runs: int) -> None:
    torch.manual_seed(0)
    model = CLIPVisionBackbone(config=SHAPES[name], **PAPER)
    total = sum(p.numel() for p in model.parameters())
    pretrained = sum(p.numel() for _, p in model.pretrained_trainable_parameters())
    new = sum(p.numel() for _, p in model.new_parameters())
    full_bytes = saved_bytes(model.state_dict())
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable_bytes = saved_bytes({k: v for k, v in model.state_dict().items() if k in trainable_names})
    plain = CLIPVisionBackbone(config=SHAPES[name], **PLAIN)
    (on_cpu, on_wall), (off_cpu, off_wall) = seconds_per_clip([model, plain], frames, runs)
    print(f"== {name} (256x128, T={frames}, {torch.get_num_threads()} threads)")
    print(f"parameters: total {total / 1e6:.2f} M, trainable {(pretrained + new) / 1e6:.2f} M ", end="")
    print(f"(pretrained blocks/LN/projection {pretrained / 1e6:.2f} M, adapters+prompts {new / 1e6:.2f} M)")
    print(f"checkpoint: full state_dict {full_bytes / 2**20:.1f} MiB, trainable part {trainable_bytes / 2**20:.1f} MiB")
    print(f"per clip, median of {runs}: adapters+prompts {on_cpu:.2f} CPU s ({on_wall:.2f} s wall), ", end="")
    print(f"plain {off_cpu:.2f} CPU s ({off_wall:.2f} s wall); ", end="")
    print(f"ratio {on_cpu / off_cpu:.3f} CPU, {on_wall / off_wall:.3f} wall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["vitb16", "vitl14"])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for name in args.models:
        report(name, args.frames, args.runs)


if __name__ == "__main__":
    main()
