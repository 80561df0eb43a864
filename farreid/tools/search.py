"""``farreid search``: the top K rows of an index for every query embedding, optionally re-ranked.

    farreid search idx emb/queries --top-k 100 --out hits --cross-view --rerank

writes ``hits/ranking.npz`` (``indices``: Q x K int64 rows of the index's table, best first, -1 where a filter
left fewer than K; ``distances``: Q x K float32, squared Euclidean or re-ranked) and ``hits/ranking.csv`` (query,
rank, gallery, pid, camid, view, distance). With ``--distributed`` every process of a torchrun or srun job holds
some of the index's shards (see farreid.search.distributed); rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from farreid.search.build import open_index
from farreid.search.embeddings import read_embeddings
from farreid.search.query import RANKING_CSV, RANKING_NPZ, parse_where, rank, write_ranking


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farreid search", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("index", help="a folder written by `farreid index`")
    parser.add_argument("queries", nargs="+", help="`farreid embed --out` folders of the queries")
    parser.add_argument("--out", required=True, help="folder for ranking.npz and ranking.csv")
    parser.add_argument("--top-k", type=int, default=100, help="results a query (default: 100)")
    parser.add_argument("--where", action="append", metavar="COLUMN=V[,V]", help="allowed rows, e.g. view=ground")
    parser.add_argument("--cross-view", action="store_true", help="aerial queries see ground rows and vice versa")
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking of each query's candidates")
    parser.add_argument("--rerank-depth", type=int, default=None, help="candidates re-ranked (default max(K, 100))")
    parser.add_argument(
        "--no-expand", dest="expand", action="store_false", help="re-rank only the --rerank-depth candidates"
    )
    parser.add_argument("--k1", type=int, default=20, help="re-ranking k1 (default 20, Zhong et al.)")
    parser.add_argument("--k2", type=int, default=6, help="re-ranking k2 (default 6)")
    parser.add_argument("--lambda", dest="lambda_value", type=float, default=0.3, help="re-ranking lambda (0.3)")
    parser.add_argument("--nprobe", type=int, default=None, help="ivf, ivfpq: lists visited (default: the index's)")
    parser.add_argument("--ef", type=int, default=None, help="hnsw: search breadth (default: the index's)")
    parser.add_argument("--distributed", action="store_true", help="shards over the ranks of torchrun / srun")
    parser.add_argument("--overwrite", action="store_true", help="replace a ranking already in --out")
    return parser


def _run(args) -> str:
    out = Path(args.out)
    held = [n for n in (RANKING_NPZ, RANKING_CSV) if (out / n).exists()]
    if held and not args.overwrite:
        raise FileExistsError(f"{out} already holds {' and '.join(held)}: pass --overwrite, or another --out")
    options = {
        "where": parse_where(args.where),
        "cross_view": args.cross_view,
        "rerank": args.rerank,
        "depth": args.rerank_depth,
        "k1": args.k1,
        "k2": args.k2,
        "lambda_value": args.lambda_value,
        "nprobe": args.nprobe,
        "ef": args.ef,
        "expand": args.expand,
    }
    start = time.perf_counter()
    if args.distributed:
        return _run_distributed(args, out, options, start)
    index, queries = open_index(args.index), read_embeddings(args.queries)
    ranking = rank(index, queries, args.top_k, **options)
    write_ranking(out, ranking, queries, index.table)
    return _summary(args, ranking, queries, index, out, start)


def _run_distributed(args, out: Path, options: dict, start: float) -> str:
    """Every rank holds its shards; rank 0 reads the queries, broadcasts them and writes the ranking."""
    import torch.distributed as dist

    from farreid.search.distributed import ShardedIndex, broadcast, init_group

    rank_id, _size = init_group()
    try:
        loaded = None
        if rank_id == 0:
            try:
                loaded = read_embeddings(args.queries)
            except (FileNotFoundError, ValueError) as err:
                loaded = err
        loaded = broadcast(loaded)  # the queries, or rank 0's error on every rank
        if isinstance(loaded, Exception):
            raise loaded
        index, queries = ShardedIndex(args.index), loaded
        ranking = rank(index, queries, args.top_k, **options)
        if rank_id != 0:
            return ""
        write_ranking(out, ranking, queries, index.table)
        return _summary(args, ranking, queries, index, out, start)
    finally:
        dist.destroy_process_group()


def _summary(args, ranking, queries, index, out: Path, start: float) -> str:
    short = f"; {ranking.short} queries with fewer than {args.top_k} allowed rows" if ranking.short else ""
    return (
        f"[farreid] {len(queries):,} queries x top {args.top_k} of {len(index):,} rows"
        f"{' re-ranked' if args.rerank else ''} in {time.perf_counter() - start:.1f} s -> {out}{short}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``farreid search``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        message = _run(args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, ImportError, KeyError) as err:
        print(f"farreid search: error: {err}", file=sys.stderr)
        return 2
    if message:
        print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
