"""``farreid index``: a FAISS index over one or more ``farreid embed`` outputs, with the tracklet table beside it.

    farreid index emb/city_a emb/city_b --out idx --kind auto --shards 4

writes ``idx/meta.json`` (kind, parameters, row ranges of the shards, the farreid and FAISS versions that built
it), ``idx/shard-NNNNN.faiss`` per shard and ``idx/table/`` (one row per vector). See farreid.search.index for the
kinds and the ``auto`` rule.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from farreid.search.build import build_index
from farreid.search.embeddings import read_embeddings
from farreid.search.index import EXACT_MAX, KINDS, STORAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farreid index", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("embeddings", nargs="+", help="`farreid embed --out` folders (embeddings.npz + tracklets.csv)")
    parser.add_argument("--out", required=True, help="the index folder to write")
    parser.add_argument(
        "--kind", choices=(*KINDS, "auto"), default="auto", help=f"auto: flat up to {EXACT_MAX:,} vectors, else ivf"
    )
    parser.add_argument(
        "--storage",
        choices=STORAGE,
        default=None,
        help="vectors kept as float32 / float16 (the default of ivf, ivfpq) / pq (ivfpq only: codes, no copy)",
    )
    parser.add_argument("--shards", type=int, default=1, help="contiguous row ranges, one FAISS index each")
    parser.add_argument("--seed", type=int, default=0, help="training sample of approximate indexes")
    parser.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``farreid index``; returns the exit code."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if (out / "meta.json").exists() and not args.overwrite:
            raise FileExistsError(f"{out} already holds an index: pass --overwrite to replace it, or another --out")
        start = time.perf_counter()
        embeddings = read_embeddings(args.embeddings)
        index = build_index(embeddings, args.kind, storage=args.storage, shards=args.shards, seed=args.seed)
        if out.exists() and args.overwrite:
            shutil.rmtree(out)
        index.save(out)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
        print(f"farreid index: error: {err}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in out.glob("shard-*.faiss"))
    print(
        f"[farreid] index of {len(index):,} vectors of {index.dim} d in {out}: {index.spec.factory()} in "
        f"{args.shards} shard(s), {size / len(index):.0f} bytes a vector, built in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
