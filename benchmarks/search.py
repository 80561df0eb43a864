"""Benchmark of farreid's archive search (farreid/search): build, size, query time, memory, recall, re-ranking.

Run from the repository root:

    python benchmarks/search.py                          # N = 200,000 and 1,000,000; every distribution
    python benchmarks/search.py --sizes 200000 --dists c10
    python benchmarks/search.py --skip archive           # only candidate vs dense re-ranking at N = 20,000
    python benchmarks/search.py --json out.json          # the figures, also as JSON

Embeddings are generated clustered 768-d unit vectors (the distributions of benchmarks/reranking.py's sweep: about
``cluster`` rows an identity around random centres, Gaussian noise of ``noise`` times the centres' scale; ``aniso``
also scales dimension i by (1 + i)^-1/2, an effective dimension of about 27, as learned embeddings concentrate
their variance); the queries are 1,000 more rows of the same identities. Each measurement runs in a fresh child
process, whose peak resident set (VmHWM, reset through /proc/self/clear_refs at the start of each phase) is read
per phase:

1. archive (each N, each distribution): exact top-100 of every query (``faiss.knn``, float32: the ground truth and
   the exact search time); ``build_index(kind="auto")`` (ivfpq above 100,000 rows: training, adding) and its saved
   size per vector; then, in the same child after the input is freed, the index opened from disk and searched
   (k = 100) at the default and at other ``nprobe`` / ``k_factor``: recall@100 against the exact top-100 and the
   time per 1,000 queries; and candidate re-ranking (``rank(..., rerank=True)``, depth 100) at the default setting;
2. rerank (each distribution, N = 20,000 rows, where the dense algorithm fits): candidate re-ranking over an exact
   index vs the dense ``re_ranking``: mAP (identity = cluster; the candidates first in their re-ranked order, the
   other rows after them in the plain order) and the time and peak memory of each.

Times are wall seconds of one run on this machine (2 cores, shared: a load figure is printed beside them).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (rows an identity, noise scale, anisotropic)
DISTS = {
    "c10": (10, 1.0, False),
    "c50": (50, 1.0, False),
    "noisy": (10, 2.0, False),
    "aniso": (10, 1.0, True),
    "aniso-c3": (3, 1.0, True),
    "aniso-noisy": (10, 1.5, True),
}
_MB = 2**20
BLOCK = 65_536


def generate(num: int, num_query: int, dim: int, dist: str, seed: int = 0):
    """(num, dim) gallery and (num_query, dim) query float32 unit rows with their identities (see the docstring),
    made in blocks so that the peak stays near the output's size."""
    cluster, noise, aniso = DISTS[dist]
    rng = np.random.default_rng(seed)
    num_ids = max(2, num // cluster)
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
    scale = (1.0 + np.arange(dim, dtype=np.float32)) ** -0.5 if aniso else None
    total = num + num_query
    labels = rng.integers(0, num_ids, total)
    out = np.empty((total, dim), dtype=np.float32)
    for start in range(0, total, BLOCK):
        rows = slice(start, min(start + BLOCK, total))
        block = centres[labels[rows]] + noise * rng.standard_normal((rows.stop - start, dim), dtype=np.float32)
        if scale is not None:
            block *= scale
        out[rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out[:num], out[num:], labels[:num], labels[num:]


def _status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class Phase:
    """Wall time and peak RSS (absolute, and above the RSS at the start) of a ``with`` block."""

    def __enter__(self):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        self.start_rss, self.start = _status("VmRSS"), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.peak = _status("VmHWM")
        self.grown = self.peak - self.start_rss


def _table(num: int, labels: np.ndarray):
    from farreid.search.table import table_from_columns

    view = np.where(np.arange(num) % 2 == 0, "ground", "aerial")
    return table_from_columns((f"t{i:07d}" for i in range(num)), view, pid=labels)


def child_archive(
    num: int, num_query: int, dim: int, dist: str, kind: str, rerank_queries: int, rerank_dists, folder: Path
) -> dict:
    import faiss

    from farreid.search import EmbeddingSet, build_index, open_index, rank

    out = {"N": num, "dist": dist, "kind": kind}
    gallery, queries, g_labels, q_labels = generate(num, num_query, dim, dist)
    with Phase() as exact:
        truth = faiss.knn(queries, gallery, 100, metric=faiss.METRIC_INNER_PRODUCT)[1]
    out["exact_s_per_1000"] = exact.seconds * 1000 / num_query
    same = g_labels[truth] == q_labels[:, None]  # the query's identity among the exact top 100
    embset = EmbeddingSet(gallery, _table(num, g_labels))
    with Phase() as build:
        index = build_index(embset, kind=kind)
    spec = index.spec
    out.update(spec=spec.factory(), nlist=spec.nlist, nprobe=spec.nprobe, k_factor=spec.k_factor)
    out.update(build_s=build.seconds, build_peak_mb=build.peak / _MB, input_mb=gallery.nbytes / _MB)
    index.save(folder)
    out["bytes_per_vector"] = sum(p.stat().st_size for p in folder.glob("shard-*.faiss")) / num
    out["table_bytes_per_row"] = sum(p.stat().st_size for p in (folder / "table").rglob("*") if p.is_file()) / num
    del index, embset, gallery
    gc.collect()
    with Phase() as opened:
        index = open_index(folder)
        index.search(queries, 100)
    out.update(search_peak_mb=opened.peak / _MB, open_search_s=opened.seconds)
    sweep = []
    nprobes = [0] if not spec.nlist else sorted({max(1, spec.nlist // d) for d in (16, 8, 4, 2)} | {spec.nprobe})
    factors = (4, 16, 64) if spec.kind == "ivfpq" else (spec.k_factor,)
    for nprobe in nprobes:
        for k_factor in factors:
            index.spec.k_factor = k_factor
            index.search(queries[:50], 100, nprobe=nprobe or None)  # warm
            start = time.perf_counter()
            found = index.search(queries, 100, nprobe=nprobe or None)[1]
            seconds = time.perf_counter() - start
            kept = _hits(found, truth)
            point = {
                "nprobe": nprobe,
                "k_factor": k_factor,
                "recall@100": float(kept.mean()),
                "same_id_recall": float(kept[same].mean()) if same.any() else 1.0,
                "s_per_1000": seconds * 1000 / num_query,
            }
            sweep.append(point)
            if nprobe == (spec.nprobe if spec.nlist else 0) and k_factor == spec.k_factor:
                out.update(
                    {key: point[key] for key in ("recall@100", "same_id_recall")},
                    query_s_per_1000=seconds * 1000 / num_query,
                )
    index.spec.k_factor = spec.k_factor
    out["sweep"] = sweep
    out["same_id_in_top100"] = float(same.sum(1).mean())
    if rerank_queries and dist in rerank_dists:
        query_set = EmbeddingSet(queries[:rerank_queries], _table(rerank_queries, q_labels[:rerank_queries]))
        with Phase() as rerank:
            rank(index, query_set, 100, rerank=True)
        out.update(rerank_queries=rerank_queries, rerank_s=rerank.seconds, rerank_grown_mb=rerank.grown / _MB)
    return out


def _hits(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(Q, 100) bool: is each exact neighbour among the found ones?"""
    return np.stack([np.isin(t, f) for f, t in zip(found, truth, strict=True)])


def _map(order_rows: np.ndarray, g_labels: np.ndarray, q_labels: np.ndarray) -> float:
    """mAP of full rankings ((Q, N) row orders) with identity = label."""
    aps = []
    for row, label in zip(order_rows, q_labels, strict=True):
        hits = g_labels[row] == label
        if not hits.any():
            continue
        ranks = np.flatnonzero(hits) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    return 100.0 * float(np.mean(aps))


def _complete(candidates: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """Full orders: each row's candidates first (their order), then the rest of ``plain``'s order."""
    out = np.empty_like(plain)
    for q, (cand, order) in enumerate(zip(candidates, plain, strict=True)):
        cand = cand[cand >= 0]
        out[q] = np.concatenate([cand, order[~np.isin(order, cand)]])
    return out


def child_rerank(num: int, num_query: int, dim: int, dist: str, depth: int) -> dict:
    import torch

    from farreid.evaluation.reranking import re_ranking
    from farreid.search import EmbeddingSet, build_index, rank

    gallery, queries, g_labels, q_labels = generate(num, num_query, dim, dist, seed=1)
    plain = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")
    out = {"N": num, "dist": dist, "depth": depth, "plain_mAP": _map(plain, g_labels, q_labels)}
    with Phase() as dense:
        distances = re_ranking(torch.from_numpy(queries), torch.from_numpy(gallery)).numpy()
    out.update(dense_s=dense.seconds, dense_grown_mb=dense.grown / _MB)
    out["dense_mAP"] = _map(np.argsort(distances, axis=1, kind="stable"), g_labels, q_labels)
    del distances
    index = build_index(EmbeddingSet(gallery, _table(num, g_labels)), kind="flat")
    query_set = EmbeddingSet(queries, _table(num_query, q_labels))
    with Phase() as cand:
        ranking = rank(index, query_set, depth, rerank=True, depth=depth)
    out.update(candidate_s=cand.seconds, candidate_grown_mb=cand.grown / _MB)
    out["candidate_mAP"] = _map(_complete(ranking.indices, plain), g_labels, q_labels)
    return out


def _child(args: argparse.Namespace) -> None:
    what, num, dist, kind = args.child
    if what == "archive":
        with tempfile.TemporaryDirectory(prefix="farreid-search-bench-") as folder:
            result = child_archive(
                int(num), args.queries, args.dim, dist, kind, args.rerank_queries, args.rerank_dists, Path(folder)
            )
    else:
        result = child_rerank(int(num), args.queries, args.dim, dist, args.depth)
    print(json.dumps(result))


def run_child(args: argparse.Namespace, *child: str) -> dict:
    options = ["--queries", str(args.queries), "--dim", str(args.dim), "--depth", str(args.depth)]
    options += ["--rerank-queries", str(args.rerank_queries), "--rerank-dists", *args.rerank_dists]
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, __file__, "--child", *child, *options], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"child {child} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_before"] = load
    return result


def print_archive(r: dict) -> None:
    line = (
        f"N = {r['N']:,} {r['dist']:11s} {r['spec']}: build {r['build_s']:.1f} s (peak RSS {r['build_peak_mb']:,.0f} MB"
        f" with the {r['input_mb']:,.0f} MB input), {r['bytes_per_vector']:.0f} B/vector + table "
        f"{r['table_bytes_per_row']:.0f} B/row on disk; open + search peak RSS {r['search_peak_mb']:,.0f} MB; "
        f"exact (faiss.knn) {r['exact_s_per_1000']:.2f} s / 1000 queries; default: recall@100 {r['recall@100']:.4f} "
        f"(same identity {r['same_id_recall']:.4f} of {r['same_id_in_top100']:.1f} a query), "
        f"{r['query_s_per_1000']:.2f} s / 1000"
    )
    if "rerank_s" in r:
        line += (
            f"; candidate re-ranking (depth 100) {r['rerank_s'] / r['rerank_queries']:.2f} s a query "
            f"({r['rerank_queries']} queries), +{r['rerank_grown_mb']:,.0f} MB"
        )
    print(line + f"; load {r['load_before']:.1f}", flush=True)
    if len(r["sweep"]) > 1:
        for s in r["sweep"]:
            print(
                f"    nprobe {s['nprobe']:5d} k_factor {s['k_factor']:2d}: recall@100 {s['recall@100']:.4f} "
                f"(same identity {s['same_id_recall']:.4f}), {s['s_per_1000']:.2f} s / 1000 queries",
                flush=True,
            )


def print_rerank(r: dict) -> None:
    print(
        f"N = {r['N']:,} {r['dist']:11s}: mAP plain {r['plain_mAP']:.2f}, dense re-ranking {r['dense_mAP']:.2f} "
        f"({r['dense_s']:.1f} s, +{r['dense_grown_mb']:,.0f} MB), candidate re-ranking (depth {r['depth']}) "
        f"{r['candidate_mAP']:.2f} ({r['candidate_s']:.1f} s, +{r['candidate_grown_mb']:,.0f} MB): "
        f"difference {r['candidate_mAP'] - r['dense_mAP']:+.2f} points; load {r['load_before']:.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--dists", nargs="+", default=list(DISTS), choices=list(DISTS))
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf"], choices=["flat", "ivf", "ivfpq", "hnsw", "auto"])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rerank-queries", type=int, default=10, help="queries of the archive re-ranking (0: none)")
    parser.add_argument("--rerank-dists", nargs="+", default=["aniso"], help="distributions of the archive re-ranking")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rerank-size", type=int, default=20_000)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--skip", nargs="*", default=[], choices=["archive", "rerank"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    results = {"archive": [], "rerank": []}
    if "rerank" not in args.skip:
        print(f"candidate vs dense k-reciprocal re-ranking, {args.queries} queries (k1 20, k2 6, lambda 0.3):")
        for dist in args.dists:
            results["rerank"].append(run_child(args, "rerank", str(args.rerank_size), dist, "flat"))
            print_rerank(results["rerank"][-1])
    if "archive" not in args.skip:
        print(f"archive search, {args.queries} queries, k = 100, {args.dim} d:")
        for num in args.sizes:
            for dist in args.dists:
                for kind in args.kinds:
                    results["archive"].append(run_child(args, "archive", str(num), dist, kind))
                    print_archive(results["archive"][-1])
                    if args.json:
                        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
