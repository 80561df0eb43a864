"""Benchmark of farreid's k-reciprocal re-ranking against the plain NumPy transcription of the published code.

Run from the repository root:

    python benchmarks/reranking.py            # N = 2,000 and 6,000: farreid vs the transcription vs the floor
    python benchmarks/reranking.py --large    # then farreid alone at N = 20,000 and 50,000
    python benchmarks/reranking.py --sweep    # farreid / floor over N = 2,000-12,000, cluster sizes 2-50, noise 0.5-2

Features are random clustered 768-d vectors (N / 10 centres plus Gaussian noise, L2-normalised), Q = N / 4.
Times are the best of `--repeats` runs for torch (in the sweep, floor and farreid alternate; the transcription
runs once: it is slow) and cover the whole call. Memory is measured in a fresh child process per measurement,
so no allocator cache of an earlier run hides it: farreid's peak is the largest resident-set size (RSS,
/proc/self/statm sampled every millisecond by a thread) above the RSS just before the call, since torch keeps
no allocator statistics on the CPU; for the transcription the same RSS figure and the tracemalloc peak (NumPy
reports its buffers to tracemalloc).
The floor is the bare `features @ features.T` on the same features.
"""

import argparse
import os
import resource
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared transcription lives in tests/

from farreid.evaluation.reranking import re_ranking  # noqa: E402
from tests.reference_reranking import re_ranking_reference  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")
_MB = 2**20


