"""``farreid embed``: one L2-normalised embedding per tracklet of any folder, with its metadata.

    farreid embed runs/vitl14/checkpoints/best.ckpt DATA/case1_aerial_to_ground/query --out emb/a2g_query

writes ``emb/a2g_query/embeddings.npz`` (``embeddings`` (N, F) float32, row i for tracklet i; ``names``) and
``emb/a2g_query/tracklets.csv`` (one row per tracklet: index, split, name, pid, camid, view, altitude, distance,
pitch, num_frames, folder). The folder can be a case's query or gallery, a whole release (every
``.../PID/TRACKLET`` tree under it), any ``ROOT/PID/TRACKLET`` tree, or a folder of ``TRACKLET`` folders without
PIDs (pid -1). No ``train/`` is read: the model is rebuilt from the checkpoint's own hyperparameters. A checkpoint
with geometry conditioning (docs/GEOMETRY.md) reads each tracklet's altitude, distance and pitch from the frame
names, or from ``--geometry-csv FILE`` (``tracklet,altitude,distance,pitch``, one row per tracklet of the folder).

In Python::

    model = ReIDModule.load_from_checkpoint("best.ckpt", map_location="cpu")
    table, embeddings = embed_folder(model, "DATA/case1_aerial_to_ground/query")
"""

from __future__ import annotations

import argparse
import csv
import os
import pickle
import sys
import zipfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from farreid._quiet import quiet_known_messages
from farreid.data.dataset import TrackletDataset
from farreid.data.detreidx import parse_frame_name
from farreid.data.geometry import CSVGeometry, FileNameGeometry, GeometrySource
from farreid.data.index_cache import read_split
from farreid.data.tracklets import IMAGE_SUFFIXES, Tracklet
from farreid.data.transforms import TrackletTransform, normalize_clip

# Files `farreid embed` writes into its --out folder (what --overwrite replaces).
OUTPUTS = ("embeddings.npz", "tracklets.csv")
COLUMNS = ("index", "split", "name", "pid", "camid", "view", "altitude", "distance", "pitch", "num_frames", "folder")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_frames(path: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in path.iterdir())


def _is_pid_tree(path: Path) -> bool:
    """``path/PID/TRACKLET``: integer-named sub-folders that hold folders."""
    return any(d.name.isdigit() and any(c.is_dir() for c in d.iterdir()) for d in _subdirs(path))


def _tracklet_without_pid(folder: Path) -> Tracklet:
    frames = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    meta = parse_frame_name(os.path.basename(frames[0]))
    return Tracklet(
        pid=-1,
        camid=meta.camid,
        view=meta.view,
        altitude=meta.altitude,
        distance=meta.distance,
        angle=meta.angle,
        name=folder.name,
        frames=tuple(frames),
    )


def find_tracklets(folder: str | os.PathLike) -> list[tuple[str, Tracklet]]:
    """Every tracklet under ``folder`` with the split it was found in (its tree's path relative to ``folder``).

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
        ValueError: no tracklet under it (see the module docstring for the layouts read).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"tracklet folder {root} does not exist or is not a directory")
    found: list[tuple[str, Tracklet]] = []

    def visit(path: Path) -> None:
        split = path.relative_to(root).as_posix()
        if _has_frames(path):  # the folder is one tracklet
            found.append((split, _tracklet_without_pid(path)))
        elif _is_pid_tree(path):
            found.extend((split, t) for t in read_split(path.parent, path.name))
        elif (children := _subdirs(path)) and all(_has_frames(c) for c in children):
            found.extend((split, _tracklet_without_pid(c)) for c in children)
        else:
            for child in children:
                visit(child)

    visit(root)
    if not found:
        raise ValueError(
            f"no tracklet under {root}: expected ROOT/PID/TRACKLET/frames (e.g. a case's query or gallery, or a "
            f"release holding such folders) or ROOT/TRACKLET/frames, with frames ending in {IMAGE_SUFFIXES}"
        )
    return found


def metadata_row(index: int, split: str, tracklet: Tracklet) -> dict:
    """One row of ``tracklets.csv`` (pitch is the DetReIDX camera angle; 0 for ground views)."""
    return {
        "index": index,
        "split": split,
        "name": tracklet.name,
        "pid": tracklet.pid,
        "camid": tracklet.camid,
        "view": tracklet.view,
        "altitude": tracklet.altitude,
        "distance": tracklet.distance,
        "pitch": tracklet.angle,
        "num_frames": len(tracklet.frames),
        "folder": os.path.dirname(tracklet.frames[0]),
    }


def embed_folder(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    image_size: Sequence[int] | None = None,
    num_frames: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    precision: str = "32",
    geometry: GeometrySource | None = None,
) -> tuple[list[dict], np.ndarray]:
    """Embed every tracklet under ``folder`` with a :class:`~farreid.module.ReIDModule` (its ``embed``).

    Args:
        model: the module, on the device to run on (e.g. from ``ReIDModule.load_from_checkpoint``).
        folder: see :func:`find_tracklets`.
        image_size, num_frames: clip geometry (H, W) and T; default to the checkpoint's ``data.image_size`` and
            ``data.num_frames_test``.
        batch_size: clips per forward pass. num_workers: DataLoader workers.
        precision: "32" or "bf16" (autocast on the model's device).
        geometry: where the tracklets' altitude, distance and pitch come from (read by a checkpoint with a geometry
            mechanism, docs/GEOMETRY.md); None = the frame names.

    Returns:
        (metadata rows as in ``tracklets.csv``, (N, F) float32 L2-normalised embeddings, row i for row i).
    """
    data = getattr(model, "data_hparams", {})
    image_size = tuple(image_size or data.get("image_size") or ())
    num_frames = num_frames or data.get("num_frames_test") or data.get("num_frames")
    if len(image_size) != 2 or not num_frames:
        raise ValueError(
            f"image_size={image_size or None}, num_frames={num_frames}: the checkpoint records no datamodule "
            "hyperparameters; pass both (e.g. image_size=(256, 128), num_frames=16)"
        )
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision must be '32' or 'bf16', got {precision!r}")
    found = find_tracklets(folder)
    rows = [metadata_row(i, split, t) for i, (split, t) in enumerate(found)]
    tracklets = [t for _, t in found]
    dataset = TrackletDataset(
        tracklets,
        num_frames=num_frames,
        training=False,
        transform=TrackletTransform(image_size=image_size, training=False),
        geometry=(geometry or FileNameGeometry()).geometry(tracklets, where=str(folder)),
    )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    was_training = model.training
    model.eval()
    chunks = []
    with torch.inference_mode(), autocast:
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            batch["frames"] = normalize_clip(batch["frames"])  # uint8 clips -> normalised floats, on the device
            chunks.append(model.embed(batch)[0].float().cpu())
    model.train(was_training)
    embeddings = torch.cat(chunks).numpy()
    check_finite(rows, embeddings)
    return rows, embeddings


def check_finite(rows: list[dict], embeddings: np.ndarray) -> None:
    """Raise FloatingPointError naming the tracklets whose embedding is not finite (as ``farreid test`` does)."""
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if not len(bad):
        return
    if len(bad) == len(rows):
        culprit = "every tracklet: the checkpoint's weights are probably non-finite"
    else:
        shown = ", ".join(rows[int(i)]["name"] for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        culprit = f"tracklets {shown}"
    raise FloatingPointError(
        f"non-finite embeddings for {len(bad)} of {len(rows)} tracklets ({culprit}); nothing was written"
    )


def check_output(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise FileExistsError when ``out_dir`` already holds embed output and ``overwrite`` is not set."""
    held = [name for name in OUTPUTS if (Path(out_dir) / name).exists()]
    if held and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {' and '.join(held)}: pass --overwrite to replace them, or another --out"
        )


