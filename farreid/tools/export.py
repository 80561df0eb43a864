"""``farreid export``: the embedding model (frames + camids -> L2-normalised embedding) as an ONNX graph.

    farreid export runs/vitl14/checkpoints/best.ckpt --out vitl14.onnx

The graph takes ``frames`` (B, T, 3, H, W) float32, normalised as in training (CLIP mean/std), and ``camids``
(B,) int64 (0 ground, 1/2 UAV session), and returns ``embedding`` (B, F) float32, exactly what ``farreid test``
scores (BNNeck features, flip TTA if the checkpoint uses it). B is dynamic; T, H and W are fixed to the
checkpoint's evaluation clip (``data.num_frames_test``, ``data.image_size``) unless given. Every frame counts as
real (no padding mask): clips of T frames, as ``farreid embed`` builds them. A checkpoint with a geometry
mechanism (``docs/GEOMETRY.md``) takes two more inputs, ``geometry`` (B, 3) float32 (altitude, distance, pitch
scaled by ``farreid.data.geometry.RANGES``) and ``geometry_known`` (B, 3) bool.
Needs the ``export`` extra (``pip install 'farreid[export]'``: onnx, onnxscript, onnxruntime for the check).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from farreid._quiet import quiet_known_messages
from farreid.tools.embed import load_model


class EmbeddingModel(nn.Module):
    """A trained :class:`~farreid.module.ReIDModule` reduced to its retrieval embedding."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, frames: torch.Tensor, camids: torch.Tensor, geometry=None, geometry_known=None) -> torch.Tensor:
        """(B, T, 3, H, W) frames, (B,) camids [, (B, 3) geometry, (B, 3) bool known] -> (B, F) embeddings."""
        batch = {"frames": frames, "camid": camids}
        if geometry is not None:
            batch.update(geometry=geometry, geometry_known=geometry_known)
        return self.module.embed(batch)[0]


def export_onnx(
    module: nn.Module, path: str | Path, num_frames: int, image_size: Sequence[int], opset: int = 18
) -> Path:
    """Write the ONNX graph of ``module``'s embedding for clips of ``num_frames`` frames of ``image_size`` (H, W).

    Returns:
        The written path.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail early with the install hint)
    except ImportError as err:
        raise ImportError("farreid export needs onnx: pip install 'farreid[export]'") from err
    wrapper = EmbeddingModel(module).eval()
    height, width = image_size
    frames = torch.randn(2, num_frames, 3, height, width)
    camids = torch.tensor([0, 1], dtype=torch.long)
    inputs = (frames, camids)
    if getattr(module.backbone, "uses_geometry", False):  # one known aerial and one unknown (ground) row
        inputs += (torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 0.0]]), torch.tensor([[True] * 3, [False] * 3]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    # The backbone caches its frozen position table keyed on data_ptr(), which torch.export's fake tensors lack;
    # a table that requires grad is recomputed every call, so the graph holds the interpolation instead.
    table = module.backbone.embeddings.position_embedding.weight
    frozen = not table.requires_grad
    table.requires_grad_(True)
    # The camera-id range check reads the ids on the host (a data-dependent branch export cannot trace); the graph
    # leaves it out, and ONNX Runtime's Gather rejects an out-of-range camera id itself.
    prompts = module.backbone.camera_prompts
    if prompts is not None:
        prompts.check_camids = lambda camids: None
    try:
        _export(wrapper, inputs, path, batch, opset)
    finally:
        table.requires_grad_(not frozen)
        if prompts is not None:
            del prompts.check_camids
    return path


def _export(wrapper: nn.Module, inputs: tuple, path: Path, batch, opset: int) -> None:
    names = ["frames", "camids", "geometry", "geometry_known"][: len(inputs)]
    with torch.no_grad(), warnings.catch_warnings():
        # frames and camids share the batch axis on purpose; the exporter notes that it keeps one name for it.
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        torch.onnx.export(
            wrapper,
            inputs,
            str(path),
            input_names=names,
            output_names=["embedding"],
            dynamic_shapes={name: {0: batch} for name in names},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="farreid export", description="Export the embedding model (frames + camids -> embedding) to ONNX."
    )
    parser.add_argument("checkpoint", help="a .ckpt written by `farreid fit`")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--num-frames", type=int, default=None, help="T of the exported clips (default: checkpoint's)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default: ckpt's")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``farreid export``; returns the exit code."""
    args = build_parser().parse_args(argv)
    quiet_known_messages()
    try:
        module = load_model(args.checkpoint, "cpu")
        data = getattr(module, "data_hparams", {})
        num_frames = args.num_frames or data.get("num_frames_test") or data.get("num_frames")
        image_size = args.image_size or data.get("image_size")
        if not num_frames or not image_size:
            raise ValueError("the checkpoint records no clip geometry: pass --num-frames and --image-size")
        path = export_onnx(module, args.out, int(num_frames), tuple(image_size), args.opset)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"farreid export: error: {err}", file=sys.stderr)
        return 2
    print(f"[farreid] ONNX embedding model (T={num_frames}, {image_size[0]}x{image_size[1]}) written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
