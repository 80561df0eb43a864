"""farreid.search: indexes against brute force, shards, filters, candidate re-ranking against the dense algorithm,
the tracklet table, bad input, and the index/search commands (in-process; the console chain is in the slow tier)."""

import csv
import json
import os
import socket
import subprocess
import sys
from array import array
from pathlib import Path

import numpy as np
import pytest
import torch

from farreid.evaluation.reranking import re_ranking
from farreid.search import EmbeddingSet, build_index, candidate_rerank, open_index, rank, read_embeddings
from farreid.search.table import append_int, as_numpy, read_table, table_from_columns
from farreid.tools import embed
from farreid.tools import index as index_tool
from farreid.tools import search as search_tool

REPO = Path(__file__).resolve().parents[1]


def clustered(num: int, dim: int, seed: int, clusters: int = 40, spread: float = 0.35, draw: int = 0) -> np.ndarray:
    """Unit rows around random identity centres (what trained ReID embeddings look like, in miniature); ``draw``
    gives other points around the same centres (queries of the same identities)."""
    centres = np.random.default_rng(seed).standard_normal((clusters, dim))
    rng = np.random.default_rng([seed, draw])
    x = centres[rng.integers(0, clusters, num)] + spread * rng.standard_normal((num, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embed_output(folder: Path, vectors: np.ndarray, views=None, prefix: str = "t") -> Path:
    """An embed --out folder as `farreid embed` writes it (its own writer), rows in the real CSV format."""
    views = views if views is not None else ["aerial" if i % 2 else "ground" for i in range(len(vectors))]
    rows = [
        {"index": i, "split": "gallery", "name": f"{prefix}{i:05d}", "pid": i // 5, "camid": 0 if v == "ground" else 1,
         "view": v, "altitude": 0.0 if v == "ground" else 30.0, "distance": 0.0, "pitch": 0.0, "num_frames": 8,
         "folder": f"/data/gallery/{i // 5:04d}/{prefix}{i:05d}"}
        for i, v in enumerate(views)
    ]  # fmt: skip
    embed.write_embeddings(folder, rows, vectors)
    return folder


def brute_force(queries: np.ndarray, gallery: np.ndarray, k: int, allowed=None):
    scores = queries @ gallery.T
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, 2.0 - 2.0 * np.take_along_axis(scores, order, 1)


@pytest.fixture(scope="module")
def data():
    gallery = clustered(3000, 32, seed=0)
    queries = clustered(60, 32, seed=0, draw=1)
    table = table_from_columns(
        [f"g{i}" for i in range(len(gallery))], ["aerial" if i % 3 else "ground" for i in range(3000)]
    )
    return EmbeddingSet(gallery, table), queries


def test_flat_shards_and_saved_index_equal_brute_force(data, tmp_path):
    gallery, queries = data
    want, want_d = brute_force(queries, gallery.vectors, 10)
    for shards in (1, 3):
        index = build_index(gallery, "flat", shards=shards)
        dist, ids = index.search(queries, 10)
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_allclose(dist, want_d, atol=1e-5)
        index.save(tmp_path / f"s{shards}")
        np.testing.assert_array_equal(open_index(tmp_path / f"s{shards}").search(queries, 10)[1], want)
    only = open_index(tmp_path / "s3", shards=[1])
    assert list(only.shards) == [1] and np.all(only.search(queries, 5)[1] >= only.offsets[1])
    np.testing.assert_array_equal(index.reconstruct(np.array([0, 1500, 2999])), gallery.vectors[[0, 1500, 2999]])


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_approximate_kinds_find_the_true_neighbours(data, kind):
    gallery, queries = data
    want, _ = brute_force(queries, gallery.vectors, 10)
    index = build_index(gallery, kind, shards=2)
    _, ids = index.search(queries, 10, nprobe=index.spec.nlist)  # every list: only the codes' error is left
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want, strict=True)])
    assert recall >= 0.95, (kind, recall)


def test_filters_cross_view_and_short_lists(data):
    gallery, queries = data
    index = build_index(gallery, "flat", shards=2)
    ground = gallery.table.mask({"view": ["ground"]})
    dist, ids = index.search(queries, 7, allowed=ground)
    np.testing.assert_array_equal(ids, brute_force(queries, gallery.vectors, 7, ground)[0])
    query_set = EmbeddingSet(
        queries, table_from_columns([f"q{i}" for i in range(60)], ["aerial"] * 30 + ["ground"] * 30)
    )
    ranking = rank(index, query_set, 5, cross_view=True)
    views = gallery.table.view[ranking.indices]
    assert (views[:30] == 0).all() and (views[30:] == 1).all()  # aerial queries -> ground rows and back
    few = np.zeros(len(gallery), dtype=bool)
    few[:3] = True
    dist, ids = index.search(queries, 5, allowed=few)
    assert (ids[:, 3:] == -1).all() and np.isinf(dist[:, 3:]).all() and set(ids[:, :3].ravel()) <= {0, 1, 2}