def clustered_features(num: int, dim: int, seed: int, cluster_size: int = 10, noise: float = 1.0) -> np.ndarray:
    """(num, dim) float32 L2-normalised points around num / cluster_size random centres (about cluster_size per
    identity), each centre plus Gaussian noise of standard deviation ``noise`` (the centres have 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, num // cluster_size), dim), dtype=np.float32)
    points = centres[rng.integers(0, len(centres), num)]
    points = points + noise * rng.standard_normal((num, dim), dtype=np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


def peak_rss(function: Callable[[], object]) -> tuple[object, float]:
    """Runs `function`; returns its output and the peak RSS above the starting RSS, in MB."""
    start, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        output = function()
    finally:
        done.set()
        thread.join()
    return output, (max(peak[0], _rss()) - start) / _MB


def best_time(function: Callable[[], object], repeats: int) -> tuple[object, float]:
    """Output of the last run and the best wall time over `repeats` runs, in seconds."""
    best, output = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        output = function()
        best = min(best, time.perf_counter() - start)
    return output, best


def child_memory(which: str, num: int, dim: int, seed: int) -> None:
    """In a child process: prints the RSS peak (MB) of one call, and for the transcription its tracemalloc peak."""
    features = clustered_features(num, dim, seed)
    num_query = num // 4
    if which == "farreid":
        tensor = torch.from_numpy(features)
        _, rss = peak_rss(lambda: re_ranking(tensor[:num_query], tensor[num_query:], progress=False))
        print(f"{rss:.1f} nan")
        return
    tracemalloc.start()
    _, rss = peak_rss(lambda: re_ranking_reference(features[:num_query], features[num_query:]))
    print(f"{rss:.1f} {tracemalloc.get_traced_memory()[1] / _MB:.1f}")


def measure_memory(which: str, num: int, dim: int, seed: int) -> tuple[float, float]:
    """(RSS peak, tracemalloc peak) in MB of one call, from a fresh child process running `child_memory`."""
    command = [sys.executable, __file__, "--child", which, "--sizes", str(num), "--dim", str(dim), "--seed", str(seed)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
    return float(output[-2]), float(output[-1])


def compare(num: int, dim: int, repeats: int, seed: int) -> None:
    """farreid vs the transcription vs the floor at one size; prints one block of figures."""
    features = clustered_features(num, dim, seed)
    num_query = num // 4
    tensor = torch.from_numpy(features)
    query, gallery = tensor[:num_query], tensor[num_query:]
    _, floor = best_time(lambda: tensor @ tensor.T, repeats)
    ours, ours_time = best_time(lambda: re_ranking(query, gallery, progress=False), repeats)
    reference, reference_time = best_time(lambda: re_ranking_reference(features[:num_query], features[num_query:]), 1)
    ours_rss, _ = measure_memory("farreid", num, dim, seed)
    reference_rss, reference_traced = measure_memory("reference", num, dim, seed)
    difference = float(np.abs(ours.numpy() - reference).max())
    print(f"N = {num:,} (Q = {num_query:,}, G = {num - num_query:,}, D = {dim})")
    print(f"  floor  features @ features.T   {floor:8.3f} s")
    print(f"  farreid re_ranking             {ours_time:8.3f} s   peak RSS +{ours_rss:7.0f} MB")
    print(
        f"  NumPy transcription            {reference_time:8.3f} s   peak RSS +{reference_rss:7.0f} MB"
        f"   tracemalloc peak {reference_traced:7.0f} MB"
    )
    print(f"  speed-up {reference_time / ours_time:6.1f}x   farreid / floor {ours_time / floor:5.2f}x")
    print(f"  max |farreid - transcription| = {difference:.2e}", flush=True)


def sweep(nums, dim: int, repeats: int, seed: int, check_num: int, sizes, noises) -> None:
    """farreid / floor over item counts, cluster sizes and noise levels, and the match with the transcription at
    N = check_num on the same distributions; prints one line per setting and the worst ratio."""
    print(f"sweep over N = {nums} (Q = N / 4, D = {dim}); exactness against the transcription at N = {check_num:,}")
    print("        N  cluster  noise   floor s  farreid s  ratio   max |farreid - transcription|")
    worst, errors = 0.0, {}
    for num in nums:
        for cluster_size in sizes:
            for noise in noises:
                features = clustered_features(num, dim, seed, cluster_size, noise)
                tensor = torch.from_numpy(features)
                query, gallery = tensor[: num // 4], tensor[num // 4 :]
                floor, ours = float("inf"), float("inf")
                for _ in range(repeats):  # interleaved, so that a change of load hits both alike
                    floor = min(floor, best_time(lambda t=tensor: t @ t.T, 1)[1])
                    ours = min(ours, best_time(lambda q=query, g=gallery: re_ranking(q, g, progress=False), 1)[1])
                if (cluster_size, noise) not in errors:
                    small = clustered_features(check_num, dim, seed, cluster_size, noise)
                    q_small, g_small = small[: check_num // 4], small[check_num // 4 :]
                    got = re_ranking(torch.from_numpy(q_small), torch.from_numpy(g_small), progress=False).numpy()
                    errors[cluster_size, noise] = float(np.abs(got - re_ranking_reference(q_small, g_small)).max())
                worst = max(worst, ours / floor)
                print(
                    f"  {num:7,d}  {cluster_size:7d}  {noise:5.2f}  {floor:8.3f}  {ours:9.3f}  {ours / floor:5.2f}x"
                    f"  {errors[cluster_size, noise]:.1e}",
                    flush=True,
                )
    print(f"  worst farreid / floor over the sweep: {worst:.2f}x")


def alone(num: int, dim: int, seed: int) -> None:
    """farreid alone at a size the transcription cannot hold; prints time and memory."""
    features = torch.from_numpy(clustered_features(num, dim, seed))
    num_query = num // 4
    start = time.perf_counter()
    output, rss = peak_rss(lambda: re_ranking(features[:num_query], features[num_query:], progress=True))
    elapsed = time.perf_counter() - start
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(f"N = {num:,} (Q = {num_query:,}, G = {num - num_query:,}, D = {dim}): farreid {elapsed:.1f} s")
    print(f"  peak RSS +{rss:,.0f} MB above the start, process peak RSS {max_rss:,.0f} MB")
    size = output.numel() * 4 / _MB
    print(f"  output {tuple(output.shape)} float32 = {size:,.0f} MB, all finite: {bool(output.isfinite().all())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 6000], help="N = Q + G compared")
    parser.add_argument("--large", action="store_true", help="also run farreid alone at N = 20,000 and 50,000")
    parser.add_argument("--large-sizes", type=int, nargs="+", default=[20_000, 50_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of torch code; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--sweep", action="store_true", help="sweep cluster sizes and noise levels instead")
    parser.add_argument("--sweep-sizes", type=int, nargs="+", default=[2000, 6000, 12000], help="N of the sweep")
    parser.add_argument("--check-size", type=int, default=1500, help="N of the sweep's exactness checks")
    parser.add_argument("--cluster-sizes", type=int, nargs="+", default=[2, 6, 20, 50])
    parser.add_argument("--noises", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--child", choices=["farreid", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        child_memory(args.child, args.sizes[0], args.dim, args.seed)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes on the machine skew the times)")
    warm_up = torch.from_numpy(clustered_features(400, args.dim, args.seed + 1))
    re_ranking(warm_up[:100], warm_up[100:])  # thread pools and first allocations are not timed
    if args.sweep:
        sweep(args.sweep_sizes, args.dim, args.repeats, args.seed, args.check_size, args.cluster_sizes, args.noises)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return
    for num in args.sizes:
        compare(num, args.dim, args.repeats, args.seed)
    if args.large:
        for num in args.large_sizes:
            alone(num, args.dim, args.seed)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
