"""The evaluation state: rows concatenated per process, gathered across 2 gloo processes by torchmetrics with uneven
row counts, and merged per tracklet (sampler repeats removed, dense rows averaged, unreadable rows left out)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from farreid.evaluation.state import EmbeddingRows, merge_rows, merged


def _rows(rank: int) -> dict[str, torch.Tensor]:
    """Rank 0 holds 3 rows (tracklets 0, 1, 2), rank 1 holds 5 (3, 4, 0 again as a sampler repeat, 5, 5 dense)."""
    index = torch.tensor([0, 1, 2]) if rank == 0 else torch.tensor([3, 4, 0, 5, 5])
    item = torch.tensor([0, 1, 2]) if rank == 0 else torch.tensor([3, 4, 0, 5, 6])
    features = F.normalize(torch.arange(len(index) * 4, dtype=torch.float32).view(-1, 4) + 10 * rank + 1, dim=1)
    return {"features": features, "weights": torch.full((len(index), 2), 0.5), "index": index, "item": item}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        state = EmbeddingRows()
        rows = _rows(rank)
        # Two batches per rank, the second with the valid flag and PIDs of the batch.
        state.update(rows["features"][:2], rows["weights"][:2], rows["index"][:2], item=rows["item"][:2])
        n = len(rows["index"]) - 2
        state.update(
            rows["features"][2:],
            rows["weights"][2:],
            rows["index"][2:],
            item=rows["item"][2:],
            valid=torch.ones(n, dtype=torch.bool),
            pid=torch.full((n,), 7),
        )
        torch.save(state.compute(), f"{out}/rank{rank}.pt")
        assert state.num_rows == len(rows["index"])  # the local state is kept after the synchronised compute
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes
def test_two_processes_gather_uneven_rows_rank_major(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = {key: torch.cat([_rows(0)[key], _rows(1)[key]]) for key in ("features", "index", "item")}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert len(got["index"]) == 8  # 3 + 5 rows: torchmetrics padded and trimmed the uneven states
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)
        assert got["valid"].dtype == torch.bool and bool(got["valid"].all())
        assert got["pid"].tolist() == [-1, -1, 7, -1, -1, 7, 7, 7]  # -1 where a batch carried no PID


def test_merge_drops_repeats_averages_dense_rows_and_skips_unreadable():
    features = F.normalize(torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, 0], [3, 4]]), dim=1)
    index = torch.tensor([0, 1, 1, 0, 2])  # row 3 repeats item 0; tracklet 1 has two dense rows
    item = torch.tensor([0, 1, 2, 0, 3])
    valid = torch.tensor([True, True, True, True, False])
    weights = torch.arange(10, dtype=torch.float32).view(5, 2)
    out = merge_rows(features, weights, index, item, valid, num_tracklets=4)
    assert out.seen.tolist() == [True, True, True, False]
    assert out.readable.tolist() == [True, True, False, False]
    torch.testing.assert_close(out.features[0], features[0])
    torch.testing.assert_close(out.features[1], F.normalize(features[1] + features[2], dim=0))
    assert not out.features[2:].any()  # unreadable and unseen tracklets get no embedding
    torch.testing.assert_close(out.weights[1], weights[1])  # the tracklet's first row
    rows = {"features": features, "weights": weights, "index": index, "item": item, "valid": valid}
    torch.testing.assert_close(merged(rows, 4).features, out.features)


def test_one_process_computes_its_own_rows_and_refuses_an_empty_epoch():
    state = EmbeddingRows()
    with pytest.raises(RuntimeError, match="before any update"), pytest.warns(UserWarning, match="before the"):
        state.compute()
    rows = _rows(1)
    state.update(rows["features"], rows["weights"], rows["index"])
    got = state.compute()
    torch.testing.assert_close(got["item"], rows["index"])  # item defaults to index
    state.reset()
    assert state.num_rows == 0