def test_candidate_rerank_at_full_depth_equals_dense_reranking(data):
    gallery, queries = data
    vectors = gallery.vectors[:500]
    small = EmbeddingSet(vectors, table_from_columns([str(i) for i in range(500)], ["ground"] * 500))
    dense = re_ranking(torch.from_numpy(queries), torch.from_numpy(vectors), k1=20, k2=6, lambda_value=0.3).numpy()
    for shards, block in ((1, 64), (3, 16)):
        index = build_index(small, "flat", shards=shards)
        _, candidates = index.search(queries, 500)
        dist, ids = candidate_rerank(index, queries, candidates, block=block)
        np.testing.assert_allclose(dist, np.take_along_axis(dense, ids, 1), atol=1e-5)
        np.testing.assert_allclose(dist, np.sort(dense, axis=1), atol=1e-5)
    # Fewer candidates: the same algorithm on a neighbourhood; the order of the top stays close to the dense one.
    _, candidates = index.search(queries, 60)
    _, ids = candidate_rerank(index, queries, candidates)
    top = np.argsort(dense, axis=1, kind="stable")[:, :5]
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids[:, :5], top, strict=True)]) > 0.9


def test_candidate_rerank_expands_past_shallow_candidates_to_what_dense_reranking_pulls_forward():
    gallery = clustered(800, 32, seed=3, spread=1.0)
    queries = clustered(40, 32, seed=3, spread=1.0, draw=1)
    top = np.argsort(re_ranking(torch.from_numpy(queries), torch.from_numpy(gallery)).numpy(), 1, kind="stable")
    top = top[:, :10]
    table = table_from_columns([str(i) for i in range(800)], ["ground"] * 800)
    index = build_index(EmbeddingSet(gallery, table), "flat")
    _, candidates = index.search(queries, 20)

    def agreement(ids):
        shared = [set(a) & set(b) for a, b in zip(ids[:, :10], top, strict=True)]
        found_beyond = sum(len(s - set(c)) for s, c in zip(shared, candidates, strict=True))
        return np.mean([len(s) / 10 for s in shared]), found_beyond

    (narrow, narrow_beyond), (wide, wide_beyond) = (
        agreement(candidate_rerank(index, queries, candidates, expand=e)[1]) for e in (False, True)
    )
    assert narrow_beyond == 0 and wide_beyond > 0  # rows past the 20 candidates that the dense algorithm ranks top 10
    assert wide > narrow and wide >= 0.99


def test_tracklet_table_round_trip_and_size(tmp_path):
    folder = write_embed_output(tmp_path / "emb", clustered(50, 8, seed=2), prefix="trk_ü_")
    table = read_table(folder / "tracklets.csv", source=str(folder))
    assert table.row(7) == {
        "name": "trk_ü_00007", "view": "aerial", "pid": 1, "camid": 1, "altitude": 30.0, "distance": 0.0,
        "pitch": 0.0, "num_frames": 8, "split": "gallery", "parent": "/data/gallery/0001", "source": str(folder),
        "folder": "/data/gallery/0001/trk_ü_00007",
    }  # fmt: skip
    table.save(tmp_path / "t")
    again = type(table).load(tmp_path / "t")
    assert [again.row(i) for i in range(50)] == [table.row(i) for i in range(50)]
    per_row = [*table.numbers.values(), table.view, *table.codes.values(), table.names.offsets]
    assert sum(a.nbytes for a in per_row) <= 48 * len(table)  # besides the name: numbers, codes, offset
    assert len(table.values["parent"]) == 10  # the folder above a tracklet is stored once per PID folder


