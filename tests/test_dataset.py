"""TrackletDataset: item contract, frame choice, and robustness to unreadable frames."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farreid.data.dataset import TrackletDataset, UnreadableTrackletError, relabel
from farreid.data.detreidx import read_split
from farreid.data.transforms import CLIP_MEAN, CLIP_STD, TrackletTransform


def write_tracklet(root: Path, pid: int, name: str, num: int, aerial: bool = False) -> Path:
    """Frames of constant colour: red = 10 * frame number, so a frame's identity can be read back."""
    folder = root / "train" / f"{pid:04d}" / name
    folder.mkdir(parents=True)
    for t in range(num):
        stem = f"{name}_D1_S1_00_000_20.0_30.0_60_1_{t:06d}" if aerial else f"{name}_G01_{t:06d}"
        Image.new("RGB", (8, 16), (10 * t, 50, 90)).save(folder / f"{stem}.png")
    return folder


def frame_numbers(frames: torch.Tensor) -> list[int]:
    """Read back the frame numbers encoded in the red channel of normalised frames (T, 3, H, W)."""
    red = frames[:, 0].mean(dim=(1, 2)) * CLIP_STD[0] + CLIP_MEAN[0]
    return [round(v * 255 / 10) for v in red.tolist()]


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    write_tracklet(tmp_path, 3, "0003_1", 12)
    write_tracklet(tmp_path, 3, "0003_2", 3, aerial=True)
    write_tracklet(tmp_path, 9, "0009_1", 6)
    return tmp_path


def make_dataset(root: Path, training: bool, num_frames: int = 4) -> TrackletDataset:
    tracklets = read_split(root, "train")
    transform = TrackletTransform(image_size=(16, 8), training=training, erase_p=0.0, pad=0, flip_p=0.0)
    return TrackletDataset(tracklets, num_frames, training, transform, labels=relabel(tracklets))


def test_item_contract(dataset_root):
    dataset = make_dataset(dataset_root, training=False)
    assert len(dataset) == 3
    item = dataset[1]
    assert item["frames"].shape == (4, 3, 16, 8) and item["frames"].dtype == torch.float32
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


def test_all_frames_unreadable_names_tracklet_and_file(dataset_root):
    folder = dataset_root / "train" / "0003" / "0003_2"
    files = sorted(folder.iterdir())
    for path in files:
        path.write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    dataset = make_dataset(dataset_root, training=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnreadableTrackletError, match="0003_2") as info:
            dataset[1]
    assert files[0].name in str(info.value) and str(folder) in str(info.value)
