"""TrackletDataset: item contract, frame choice, and robustness to unreadable frames."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farreid.data.dataset import TooManyUnreadableError, TrackletDataset, relabel
from farreid.data.index_cache import read_split
from farreid.data.transforms import TrackletTransform


def write_tracklet(root: Path, pid: int, name: str, num: int, aerial: bool = False) -> Path:
    """Frames of constant colour: red = 10 * frame number, so a frame's identity can be read back."""
    folder = root / "train" / f"{pid:04d}" / name
    folder.mkdir(parents=True)
    for t in range(num):
        stem = f"{name}_D1_S1_00_000_20.0_30.0_60_1_{t:06d}" if aerial else f"{name}_G01_{t:06d}"
        Image.new("RGB", (8, 16), (10 * t, 50, 90)).save(folder / f"{stem}.png")
    return folder


def frame_numbers(frames: torch.Tensor) -> list[int]:
    """Read back the frame numbers encoded in the red channel of uint8 frames (T, 3, H, W)."""
    red = frames[:, 0].float().mean(dim=(1, 2))
    return [round(v / 10) for v in red.tolist()]


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    write_tracklet(tmp_path, 3, "0003_1", 12)
    write_tracklet(tmp_path, 3, "0003_2", 3, aerial=True)
    write_tracklet(tmp_path, 9, "0009_1", 6)
    return tmp_path


def make_dataset(root: Path, training: bool, num_frames: int = 4, **kwargs) -> TrackletDataset:
    tracklets = read_split(root, "train")
    transform = TrackletTransform(image_size=(16, 8), training=training, erase_p=0.0, pad=0, flip_p=0.0)
    return TrackletDataset(tracklets, num_frames, training, transform, labels=relabel(tracklets), **kwargs)


def test_item_contract(dataset_root):
    dataset = make_dataset(dataset_root, training=False)
    assert len(dataset) == 3
    item = dataset[1]
    assert item["frames"].shape == (4, 3, 16, 8) and item["frames"].dtype == torch.uint8
    assert item["valid"] is True and item["item"] == 1 and "aug" not in item
    assert item["mask"].dtype == torch.bool and item["mask"].tolist() == [True, False, True, True]
    assert (item["label"], item["pid"], item["camid"], item["index"]) == (0, 3, 1, 1)
    assert frame_numbers(item["frames"]) == [0, 0, 1, 2]
    assert dataset[2]["label"] == 1 and dataset[2]["camid"] == 0
    # Test-time items take the first frame of each block and are deterministic.
    assert frame_numbers(dataset[0]["frames"]) == [0, 3, 6, 9]
    torch.testing.assert_close(dataset[0]["frames"], dataset[0]["frames"])


def test_labels_default_to_minus_one(dataset_root):
    tracklets = read_split(dataset_root, "train")
    dataset = TrackletDataset(tracklets, 2, False, TrackletTransform(image_size=(16, 8)))
    assert [dataset[i]["label"] for i in range(3)] == [-1, -1, -1]
    with pytest.raises(ValueError, match="labels has 1 entries"):
        TrackletDataset(tracklets, 2, False, TrackletTransform(), labels=[0])