def test_tracklet_table_columns_widen_only_when_values_need_it(tmp_path):
    """Codes start as uint8 and widen past 256 distinct values; every row still reads back as the CSV says."""
    folder = write_embed_output(tmp_path / "emb", clustered(1500, 8, seed=4))  # 300 parent folders
    table = read_table(folder / "tracklets.csv", source="s")
    with open(folder / "tracklets.csv", newline="") as f:
        expected = list(csv.DictReader(f))
    assert [table.row(i)["folder"] for i in range(1500)] == [r["folder"] for r in expected]
    assert [table.row(i)["pid"] for i in range(1500)] == [int(r["pid"]) for r in expected]
    assert table.codes["parent"].dtype == np.uint16 and table.codes["split"].dtype == np.uint8
    assert table.names.offsets.dtype == np.uint32 and len(table.values["parent"]) == 300
    both = type(table).concat([table, table])
    assert [both.row(i) for i in (0, 1499, 1500, 2999)] == [table.row(i) for i in (0, 1499, 0, 1499)]
    table.save(tmp_path / "t")
    again = type(table).load(tmp_path / "t")
    assert [again.row(i) for i in range(0, 1500, 7)] == [table.row(i) for i in range(0, 1500, 7)]
    columns = {"a": array("B"), "b": array("I")}
    for value in (3, 255, 256, 65_536):
        append_int(columns, "a", value)
    append_int(columns, "b", 2**32)
    assert columns["a"].typecode == "i" and list(columns["a"]) == [3, 255, 256, 65_536]
    assert columns["b"].typecode == "q" and as_numpy(columns["b"]).tolist() == [2**32]


