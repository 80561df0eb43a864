"""DetReIDX at (a fraction of) its real size: listing time, index memory, worker memory and clip throughput.

Run from the repository root:

    python benchmarks/scale.py                      # 1/10 of DetReIDX: 1,129 tracklets x ~1,040 frames
    python benchmarks/scale.py --fraction 0.01      # quicker
    python benchmarks/scale.py --tree /big/disk/t   # where the generated tree goes (kept and reused)

The tree has DetReIDX's shape (11,288 tracklets, ~1,040 frames each, 2/3 aerial in two UAV sessions, 1/3 ground,
frame names in the real grammar) and is made of hard links to a few real JPEGs (aerial crops ~30x70 px, ground
~120x300 px), so it costs directory entries, not inodes or bytes, and every frame decodes. It reports:

1. listing ``train``: a bare ``os.walk`` (the file-system floor), ``list_split`` (no cache), the first cached
   listing (lists and writes the cache), and a cached listing (validates and reads it); all warm (page cache);
2. the listing's memory per frame, each listing (no cache, first cached, cached) in a fresh process: the peak (the
   RSS high-water mark, VmHWM, above the RSS before; and the tracemalloc peak) and the steady RSS growth (index and
   tracklets alive); the same per row for ``read_table`` of a generated 1M-row ``tracklets.csv`` (the search table);
3. worker memory: USS and PSS (from /proc/PID/smaps_rollup) of each of 2 DataLoader workers after the first batch
   and after two epochs over the training tracklets (persistent workers, as ``train_dataloader``);
4. clip throughput per core, in this process (no workers), T = 8 at 256x128, training augmentation: the previous
   path (full PIL decode, float tensors, per-frame antialiased interpolation, CPU augmentation and normalisation,
   float32 out; reproduced below) against the uint8 path (decode at size in the loader) alone, and with the
   batched augmentation also on this CPU (what a CPU run pays; on a GPU it runs on the device).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scale_memory import MODES, TABLE_ROWS, make_table
from farreid.data.dataset import TrackletDataset, relabel
from farreid.data.detreidx import list_split
from farreid.data.index_cache import cache_path, cached_split, read_split
from farreid.data.transforms import CLIP_MEAN, CLIP_STD, TrackletTransform

FULL_TRACKLETS = 11_288
FULL_FRAMES = 11_750_000
_LINK_LIMIT = 60_000  # ext4 allows 65,000 links per file
_MB = 2**20


# ------------------------------------------------------------------------------------------------- the tree
def _sources(folder: Path, count: int, seed: int) -> dict[str, list[Path]]:
    """`count` JPEGs per view: aerial ~30x70 (w x h) and ground ~120x300 person-like crops."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {"aerial": [], "ground": []}
    folder.mkdir(parents=True, exist_ok=True)
    for view, (w, h) in (("aerial", (30, 70)), ("ground", (120, 300))):
        for i in range(count):
            size = (int(w * rng.uniform(0.8, 1.2)), int(h * rng.uniform(0.8, 1.2)))
            pixels = rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)
            path = folder / f"{view}_{i}.jpg"
            image.save(path, quality=90)
            out[view].append(path)
    return out


