"""A FAISS index over unit-length tracklet embeddings, in shards, with its tracklet table.

Kinds (inner product on L2-normalised vectors; distances are reported as squared Euclidean, 2 - 2 cos):

- ``flat``: exact. ``storage`` float32 (``IndexFlatIP``, 4 D bytes a vector) or float16 (``SQfp16``, 2 D bytes,
  scores within ~1e-4 of exact).
- ``ivf``: an inverted file of ``nlist`` lists holding the vectors as float16 (``storage`` float16, the default:
  2 D bytes a vector) or float32; the probed lists are scanned exactly.
- ``ivfpq``: an inverted file of ``nlist`` lists with product-quantised codes (``pq_m`` bytes a vector) for the
  candidates, re-scored against a float16 copy of the vectors (``storage`` float16, the default; ``k_factor`` x k
  candidates re-scored), a float32 copy (``float32``), or nothing (``pq``: codes only, lowest recall).
- ``hnsw``: a graph of ``hnsw_m`` links a node over float32 or float16 vectors; no training, slow to build.
- ``auto`` (:func:`choose_spec`): ``flat`` up to ``EXACT_MAX`` vectors, ``ivf`` above.

The parameter rules follow the FAISS wiki's "Guidelines to choose an index" (IVF lists ~ sqrt(N) to 16 sqrt(N),
30-256 training points a list, PQ sub-vectors of ~8 dimensions); the values picked inside those ranges are
farreid's, measured in benchmarks/search.py (docs/BENCHMARKS.md, "Searching an archive").

Shards are contiguous row ranges, each its own FAISS index (trained once, then cloned): several of them are searched
one after another and their top-k lists merged (:func:`merge_topk`), the same merge the distributed search uses,
so filters apply per shard with local ids.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from farreid import __version__
from farreid.evaluation.search import _load_faiss
from farreid.search.table import TrackletTable

FORMAT = 1  # the index folder's layout; bumped when it changes
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
STORAGE = ("float32", "float16", "pq")
# farreid choice, measured (benchmarks/search.py, docs/BENCHMARKS.md): up to 1M vectors exact BLAS search on a CPU is as
# fast as an ivf index at the nprobe that reaches recall@100 0.99 (and exact); 3 GB at 1M x 768 float32.
EXACT_MAX = 1_000_000
# farreid choice, measured (benchmarks/search.py): the IVF lists visited are nlist / NPROBE_DIVISOR, and an ivfpq
# index re-scores PQ_K_FACTOR x k candidates against its stored vectors.
NPROBE_DIVISOR = 2
PQ_K_FACTOR = 16
# Rows added to a FAISS index at once (bounded temporaries while adding).
ADD_BLOCK = 65_536


def require_faiss():
    """The faiss module; ImportError with the install line when it is missing (the archive has no fallback)."""
    faiss = _load_faiss()
    if faiss is None:
        raise ImportError("farreid index/search need FAISS: pip install 'farreid[cpu]' (or '[gpu]')")
    return faiss


@dataclass
class IndexSpec:
    """How an index is built and searched by default (see the module docstring)."""

    kind: str
    storage: str = "float32"
    nlist: int = 0
    pq_m: int = 0
    pq_bits: int = 8
    nprobe: int = 1
    k_factor: int = 4
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    train_size: int = 0

    def factory(self) -> str:
        """The ``faiss.index_factory`` string of this spec."""
        sq = {"float32": "", "float16": "_SQfp16"}
        if self.kind == "flat":
            return "Flat" if self.storage == "float32" else "SQfp16"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m}{sq[self.storage]}"
        if self.kind == "ivf":
            return f"IVF{self.nlist},{'Flat' if self.storage == 'float32' else 'SQfp16'}"
        refine = {"float32": ",RFlat", "float16": ",Refine(SQfp16)", "pq": ""}[self.storage]
        return f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_bits}{refine}"


def _pq_m(dim: int) -> int:
    """Sub-quantisers: the most that divide ``dim`` with at least 8 dimensions each (96 for 768 d)."""
    return max([m for m in range(1, dim // 8 + 1) if dim % m == 0] or [1])


def choose_spec(num: int, dim: int, kind: str = "auto", storage: str | None = None) -> IndexSpec:
    """The index for ``num`` vectors of ``dim`` dimensions.

    auto: ``flat`` when ``num <= EXACT_MAX`` else ``ivf``. ivf, ivfpq: nlist = sqrt(num) rounded to a power of two
    (the wiki's low end, farreid choice: k-means training on a CPU grows with nlist), at most num / 39 (FAISS wants
    39 training points a centroid); 8-bit PQ codes when num >= 9,984 (39 x 256), fewer bits below; training on
    min(num, 64 nlist) vectors (ivfpq: at least 9,984); nprobe = nlist / 2 (farreid choice: recall@100 >= 0.99 on
    the anisotropic distributions of benchmarks/search.py, not on isotropic ones; docs/BENCHMARKS.md).
    """
    if kind == "auto":
        kind = "flat" if num <= EXACT_MAX else "ivf"
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {(*KINDS, 'auto')}, got {kind!r}")
    storage = storage or ("float16" if kind in ("ivf", "ivfpq") else "float32")
    allowed = STORAGE if kind == "ivfpq" else STORAGE[:2]
    if storage not in allowed:
        raise ValueError(f"storage for a {kind} index must be one of {allowed}, got {storage!r}")
    spec = IndexSpec(kind=kind, storage=storage)
    if kind in ("ivf", "ivfpq"):
        nlist = 2 ** round(math.log2(max(1.0, math.sqrt(num))))
        spec.nlist = max(1, min(nlist, num // 39))
        spec.train_size = min(num, 64 * spec.nlist)
        spec.nprobe = max(1, spec.nlist // NPROBE_DIVISOR)
    if kind == "ivfpq":
        spec.pq_m = _pq_m(dim)
        spec.pq_bits = int(min(8, max(1, math.floor(math.log2(max(2, num // 39))))))
        spec.train_size = min(num, max(spec.train_size, 39 * 2**spec.pq_bits))
        spec.k_factor = PQ_K_FACTOR
    return spec


@dataclass
class ArchiveIndex:
    """Shards of a FAISS index over rows ``offsets[s]:offsets[s + 1]``, and the tracklet table of all rows.

    Attributes:
        shards: {shard number: faiss index}; a rank of a distributed search holds only its own.
        offsets: (S + 1,) int64 first row of each shard (and the total).
        table: the tracklet table of all rows (shared by every rank; memory-mapped when opened).
        spec: how it was built; ``dim``: vector width.
    """

    shards: dict[int, object]
    offsets: np.ndarray
    table: TrackletTable
    spec: IndexSpec
    dim: int
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _params(self, local_allowed: np.ndarray | None, nprobe: int | None, ef: int | None, k: int):
        faiss = require_faiss()
        selector = None
        keep = None
        if local_allowed is not None:
            keep = np.packbits(local_allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(local_allowed), faiss.swig_ptr(keep))
        kind = self.spec.kind
        if kind == "flat":
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
        elif kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(ef or self.spec.ef_search, k))
            if selector is not None:
                params.sel = selector
        else:
            params = faiss.SearchParametersIVF(nprobe=nprobe or self.spec.nprobe)
            if selector is not None:
                params.sel = selector
            if kind == "ivfpq" and self.spec.storage != "pq":
                params = faiss.IndexRefineSearchParameters(k_factor=self.spec.k_factor, base_index_params=params)
        return params, (keep, selector)  # the bitmap and selector must outlive the search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        nprobe: int | None = None,
        ef: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows of each query among the shards held here.

        Args:
            queries: (Q, D) float32 unit rows.
            k: neighbours a query; at most the rows held. allowed: (N,) bool over all rows, or None for all.
            nprobe: IVF lists visited (ivf, ivfpq). ef: HNSW search breadth (hnsw); both default to the spec's.

        Returns:
            (Q, k) float32 squared Euclidean distances (ascending; inf where fewer than k rows qualify) and (Q, k)
            int64 row numbers of the table (-1 there).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape}, expected (Q, {self.dim}) like the index")
        held = sum(int(self.offsets[s + 1] - self.offsets[s]) for s in self.shards)
        if not 1 <= k <= held:
            raise ValueError(f"k = {k}: expected 1 <= k <= {held}, the rows of this index")
        parts = []
        for number, shard in sorted(self.shards.items()):
            lo, hi = int(self.offsets[number]), int(self.offsets[number + 1])
            local = None if allowed is None else allowed[lo:hi]
            if local is not None and not local.any():
                continue
            params, _alive = self._params(local, nprobe, ef, k)
            scores, ids = shard.search(queries, min(k, hi - lo), params=params)
            found = ids >= 0
            distance = np.full(scores.shape, np.inf, dtype=np.float32)
            distance[found] = 2.0 - 2.0 * scores[found]
            parts.append((distance, np.where(found, ids + lo, -1)))
        if not parts:
            return np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        return merge_topk(parts, k)

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        """(R, D) float32 stored vectors of table rows ``rows`` (exact for float32 storage, else approximate)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for number in np.unique(shard_of):
            if int(number) not in self.shards:
                raise KeyError(f"row of shard {number}, which this process does not hold")
            pick = shard_of == number
            out[pick] = self.shards[int(number)].reconstruct_batch(rows[pick] - self.offsets[number])
        return out

    def save(self, folder: str | Path) -> Path:
        """Write ``meta.json``, ``shard-NNNNN.faiss`` per shard and ``table/`` into ``folder``."""
        faiss = require_faiss()
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for number, shard in self.shards.items():
            faiss.write_index(shard, str(out / f"shard-{number:05d}.faiss"))
        self.table.save(out / "table")
        meta = {
            "format": FORMAT,
            "farreid": __version__,
            "faiss": faiss.__version__,
            "metric": "inner_product",
            "dim": self.dim,
            "rows": len(self),
            "offsets": [int(o) for o in self.offsets],
            "spec": asdict(self.spec),
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (Q, k_s) distances (inf for none) and global row ids (-1) into the best k of each row.

    Equal distances keep shard order (stable sort), so a merge of exact shards equals the exact single-index
    search except between exactly equal distances.
    """
    distance = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32)
    ids = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)
    order = np.argsort(distance, axis=1, kind="stable")[:, :k]
    distance, ids = np.take_along_axis(distance, order, 1), np.take_along_axis(ids, order, 1)
    if ids.shape[1] < k:  # fewer rows than k in the shards searched
        pad = k - ids.shape[1]
        distance = np.pad(distance, ((0, 0), (0, pad)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return distance, ids