def test_bad_input_is_one_clear_error(tmp_path):
    a = write_embed_output(tmp_path / "a", clustered(20, 8, seed=3))
    b = write_embed_output(tmp_path / "b", clustered(20, 16, seed=3))
    with pytest.raises(ValueError, match="different dimensions"):
        read_embeddings([a, b])
    bad = tmp_path / "nan"
    write_embed_output(bad, clustered(20, 8, seed=3))
    with np.load(bad / "embeddings.npz") as saved:
        vectors, names = saved["embeddings"], saved["names"]
    for change, message in (
        (lambda v: v.__setitem__((4, 0), np.nan), r"row 4 \(t00004\) is not finite"),
        (lambda v: v.__setitem__(6, v[6] * 3), r"row 6 \(t00006\) has norm 3"),
    ):
        broken = vectors.copy()
        change(broken)
        np.savez(bad / "embeddings.npz", embeddings=broken, names=names)
        with pytest.raises(ValueError, match=message):
            read_embeddings(bad)
    np.savez(bad / "embeddings.npz", embeddings=vectors[:0], names=names[:0])
    with pytest.raises(ValueError, match="no embeddings"):
        read_embeddings(bad)
    np.savez(bad / "embeddings.npz", embeddings=vectors[:19], names=names[:19])
    with pytest.raises(ValueError, match="has 20 rows but .* has 19 embeddings"):
        read_embeddings(bad)
    (bad / "embeddings.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        read_embeddings(bad)
    (tmp_path / "cols").mkdir()
    np.savez(tmp_path / "cols" / "embeddings.npz", embeddings=vectors, names=names)
    (tmp_path / "cols" / "tracklets.csv").write_text("index,name\n0,x\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_embeddings(tmp_path / "cols")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_embeddings(tmp_path / "nowhere")
    nan = vectors.copy()
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"row 2 \(x2\) is not finite"):  # a set made in Python is checked too
        EmbeddingSet(nan, table_from_columns([f"x{i}" for i in range(20)], ["ground"] * 20))
    index = build_index(read_embeddings(a), "flat")
    with pytest.raises(ValueError, match="k = 21"):
        index.search(clustered(2, 8, seed=4), 21)
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    (tmp_path / "idx" / "meta.json").write_text(json.dumps({**meta, "faiss": "0.0.1"}))
    with pytest.raises(ValueError, match="FAISS 0.0.1.*rebuild it"):
        open_index(tmp_path / "idx")


def test_index_and_search_commands(tmp_path, capsys):
    gallery = write_embed_output(tmp_path / "gallery", clustered(400, 16, seed=5))
    more = write_embed_output(tmp_path / "more", clustered(100, 16, seed=6), prefix="m")
    queries = write_embed_output(tmp_path / "queries", clustered(12, 16, seed=7), prefix="q")
    idx, hits = tmp_path / "idx", tmp_path / "hits"
    assert index_tool.main([str(gallery), str(more), "--out", str(idx), "--shards", "2"]) == 0
    assert "index of 500 vectors of 16 d" in capsys.readouterr().out
    assert index_tool.main([str(gallery), "--out", str(idx)]) == 2 and "--overwrite" in capsys.readouterr().err
    assert search_tool.main([str(idx), str(queries), "--out", str(hits), "--top-k", "5", "--where", "view=ground"]) == 0
    with np.load(hits / "ranking.npz") as saved:
        ids, dist = saved["indices"], saved["distances"]
    all_vectors = read_embeddings([gallery, more]).vectors
    ground = np.array([i % 2 == 0 for i in range(400)] + [i % 2 == 0 for i in range(100)])
    np.testing.assert_array_equal(ids, brute_force(read_embeddings(queries).vectors, all_vectors, 5, ground)[0])
    lines = (hits / "ranking.csv").read_text().splitlines()
    assert lines[0] == "query,rank,gallery,pid,camid,view,distance" and len(lines) == 1 + 12 * 5
    first = lines[1].split(",")
    assert first[:2] == ["q00000", "1"] and first[5] == "ground" and abs(float(first[6]) - dist[0, 0]) < 1e-5
    for argv, message in (
        ([str(idx), str(queries), "--out", str(hits), "--top-k", "5"], "--overwrite"),
        ([str(idx), str(queries), "--out", str(tmp_path / "h2"), "--top-k", "501"], "--top-k 501"),
        ([str(idx), str(queries), "--out", str(tmp_path / "h2"), "--where", "view"], "COLUMN=VALUE"),
        ([str(tmp_path), str(queries), "--out", str(tmp_path / "h2")], "meta.json not found"),
    ):
        assert search_tool.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rerank", [False, True])
def test_two_gloo_ranks_give_the_single_index_result(tmp_path, rerank):
    gallery = write_embed_output(tmp_path / "gallery", clustered(600, 16, seed=8))
    queries = write_embed_output(tmp_path / "queries", clustered(20, 16, seed=9), prefix="q")
    assert index_tool.main([str(gallery), "--out", str(tmp_path / "idx"), "--kind", "flat", "--shards", "3"]) == 0
    extra = ["--rerank", "--rerank-depth", "50"] if rerank else []
    common = [str(tmp_path / "idx"), str(queries), "--top-k", "10", "--cross-view", *extra]
    assert search_tool.main([*common, "--out", str(tmp_path / "single")]) == 0
    port, env = _free_port(), {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "farreid.tools.search", *common, "--out", str(tmp_path / "dist"), "--distributed"],
            env={**env, "MASTER_PORT": str(port), "RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    with np.load(tmp_path / "single" / "ranking.npz") as one, np.load(tmp_path / "dist" / "ranking.npz") as two:
        np.testing.assert_array_equal(one["indices"], two["indices"])
        np.testing.assert_array_equal(one["distances"], two["distances"])
    assert (tmp_path / "single" / "ranking.csv").read_text() == (tmp_path / "dist" / "ranking.csv").read_text()


@pytest.mark.slow
def test_embed_index_search_through_the_console_script(make_release, tiny_checkpoint, tmp_path):
    """The documented chain on a release: embed the gallery and the queries, index, search (cross-view, re-ranked)."""
    from tests.test_runs import run_farreid

    release = make_release(num_train_ids=6, num_test_ids=3, seed=3, max_frames=6)
    case = release / "case1_aerial_to_ground"
    for split in ("gallery", "query"):
        proc = run_farreid("embed", tiny_checkpoint, str(case / split), "--out", str(tmp_path / split),
                           "--num-workers", "0", cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_farreid("index", str(tmp_path / "gallery"), "--out", str(tmp_path / "idx"), "--shards", "2",
                       cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0 and (tmp_path / "idx" / "meta.json").is_file(), proc.stderr[-3000:]
    gallery, queries = read_embeddings(tmp_path / "gallery"), read_embeddings(tmp_path / "query")
    k = min(5, len(gallery))
    proc = run_farreid("search", str(tmp_path / "idx"), str(tmp_path / "query"), "--top-k", str(k), "--out",
                       str(tmp_path / "hits"), "--rerank", "--rerank-depth", str(len(gallery)),
                       cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "hits" / "ranking.npz") as saved:
        ids, dist = saved["indices"], saved["distances"]
    dense = re_ranking(torch.from_numpy(queries.vectors), torch.from_numpy(gallery.vectors)).numpy()
    np.testing.assert_allclose(dist, np.sort(dense, axis=1)[:, :k], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(dense, ids, 1), dist, atol=1e-5)  # the rows are the dense ones
    lines = (tmp_path / "hits" / "ranking.csv").read_text().splitlines()
    assert len(lines) == 1 + len(queries) * k and lines[1].split(",")[0] == queries.table.names[0]
    assert run_farreid("search", str(tmp_path / "idx"), str(tmp_path / "query"), "--out", str(tmp_path / "hits"),
                       cwd=tmp_path).returncode == 2  # fmt: skip
