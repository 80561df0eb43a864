"""The memory of one listing of a generated tree's ``train`` split, in this fresh process (run by scale.py).

    python benchmarks/scale_memory.py TREE MODE [--trace]    # MODE: list_split, first, cached or table

``table`` reads ``TREE/tracklets.csv`` (a ``farreid embed`` table of 1M rows, :func:`make_table`) with
:func:`~farreid.search.table.read_table`. A listing imports only NumPy and farreid.data, so the process's peak
before it stays below the listing's (``table`` imports farreid.search, and torch with it; a peak that never passed
the imports' is printed as a bound, ``<=``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farreid.data.detreidx import list_split
from farreid.data.index_cache import cache_path, cached_split

FULL_FRAMES = 11_750_000
_MB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """The high-water RSS of this process's memory map (VmHWM): unlike ru_maxrss, it does not start from the
    forking parent's (scale.py with torch loaded), since exec gives the process a new map."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line: the peak needs Linux")


MODES = {"list_split": "list_split (no cache)", "first": "first listing, writes cache", "cached": "cached listing"}
TABLE_ROWS = 1_000_000


def make_table(path: Path, rows: int = TABLE_ROWS) -> None:
    """A ``tracklets.csv`` as ``farreid embed`` writes it for ``rows`` DetReIDX-like tracklets (kept and reused)."""
    if path.is_file():
        return
    header = "index,split,name,pid,camid,view,altitude,distance,pitch,num_frames,folder\n"
    with open(path.with_suffix(".tmp"), "w") as f:
        f.write(header)
        for i in range(rows):
            pid, aerial = 1 + i // 30, i % 3 != 0
            name = f"{pid:04d}_{i}"
            camid, view, angles = (1 + i % 2, "aerial", "35.5,80.0,60.0") if aerial else (0, "ground", "0.0,0.0,0.0")
            folder = f"/data/DetReIDX/case1_aerial_to_ground/gallery/{pid:04d}/{name}"
            f.write(
                f"{i},case1_aerial_to_ground/gallery,{name},{pid},{camid},{view},{angles},{500 + i % 1500},{folder}\n"
            )
    path.with_suffix(".tmp").rename(path)


def measure_table(root: str, trace: bool) -> None:
    """In a fresh process: the peak and steady memory of read_table per row of ``root/tracklets.csv``."""
    from farreid.search.table import read_table  # imports torch (farreid.search): not in the listing's processes

    path = Path(root) / "tracklets.csv"
    gc.collect()
    if trace:
        tracemalloc.start()
    before, peak_before = _rss(), _peak_rss()
    table = read_table(path, "embeddings")
    gc.collect()
    grown, peak = _rss() - before, _peak_rss() - before
    rows = len(table)
    if trace:
        peak = tracemalloc.get_traced_memory()[1]
        print(f"  {'read_table':29s} tracemalloc peak {peak / rows:6.1f} bytes/row ({peak / _MB:.1f} MB)")
        return
    bound = "<=" if _peak_rss() == peak_before else "  "
    print(
        f"  {'read_table':29s} peak {bound}{peak / rows:6.1f} bytes/row (VmHWM), steady {grown / rows:6.1f} "
        f"bytes/row; {rows} rows, table {table.nbytes / rows:.1f} bytes/row ({path.stat().st_size / rows:.0f} "
        "bytes/row of CSV)"
    )


def measure(root: str, mode: str, trace: bool) -> None:
    """In a fresh process: one listing (``mode``), its peak and steady memory per frame.

    Peak: the high-water RSS above the RSS before the listing (an overestimate when the imports' own peak was higher
    still), or with ``trace`` the tracemalloc peak (Python and NumPy allocations; slower).
    Steady: RSS growth with the index and its tracklets alive.
    """
    cache_dir = Path(root) / "index-cache"
    if mode == "first":
        cache_path(root, "train", cache_dir).unlink(missing_ok=True)
    gc.collect()
    if trace:
        tracemalloc.start()
    before, peak_before = _rss(), _peak_rss()
    index = list_split(root, "train") if mode == "list_split" else cached_split(root, "train", cache_dir)
    tracklets = index.tracklets()
    gc.collect()
    grown, peak = _rss() - before, _peak_rss() - before
    frames = sum(len(t.frames) for t in tracklets)
    bound = "<=" if _peak_rss() == peak_before else "  "  # the listing never passed the imports' peak: a bound
    if trace:
        peak = tracemalloc.get_traced_memory()[1]
        print(f"  {MODES[mode]:29s} tracemalloc peak {peak / frames:6.1f} bytes/frame ({peak / _MB:.1f} MB)")
        return
    print(
        f"  {MODES[mode]:29s} peak {bound}{peak / frames:6.1f} bytes/frame (VmHWM), steady {grown / frames:6.1f} "
        f"bytes/frame; {frames} frames, frame names {index.names.nbytes / frames:.1f} bytes/frame; "
        f"at full size steady {grown / frames * FULL_FRAMES / 2**30:.2f} GB, "
        f"peak {peak / frames * FULL_FRAMES / 2**30:.2f} GB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tree", help="a tree made by benchmarks/scale.py")
    parser.add_argument("mode", choices=[*MODES, "table"])
    parser.add_argument("--trace", action="store_true", help="the tracemalloc peak instead of the RSS high-water mark")
    args = parser.parse_args()
    if args.mode == "table":
        measure_table(args.tree, args.trace)
    else:
        measure(args.tree, args.mode, args.trace)


if __name__ == "__main__":
    main()