def write_embeddings(
    out_dir: str | os.PathLike, rows: list[dict], embeddings: np.ndarray, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``embeddings.npz`` and ``tracklets.csv`` into ``out_dir``; returns both paths.

    Each file is written beside its final name and renamed into place, so a reader never sees half a file.

    Raises:
        ValueError: row count and embedding count differ.
        FloatingPointError: a non-finite embedding (see :func:`check_finite`).
        FileExistsError: ``out_dir`` holds embed output and ``overwrite`` is False.
    """
    if len(rows) != len(embeddings):
        raise ValueError(f"{len(rows)} metadata rows but {len(embeddings)} embeddings")
    check_finite(rows, embeddings)
    check_output(out_dir, overwrite)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz, table = out / OUTPUTS[0], out / OUTPUTS[1]
    with open(npz.with_name(npz.name + ".part"), "wb") as f:
        np.savez(f, embeddings=embeddings.astype(np.float32), names=np.array([r["name"] for r in rows]))
    with open(table.with_name(table.name + ".part"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for path in (npz, table):
        os.replace(path.with_name(path.name + ".part"), path)
    return npz, table


def load_model(checkpoint: str | os.PathLike, device: str = "cpu") -> torch.nn.Module:
    """``ReIDModule.load_from_checkpoint`` with a clear error for a missing file; frozen CLIP weights left out of the
    checkpoint are re-read from the recorded ``pretrained`` directory (or ``FARREID_CLIP``)."""
    from farreid.module import ReIDModule

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: expected a .ckpt written by `farreid fit`")
    check_checkpoint(path)
    return ReIDModule.load_from_checkpoint(path, map_location=device).to(device)


def check_checkpoint(path: Path) -> None:
    """Raise ValueError unless ``path`` is a checkpoint of a farreid module (read memory-mapped, weights only)."""
    expected = "expected a .ckpt written by `farreid fit`"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a PyTorch checkpoint ({reason[:120]}): {expected}") from None
    missing = [key for key in ("state_dict", "hyper_parameters") if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise ValueError(f"{path} is a PyTorch file without {' and '.join(missing)}: {expected}")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="farreid embed",
        description="Write one L2-normalised embedding per tracklet of a folder (npz) with its metadata (csv).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by `farreid fit`")
    parser.add_argument("folder", help="a case's query/gallery, a release, any ROOT/PID/TRACKLET tree")
    parser.add_argument("--out", required=True, help="output folder for embeddings.npz and tracklets.csv")
    parser.add_argument("--num-frames", type=int, default=None, help="T per clip (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per forward pass (default: 16)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (default: 2)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default: auto)")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32", help="autocast dtype (default: 32)")
    parser.add_argument("--overwrite", action="store_true", help="replace embeddings already in --out")
    parser.add_argument(
        "--geometry-csv",
        default=None,
        help="tracklet,altitude,distance,pitch sidecar for a geometry checkpoint (default: the frame names)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``farreid embed``; returns the exit code."""
    args = build_parser().parse_args(argv)
    quiet_known_messages()
    try:
        check_output(args.out, args.overwrite)  # before the model runs, not after
        model = load_model(args.checkpoint, _device(args.device))
        rows, embeddings = embed_folder(
            model,
            args.folder,
            num_frames=args.num_frames,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            precision=args.precision,
            geometry=CSVGeometry(args.geometry_csv) if args.geometry_csv else None,
        )
        npz, table = write_embeddings(args.out, rows, embeddings, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as err:
        print(f"farreid embed: error: {err}", file=sys.stderr)
        return 2
    print(f"[farreid] {len(rows)} embeddings of width {embeddings.shape[1]} written to {npz} and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
