"""DetReIDXDataModule through a real Trainer: uint8 clips normalised and augmented on the device, dense rows,
the index cache, and unreadable tracklets."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from farreid.data.datamodule import DetReIDXDataModule
from farreid.data.dataset import TooManyUnreadableError
from farreid.data.detreidx import case_split
from farreid.data.index_cache import cache_path
from farreid.data.transforms import normalize_clip


@pytest.fixture(scope="module")
def root(make_release) -> Path:
    return make_release(seed=0, num_train_ids=6, num_test_ids=3, min_frames=3, max_frames=9)


class Recorder(L.LightningModule):
    """Keeps what every step received."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_batches, self.test_batches = [], []

    def training_step(self, batch, batch_idx):
        self.train_batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        return (self.weight * batch["frames"].mean()).sum()

    def test_step(self, batch, batch_idx):
        self.test_batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _datamodule(root: Path, tmp_path: Path, **kwargs) -> DetReIDXDataModule:
    args = dict(
        root=str(root),
        image_size=(32, 16),
        num_frames=4,
        p=2,
        k=2,
        val_share=0.0,
        num_workers=0,
        batch_size_test=4,
        index_cache_dir=str(tmp_path / "cache"),
    )
    args.update(kwargs)
    return DetReIDXDataModule(**args)


def test_trainer_gets_normalised_augmented_floats(root, tmp_path):
    dm = _datamodule(root, tmp_path, color_jitter=0.2, erase_p=1.0)
    model = Recorder()
    _trainer(tmp_path, max_steps=3).fit(model, datamodule=dm)
    assert len(model.train_batches) == 3
    for batch in model.train_batches:
        assert batch["frames"].dtype == torch.float32 and batch["frames"].shape[1:] == (4, 3, 32, 16)
        assert "aug" not in batch and batch["valid"].all()
        # erase_p=1: every clip has a box of exact zeros (the mean colour) in every frame
        zero = (batch["frames"] == 0).all(dim=2)  # (B, T, H, W)
        assert zero.flatten(2).any(-1).all()
    # The device-side augmentation is the transform's, applied to the loader's uint8 frames with its parameters.
    dataset = dm.train_set
    item = dataset[(0, 11)]
    expected = dm._transform(training=True).augment(item["frames"][None], item["aug"][None])[0]
    batch = dm.on_after_batch_transfer({"frames": item["frames"][None], "aug": item["aug"][None]}, 0)
    torch.testing.assert_close(batch["frames"][0], expected)
    assert cache_path(str(root), "train", tmp_path / "cache").is_file()  # prepare_data built the index cache