def test_training_items_vary_between_calls(dataset_root):
    dataset = make_dataset(dataset_root, training=True)
    draws = {tuple(frame_numbers(dataset[0]["frames"])) for _ in range(30)}
    assert len(draws) > 5
    for draw in draws:  # still one frame from each block of 3
        assert [n // 3 for n in draw] == [0, 1, 2, 3]


def test_corrupt_frames_are_replaced_by_a_neighbour(dataset_root):
    folder = dataset_root / "train" / "0009" / "0009_1"
    files = sorted(folder.iterdir())
    files[2].write_bytes(b"this is not an image")
    data = files[4].read_bytes()
    files[4].write_bytes(data[: len(data) // 2])  # truncated
    dataset = make_dataset(dataset_root, training=False, num_frames=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        item = dataset[2]
    messages = [str(w.message) for w in caught]
    assert any(files[2].name in m for m in messages) and any(files[4].name in m for m in messages)
    assert dataset.skipped_frames == 2
    # Frame 2 -> nearest readable is 3; frame 4 -> 5 (later frames first on ties).
    assert frame_numbers(item["frames"]) == [0, 1, 3, 3, 5, 5]
    dataset[2]
    assert dataset.skipped_frames == 4  # counted on every use, warned once per file


def _spoil(folder: Path) -> list[Path]:
    files = sorted(folder.iterdir())
    for path in files:
        path.write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    return files


def test_unreadable_tracklet_at_evaluation_is_invalid_and_counted(dataset_root):
    folder = dataset_root / "train" / "0003" / "0003_2"
    files = _spoil(folder)
    dataset = make_dataset(dataset_root, training=False, max_unreadable=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        item = dataset[1]
    tracklet_warnings = [str(w.message) for w in caught if "no frame of tracklet" in str(w.message)]
    assert len(tracklet_warnings) == 1 and "0003_2" in tracklet_warnings[0] and files[0].name in tracklet_warnings[0]
    assert item["valid"] is False and item["frames"].shape == (4, 3, 16, 8) and not item["frames"].any()
    assert (item["index"], item["pid"]) == (1, 3)
    assert dataset[0]["valid"] is True and dataset.num_unreadable == 1
    assert dataset.unreadable_tracklets() == [str(folder)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset[1]
    assert not [w for w in caught if "no frame of tracklet" in str(w.message)]  # warned once per tracklet
    assert dataset.num_unreadable == 1


def test_too_many_unreadable_tracklets_is_an_error_listing_them(dataset_root):
    folder = dataset_root / "train" / "0003" / "0003_2"
    _spoil(folder)
    dataset = make_dataset(dataset_root, training=False)  # default 1%: one of three is too many
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TooManyUnreadableError, match="1 of 3 tracklets") as info:
            dataset[1]
    assert str(folder) in str(info.value) and "data.max_unreadable=0.01" in str(info.value)


def test_unreadable_tracklet_at_training_is_replaced_by_one_of_its_identity(dataset_root):
    _spoil(dataset_root / "train" / "0003" / "0003_2")
    dataset = make_dataset(dataset_root, training=True, max_unreadable=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        item = dataset[(1, 123)]
    # PID 3's other tracklet 0003_1 (12 frames): frames 0..11, one per block of 3.
    assert item["valid"] is True and item["label"] == 0 and item["pid"] == 3 and item["camid"] == 0
    assert [n // 3 for n in frame_numbers(item["frames"])] == [0, 1, 2, 3]
    assert dataset.num_unreadable == 1
    # An identity without any readable tracklet: an invalid item, never a crash.
    _spoil(dataset_root / "train" / "0003" / "0003_1")
    dataset = make_dataset(dataset_root, training=True, max_unreadable=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        item = dataset[(1, 5)]
    assert item["valid"] is False and dataset.num_unreadable == 2


def test_seeded_keys_reproduce_items(dataset_root):
    dataset = TrackletDataset(
        read_split(dataset_root, "train"),
        4,
        True,
        TrackletTransform(image_size=(16, 8), training=True, pad=2, erase_p=0.5),
        labels=[0, 0, 1],
    )
    a, b = dataset[(0, 7)], dataset[(0, 7)]
    torch.testing.assert_close(a["frames"], b["frames"])
    torch.testing.assert_close(a["aug"], b["aug"])
    draws = {
        tuple(frame_numbers(dataset[(0, seed)]["frames"])) + tuple(dataset[(0, seed)]["aug"].tolist())
        for seed in range(20)
    }
    assert len(draws) > 5


def test_dense_rows_cover_every_frame_in_chunks(dataset_root):
    tracklets = read_split(dataset_root, "train")  # 12, 3 and 6 frames
    transform = TrackletTransform(image_size=(16, 8))
    dataset = TrackletDataset(tracklets, 4, False, transform, dense=True)
    assert len(dataset) == 3 + 1 + 2
    items = [dataset[i] for i in range(len(dataset))]
    assert [it["index"] for it in items] == [0, 0, 0, 1, 2, 2]
    assert [it["item"] for it in items] == list(range(6))
    assert [frame_numbers(it["frames"]) for it in items[:3]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert frame_numbers(items[3]["frames"]) == [0, 1, 2, 2] and items[3]["mask"].tolist() == [True] * 3 + [False]
    assert frame_numbers(items[5]["frames"]) == [4, 5, 5, 5] and items[5]["mask"].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="dense"):
        TrackletDataset(tracklets, 4, True, transform, labels=[0, 0, 1], dense=True)


def test_unreadable_counts_are_shared_by_dataloader_workers(dataset_root):
    _spoil(dataset_root / "train" / "0003" / "0003_2")
    dataset = make_dataset(dataset_root, training=False, max_unreadable=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2))
    valid = torch.cat([b["valid"] for b in batches]).tolist()
    assert valid == [True, False, True] and batches[0]["frames"].dtype == torch.uint8
    assert dataset.num_unreadable == 1  # marked in a worker, seen here
