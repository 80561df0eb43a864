"""Inputs of docs/GPU.md, measured on the CPU: FLOPs and saved activation bytes of one ViT-L/14 training step.

Usage: ``python -m benchmarks.gpu_model [--frames 2 4]``. One ViT-L/14 block with random weights (no
download), tokens of a 252x126 frame (the 256x128 recipe cropped to whole 14-pixel patches: 18 x 9 patches + CLS
= 163 tokens), the paper's settings (last 2 blocks train, adapters of width 256 in every block, camera prompts in
the first 9), under bf16 autocast as on a GPU. Each block kind runs on two clip lengths; the difference gives
the marginal cost per token (weight copies made by autocast are the same for both and cancel). Printed per kind:

- FLOPs of forward + backward per token (``FlopCounterMode``);
- bytes kept for the backward pass per token (``saved_tensors_hooks``, each storage counted once).
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.model import PAPER, SHAPES
from farreid.models.backbone import CLIPVisionBackbone

HEIGHT, WIDTH = 252, 126


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs its forward pass."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def measure(block, frames: int, prompts: bool, per_frame_tokens: int) -> tuple[int, float, int]:
    """(tokens, FLOPs of forward + backward, saved bytes) of one block on ``frames`` frames under bf16 autocast."""
    x = torch.randn(frames, per_frame_tokens, 1024, requires_grad=True)  # (B*T, N, d), one clip of T frames
    p = torch.randn(frames, 4, 1024) if prompts else None
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nbytes, out = saved_bytes(lambda: block(x, frames, p))
        out.float().pow(2).mean().backward()
    return frames * per_frame_tokens, counter.get_total_flops(), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs=2, default=[2, 4], help="two clip lengths: the marginal cost")
    args = parser.parse_args()
    torch.manual_seed(0)
    per_frame = 1 + (HEIGHT // 14) * (WIDTH // 14)
    model = CLIPVisionBackbone(config=SHAPES["vitl14"], **PAPER).train()
    print(f"ViT-L/14 block, {per_frame} tokens per frame, bf16 autocast; marginal cost between {args.frames} frames")
    for name, index in (("frozen + adapters + prompts", 0), ("frozen + adapters", 12), ("trained + adapters", 23)):
        block = model.blocks[index]
        (t1, f1, b1), (t2, f2, b2) = (measure(block, n, index < 9, per_frame) for n in args.frames)
        per_token = (b2 - b1) / (t2 - t1)
        print(
            f"block {index:2d} ({name:27s}): {(f2 - f1) / (t2 - t1) / 1e6:6.1f} MFLOP per token (fwd+bwd), "
            f"{per_token / 1024:5.1f} KiB saved per token, "
            f"{(b1 - per_token * t1) / 2**20:5.1f} MiB independent of tokens"
        )


if __name__ == "__main__":
    main()