def make_tree(root: Path, fraction: float, seed: int = 0) -> tuple[int, int]:
    """Generate ``root/train`` at ``fraction`` of DetReIDX (reused when already there) -> (tracklets, frames)."""
    done = root / "DONE"
    if done.is_file():
        tracklets, frames = (int(x) for x in done.read_text().split())
        return tracklets, frames
    rng = random.Random(seed)
    num_tracklets = max(6, round(FULL_TRACKLETS * fraction))
    mean_frames = FULL_FRAMES / FULL_TRACKLETS
    total = 0
    sources = _sources(
        root / "sources", count=max(4, math.ceil(num_tracklets * mean_frames * 1.3 / _LINK_LIMIT)), seed=seed
    )
    links: dict[Path, int] = {}
    start = time.perf_counter()
    for t in range(num_tracklets):
        pid, view = 1 + t // 6, ("ground", "aerial", "aerial")[t % 3]
        session = 1 + (t // 3) % 2
        length = max(8, int(rng.uniform(0.5, 1.5) * mean_frames))
        folder = root / "train" / f"{pid:04d}" / f"{pid:04d}_{t}"
        folder.mkdir(parents=True, exist_ok=True)
        candidates = [s for s in sources[view] if links.get(s, 0) + length < _LINK_LIMIT]
        source = candidates[t % len(candidates)]
        links[source] = links.get(source, 0) + length
        for f in range(length):
            if view == "ground":
                name = f"{pid:04d}_{t}_G01_{f:06d}.jpg"
            else:
                name = f"{pid:04d}_{t}_D{session}_S{session}_00_000_35.5_80.0_60_{session}_{f:06d}.jpg"
            os.link(source, folder / name)
        total += length
        if t % 100 == 0:
            print(
                f"  tree: {t}/{num_tracklets} tracklets, {total} frames ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    done.write_text(f"{num_tracklets} {total}")
    return num_tracklets, total


# ---------------------------------------------------------------------------------------------- listing
def _timed(function, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = function()
        best = min(best, time.perf_counter() - start)
    return best, out


def listing(root: Path, cache_dir: Path) -> None:
    split = str(root / "train")

    def walk() -> int:
        return sum(len(files) for _, _, files in os.walk(split))

    walk()  # warm the page cache for every measurement alike
    t_walk, files = _timed(walk, 2)
    t_list, index = _timed(lambda: list_split(root, "train"), 2)
    path = cache_path(root, "train", cache_dir)
    path.unlink(missing_ok=True)
    t_first, _ = _timed(lambda: cached_split(root, "train", cache_dir))
    t_cached, cached = _timed(lambda: cached_split(root, "train", cache_dir), 3)
    assert len(cached) == len(index) and len(cached.names) == files
    print(f"listing train ({len(index)} tracklets, {files} frames; warm page cache):")
    print(f"  os.walk (floor)              {t_walk:7.2f} s   1.00x")
    print(f"  list_split (no cache)        {t_list:7.2f} s   {t_list / t_walk:.2f}x os.walk")
    print(f"  first listing, writes cache  {t_first:7.2f} s   {t_first / t_walk:.2f}x os.walk")
    print(
        f"  cached listing               {t_cached:7.2f} s   {t_cached / t_walk:.2f}x os.walk "
        f"(cache file {path.stat().st_size / _MB:.1f} MB)"
    )


def memory(root: Path) -> None:
    """Each listing, and reading a tracklet table of TABLE_ROWS rows, in its own fresh process
    (benchmarks/scale_memory.py: no torch import to raise the peak first), once for RSS and once under tracemalloc."""
    make_table(root / "tracklets.csv")
    print(
        "listing memory (a fresh process per line; bytes per frame of the index and its tracklets) and the tracklet "
        f"table of a {TABLE_ROWS:,}-tracklet index (bytes per row):"
    )
    for trace in (False, True):
        for mode in [*MODES, "table"]:
            command = [sys.executable, str(Path(__file__).with_name("scale_memory.py")), str(root), mode]
            subprocess.run(command + (["--trace"] if trace else []), check=True)


# ------------------------------------------------------------------------------------------ worker memory
def _smaps(pid: int) -> tuple[float, float]:
    """(USS, PSS) of a process in MB."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                values[parts[0][:-1]] = int(parts[1]) / 1024
    return values["Private_Clean"] + values["Private_Dirty"], values["Pss"]


class SeededKeys(torch.utils.data.Sampler):
    """Shuffled (index, seed) keys in batches, like the training batch sampler."""

    def __init__(self, size: int, batch: int) -> None:
        self.size, self.batch, self.epoch = size, batch, 0

    def __iter__(self):
        rng = random.Random(self.epoch)
        self.epoch += 1
        order = list(range(self.size))
        rng.shuffle(order)
        for start in range(0, self.size, self.batch):
            yield [(i, rng.getrandbits(62)) for i in order[start : start + self.batch]]

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch)


def worker_memory(root: Path, cache_dir: Path, workers: int = 2, batch: int = 16) -> None:
    tracklets = read_split(root, "train", cache_dir=cache_dir)
    transform = TrackletTransform(image_size=(256, 128), training=True, color_jitter=0.2)
    dataset = TrackletDataset(tracklets, 8, True, transform, labels=relabel(tracklets))
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=SeededKeys(len(dataset), batch), num_workers=workers, persistent_workers=True
    )
    first, last = None, None
    start = time.perf_counter()
    steps = 0
    for _epoch in range(2):
        iterator = iter(loader)
        for _batch in iterator:
            steps += 1
            if first is None:
                pids = [w.pid for w in iterator._workers]
                first = {pid: _smaps(pid) for pid in pids}
        last = {pid: _smaps(pid) for pid in pids}
    seconds = time.perf_counter() - start
    print(
        f"worker memory over 2 epochs ({len(dataset)} tracklets, {workers} workers, {steps // 2} batches of {batch} "
        f"per epoch, {seconds:.0f} s):"
    )
    for pid in pids:
        (uss0, pss0), (uss1, pss1) = first[pid], last[pid]
        print(
            f"  worker {pid}: USS {uss0:.0f} -> {uss1:.0f} MB (+{uss1 - uss0:.1f}), "
            f"PSS {pss0:.0f} -> {pss1:.0f} MB (+{pss1 - pss0:.1f})"
        )


# ------------------------------------------------------------------------------------------- throughput
def previous_clip(
    paths: list[str], rng: random.Random, size=(256, 128), pad=10, jitter=0.2, erase_p=0.5
) -> torch.Tensor:
    """The loader path before this change, step for step: full decode, float frames, per-frame interpolation,
    flip, pad + crop, colour jitter, normalisation and erasing on the CPU; float32 out."""
    frames = []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True)[0].clamp_(0, 1)
        frames.append(x)
    x = torch.stack(frames)  # (T, 3, H, W)
    if rng.random() < 0.5:
        x = x.flip(-1)
    h, w = size
    sy, sx = rng.randint(-pad, pad), rng.randint(-pad, pad)
    out = torch.zeros_like(x)
    out[:, :, max(0, -sy) : h - max(0, sy), max(0, -sx) : w - max(0, sx)] = x[
        :, :, max(0, sy) : h - max(0, -sy), max(0, sx) : w - max(0, -sx)
    ]
    x = out
    b, c, s = (rng.uniform(1 - jitter, 1 + jitter) for _ in range(3))
    x.mul_(b).clamp_(0, 1)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    m = grey.mean(dim=(2, 3), keepdim=True)
    x.sub_(m).mul_(c).add_(m).clamp_(0, 1)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x.sub_(grey).mul_(s).add_(grey).clamp_(0, 1)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    if rng.random() < erase_p:
        x[:, :, 10:60, 20:50] = 0
    return x


def rates(steps, chosen: list[int], seconds: float, rounds: int = 10) -> list[float]:
    """Calls per second of each ``step(i, rng)`` over the tracklets ``chosen``: ``rounds`` interleaved rounds of
    ``seconds / rounds`` each per step, the median round per step (other processes on the machine come and go;
    interleaving exposes every step to them alike)."""
    rng = random.Random(0)
    per_step: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for k, step in enumerate(steps):
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                step(chosen[count % len(chosen)], rng)
                count += 1
            per_step[k].append(count / (time.perf_counter() - start))
    return [float(np.median(r)) for r in per_step]


def _previous(i: int, rng: random.Random) -> None:
    t = _STATE["dataset"].tracklets[i]
    indices = sorted(rng.sample(range(len(t.frames)), 8))
    previous_clip([t.frames[j] for j in indices], rng)


def _uint8(i: int, rng: random.Random) -> None:
    _STATE["dataset"][(i, rng.getrandbits(62))]


def _uint8_augmented(i: int, rng: random.Random) -> None:
    item = _STATE["dataset"][(i, rng.getrandbits(62))]
    _STATE["dataset"].transform.augment(item["frames"][None], item["aug"][None])


_STATE: dict = {}


def throughput(root: Path, cache_dir: Path, seconds: float) -> None:
    tracklets = read_split(root, "train", cache_dir=cache_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core
    transform = TrackletTransform(image_size=(256, 128), training=True, color_jitter=0.2)
    dataset = TrackletDataset(tracklets, 8, True, transform, labels=relabel(tracklets))
    _STATE["dataset"] = dataset
    print(
        f"clip throughput per core (T = 8 at 256x128, training; 1 thread, no workers; {seconds:.0f} s per path "
        "in 10 interleaved rounds, median round):"
    )
    for view, pick in (("aerial ~30x70", 1), ("ground ~120x300", 0)):
        chosen = [i for i, t in enumerate(tracklets) if (t.camid == 0) == (pick == 0)]
        r_old, r_new, r_aug = rates((_previous, _uint8, _uint8_augmented), chosen, seconds)
        print(
            f"  {view:16s} previous {r_old:6.1f} clips/s | uint8 loader {r_new:6.1f} clips/s ({r_new / r_old:.2f}x) | "
            f"+ augmentation on this CPU {r_aug:6.1f} clips/s ({r_aug / r_old:.2f}x)"
        )
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fraction", type=float, default=0.1, help="share of DetReIDX's 11,288 tracklets")
    parser.add_argument("--tree", type=Path, default=None, help="where the tree goes (default /tmp/farreid-scale-F)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput measurement")
    parser.add_argument("--skip", nargs="*", default=[], choices=["listing", "memory", "workers", "throughput"])
    args = parser.parse_args()
    root = args.tree or Path(f"/tmp/farreid-scale-{args.fraction:g}")
    cache_dir = root / "index-cache"
    num_tracklets, num_frames = make_tree(root, args.fraction)
    print(
        f"tree {root}: {num_tracklets} tracklets, {num_frames} frames ({args.fraction:g} of DetReIDX); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    if "listing" not in args.skip:
        listing(root, cache_dir)
    if "memory" not in args.skip:
        memory(root)
    if "workers" not in args.skip:
        worker_memory(root, cache_dir)
    if "throughput" not in args.skip:
        throughput(root, cache_dir, args.seconds)


if __name__ == "__main__":
    main()
