"""Training-loader throughput: clips/s and frames/s of TrackletDataset + IdentityBatchSampler + DataLoader.

Usage: ``python benchmarks/loader.py [--root DATA] [--workers 0 2] [--batches 20]``. Without ``--root`` a demo
dataset is generated into a temporary folder first. Warm-up batches (worker start-up, page cache) are excluded.
The loader delivers uint8 clips; each line also gives the rate with the batched augmentation and normalisation
(``TrackletTransform.augment``, which runs on the device in training) applied in this process, as a CPU run does.
Realistic crop sizes at DetReIDX scale: ``benchmarks/scale.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from farreid.data.dataset import TrackletDataset, relabel
from farreid.data.index_cache import read_split
from farreid.data.sampling import IdentityBatchSampler
from farreid.data.synthetic import generate
from farreid.data.transforms import TrackletTransform


def measure(
    root: Path, workers: int, batches: int, warmup: int, p: int, k: int, num_frames: int, augment: bool = False
) -> tuple[float, float]:
    """Time ``batches`` batches after ``warmup`` ones; returns (clips/s, frames/s)."""
    tracklets = read_split(root, "train")
    transform = TrackletTransform(image_size=(256, 128), training=True, color_jitter=0.2)
    dataset = TrackletDataset(tracklets, num_frames, True, transform, labels=relabel(tracklets))
    sampler = IdentityBatchSampler(dataset.labels, p=p, k=k, seed=0, passes_per_epoch=1000)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=False)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    clips = 0
    for _ in range(batches):
        batch = next(iterator)
        if augment:
            transform.augment(batch["frames"], batch["aug"])
        clips += batch["frames"].shape[0]  # (B, T, 3, H, W)
    elapsed = time.perf_counter() - start
    del iterator
    return clips / elapsed, clips * num_frames / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="DetReIDX-format root (default: generate demo data)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--num-frames", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            start = time.perf_counter()
            root = generate(Path(tmp) / "demo", seed=0)
            print(f"generated demo data in {time.perf_counter() - start:.1f} s")
        for workers in args.workers:
            shape = (root, workers, args.batches, args.warmup, args.p, args.k, args.num_frames)
            clips, frames = measure(*shape)
            augmented, _ = measure(*shape, augment=True)
            print(
                f"workers={workers}: {clips:.1f} clips/s, {frames:.0f} frames/s; {augmented:.1f} clips/s with the "
                f"augmentation in this process (P={args.p} K={args.k} T={args.num_frames}, 256x128, uint8, "
                f"{args.batches} batches after {args.warmup})"
            )


if __name__ == "__main__":
    main()