@pytest.mark.parametrize("test_frames", ["even", "all"])
def test_test_batches_are_normalised_rows(root, tmp_path, test_frames):
    dm = _datamodule(root, tmp_path, test_frames=test_frames)
    model = Recorder()
    _trainer(tmp_path).test(model, datamodule=dm)
    dataset = dm.eval_datasets["test"]
    items = torch.cat([b["item"] for b in model.test_batches])
    index = torch.cat([b["index"] for b in model.test_batches])
    assert items.tolist() == list(range(len(dataset)))
    tracklets = dm.eval_sets["test"].tracklets
    if test_frames == "even":
        assert torch.equal(items, index) and len(dataset) == len(tracklets)
    else:  # every frame is seen once, in chunks of T
        chunks = [-(-len(t.frames) // 4) for t in tracklets]
        assert len(dataset) == sum(chunks) and np.bincount(index.numpy()).tolist() == chunks
        masks = torch.cat([b["mask"] for b in model.test_batches])
        assert int(masks.sum()) == sum(len(t.frames) for t in tracklets)
    first = model.test_batches[0]
    expected = normalize_clip(torch.stack([dataset[int(i)]["frames"] for i in first["item"]]))
    torch.testing.assert_close(first["frames"], expected)


def test_unreadable_eval_tracklet_is_invalid_then_too_many_is_an_error(root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    query = data / case_split("A2G", "query")
    folders = sorted(p for p in query.glob("*/*") if p.is_dir())
    for frame in folders[0].iterdir():
        frame.write_bytes(b"corrupt")
    dm = _datamodule(data, tmp_path, max_unreadable=0.05)
    model = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path).test(model, datamodule=dm)
    valid = torch.cat([b["valid"] for b in model.test_batches])
    assert int((~valid).sum()) == 1 and dm.unreadable_counts() == {"test": 1}
    for frame in folders[1].iterdir():
        frame.write_bytes(b"corrupt")
    dm = _datamodule(data, tmp_path, max_unreadable=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TooManyUnreadableError, match=folders[0].name):
            _trainer(tmp_path).test(Recorder(), datamodule=dm)


def test_index_cache_can_be_turned_off(root, tmp_path):
    dm = _datamodule(root, tmp_path, index_cache=False)
    assert dm.cache_dir is None
    _trainer(tmp_path, max_steps=1).fit(Recorder(), datamodule=dm)
    assert not (tmp_path / "cache").exists()


def test_compute_threads_policy(root, tmp_path, monkeypatch):
    from farreid.data.loaders import compute_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert compute_threads(None, 2) is None and compute_threads(3, 2) == 3
    assert compute_threads(0, 1) == 3 and compute_threads(0, 8) == 1
    with pytest.raises(ValueError, match="compute_threads"):
        _datamodule(root, tmp_path, compute_threads=-1)
    before = torch.get_num_threads()
    seen = []

    class Threads(Recorder):
        def training_step(self, batch, batch_idx):
            seen.append(torch.get_num_threads())
            return super().training_step(batch, batch_idx)

    try:
        torch.set_num_threads(2)
        _trainer(tmp_path, max_steps=1).fit(Threads(), datamodule=_datamodule(root, tmp_path, compute_threads=1))
        assert seen == [1]
    finally:
        torch.set_num_threads(before)


def test_evaluation_clips_are_the_first_frame_of_each_block_every_time(root, tmp_path):
    """Evaluation is deterministic: clip = the first frame of each of T blocks (no random frame, no augmentation),
    the same on every pass, whatever training augmentations the data module was given."""
    from farreid.data.sampling import frame_indices
    from farreid.data.transforms import load_frame

    dm = _datamodule(root, tmp_path, color_jitter=0.4, flip_p=1.0, erase_p=1.0, num_frames_test=4)
    dm.setup("test")
    loader = dm.test_dataloader()
    first = [b["frames"].clone() for b in loader]
    second = [b["frames"].clone() for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    tracklets = dm.eval_sets["test"].tracklets
    frames = torch.cat(first)
    for i in (0, len(tracklets) // 2, len(tracklets) - 1):
        indices, _ = frame_indices(len(tracklets[i].frames), 4, training=False, rng=None)
        expected = np.stack([load_frame(tracklets[i].frames[j], (32, 16)) for j in indices])  # (T, H, W, 3)
        assert torch.equal(frames[i], torch.from_numpy(expected).permute(0, 3, 1, 2)), i


@pytest.mark.parametrize(("key", "value"), [("data.test_frames", "every"), ("data.test_split", "test")])
def test_a_choice_outside_its_literal_is_a_usage_error_naming_the_key(key, value, tmp_path, capsys):
    from farreid.cli import console

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    args = ["fit", "--config", str(demo), "--data.root", str(tmp_path), f"--{key}", value]
    assert console(args) == 2
    err = capsys.readouterr().err
    assert key in err and value in err


def test_only_the_datamodule_imports_lightning():
    """ARCHITECTURE.md: ``farreid.data`` is plain PyTorch/NumPy except the datamodule (checked in a fresh process,
    so the modules' own transitive imports count, not what this test session has loaded)."""
    probe = """
import importlib, pkgutil, sys
import farreid.data as data
names = [m.name for m in pkgutil.walk_packages(data.__path__, "farreid.data.") if m.name != "farreid.data.datamodule"]
for name in names:
    importlib.import_module(name)
print(len(names), sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")))
"""
    count, loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    assert int(count) >= 15 and loaded.strip() == "[]", loaded
