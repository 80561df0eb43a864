"""Searching an archive of tracklet embeddings: FAISS indexes in shards, filters, candidate re-ranking.

    from farreid.search import build_index, open_index, rank, read_embeddings

    index = build_index(read_embeddings(["emb/city_a", "emb/city_b"]), kind="auto", shards=4)
    index.save("idx")                                   # `farreid index emb/city_a emb/city_b --out idx --shards 4`
    ranking = rank(open_index("idx"), read_embeddings("emb/queries"), k=100, cross_view=True, rerank=True)
    ranking.indices, ranking.distances                  # (Q, 100) rows of the index's table, best first

Modules: ``table`` (the tracklet table), ``embeddings`` (reading `farreid embed` output), ``index`` (kinds and
their parameters), ``build`` (building, opening), ``query`` (ranking, output files), ``rerank`` (candidate
k-reciprocal re-ranking), ``distributed`` (shards over torch.distributed ranks).
"""

from farreid.search.build import build_index, open_index
from farreid.search.embeddings import EmbeddingSet, read_embeddings
from farreid.search.index import ArchiveIndex, IndexSpec, choose_spec
from farreid.search.query import Ranking, rank, write_ranking
from farreid.search.rerank import candidate_rerank

__all__ = [
    "ArchiveIndex",
    "EmbeddingSet",
    "IndexSpec",
    "Ranking",
    "build_index",
    "candidate_rerank",
    "choose_spec",
    "open_index",
    "rank",
    "read_embeddings",
    "write_ranking",
]
