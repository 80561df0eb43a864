"""`farreid embed` and `farreid export` on a checkpoint of a real (tiny) fit: folders without train/, ONNX parity."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from farreid.data.index_cache import read_split
from farreid.module import ReIDModule
from farreid.tools import embed, export

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUERY = "case1_aerial_to_ground/query"


@pytest.fixture(scope="module")
def release(make_release) -> Path:
    return make_release(num_train_ids=6, num_test_ids=3, seed=3, max_frames=6)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_embed_subprocess_on_a_case_folder_without_train(release, checkpoint, tmp_path):
    folder = shutil.copytree(release / QUERY, tmp_path / "only_query")  # no train/ anywhere near it
    out = tmp_path / "emb"
    done = subprocess.run(
        [sys.executable, "-m", "farreid.tools.embed", checkpoint, str(folder), "--out", str(out), "--num-workers", "0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    expected = read_split(tmp_path, "only_query")
    with np.load(out / "embeddings.npz") as saved:
        feats, names = saved["embeddings"], saved["names"]
    rows = _read_csv(out / "tracklets.csv")
    assert feats.shape[0] == len(rows) == len(expected) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    for row, name, t in zip(rows, names, expected, strict=True):
        assert row["name"] == name == t.name
        assert (int(row["pid"]), int(row["camid"]), row["view"]) == (t.pid, t.camid, t.view)
        assert (float(row["altitude"]), float(row["distance"]), float(row["pitch"])) == (
            t.altitude,
            t.distance,
            t.angle,
        )
    # The three-line Python API gives the same embeddings, and they equal the module's own embed() on the clip.
    model = ReIDModule.load_from_checkpoint(checkpoint, map_location="cpu")
    table, api_feats = embed.embed_folder(model, folder)
    np.testing.assert_allclose(api_feats, feats, atol=1e-5)
    assert [r["name"] for r in table] == [r["name"] for r in rows]
    from farreid.data.dataset import TrackletDataset
    from farreid.data.transforms import TrackletTransform, normalize_clip

    data = model.data_hparams
    clips = TrackletDataset(expected, data["num_frames_test"], False, TrackletTransform(tuple(data["image_size"])))
    item = clips[2]
    frames = normalize_clip(item["frames"][None])
    batch = {"frames": frames, "camid": torch.tensor([item["camid"]]), "mask": item["mask"][None]}
    np.testing.assert_allclose(model.eval().embed(batch)[0][0].numpy(), feats[2], atol=1e-5)


@pytest.mark.slow
def test_embed_whole_release_and_pidless_folder(release, checkpoint, tmp_path):
    assert embed.main([checkpoint, str(release), "--out", str(tmp_path / "all"), "--num-workers", "0"]) == 0
    rows = _read_csv(tmp_path / "all" / "tracklets.csv")
    splits = {r["split"] for r in rows}
    assert "train" in splits and QUERY in splits and "case3_aerial_to_aerial/gallery" in splits
    for split in splits:
        assert sum(r["split"] == split for r in rows) == len(read_split(release, split))
    flat = tmp_path / "flat"  # ROOT/TRACKLET without PID folders
    for t in read_split(release, QUERY)[:3]:
        shutil.copytree(Path(t.frames[0]).parent, flat / t.name)
    # Through the installed console script, as the README tells users to run it.
    script = Path(sys.executable).with_name("farreid")
    done = subprocess.run(
        [str(script), "embed", checkpoint, str(flat), "--out", str(tmp_path / "flat_emb"), "--num-workers", "0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    rows = _read_csv(tmp_path / "flat_emb" / "tracklets.csv")
    assert len(rows) == 3 and {r["pid"] for r in rows} == {"-1"}


def test_embed_errors_name_the_path(checkpoint, tmp_path, capsys):
    assert embed.main([checkpoint, str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert embed.main([checkpoint, str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no tracklet under" in capsys.readouterr().err
    assert embed.main([str(tmp_path / "missing.ckpt"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


@pytest.mark.slow
def test_export_onnx_matches_pytorch(checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / "model.onnx"
    assert export.main([checkpoint, "--out", str(path)]) == 0
    model = ReIDModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    data = model.data_hparams
    t, (h, w) = data["num_frames_test"], data["image_size"]
    frames = torch.randn(3, t, 3, h, w, generator=torch.Generator().manual_seed(0))  # batch 3: exported with 2
    camids = torch.tensor([2, 0, 1])
    expected = model.embed({"frames": frames, "camid": camids})[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"frames": frames.numpy(), "camids": camids.numpy()})
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_export_onnx_at_the_recipe_clip_geometry(tmp_path):
    """The paper recipe's evaluation clip (T=16 frames of 256x128) on a narrow model: ONNX Runtime matches PyTorch."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from farreid.models.backbone import CLIPVisionBackbone
    from tests.conftest import TINY_VISION_CONFIG

    torch.manual_seed(0)
    backbone = CLIPVisionBackbone(
        config={**TINY_VISION_CONFIG, "patch_size": 16, "image_size": 224},
        trainable_blocks=0,
        adapter_dim=8,
        prompt_blocks=2,
        prompt_tokens=4,
        mid_block=0,
    )
    model = ReIDModule(backbone=backbone, num_classes=5).eval()
    path = export.export_onnx(model, tmp_path / "recipe.onnx", num_frames=16, image_size=(256, 128))
    frames, camids = torch.randn(2, 16, 3, 256, 128), torch.tensor([1, 0])
    expected = model.embed({"frames": frames, "camid": camids})[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"frames": frames.numpy(), "camids": camids.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # The export left the model as it found it: frozen position table, real camera-id check.
    assert not model.backbone.embeddings.position_embedding.weight.requires_grad
    with pytest.raises(ValueError):
        model.embed({"frames": frames, "camid": torch.tensor([1, 7])})


def _nan_checkpoint(checkpoint: str, path: Path) -> str:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key, value in saved["state_dict"].items():
        if value.is_floating_point():
            saved["state_dict"][key] = torch.full_like(value, float("nan"))
    torch.save(saved, path)
    return str(path)


def test_embed_refuses_nan_embeddings_and_writes_nothing(release, checkpoint, tmp_path, capsys):
    bad = _nan_checkpoint(checkpoint, tmp_path / "nan.ckpt")
    out = tmp_path / "emb"
    assert embed.main([bad, str(release / QUERY), "--out", str(out), "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "non-finite embeddings" in err and "every tracklet" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(FloatingPointError, match="nothing was written"):
        embed.write_embeddings(out, [{"name": "a"}, {"name": "b"}], np.array([[1.0, 0.0], [np.nan, 0.0]]))


def test_embed_foreign_file_is_a_one_line_error(release, tmp_path, capsys):
    for name, content in (("notes.ckpt", b"not a checkpoint at all\n"), ("empty.ckpt", b"")):
        (tmp_path / name).write_bytes(content)
        code = embed.main([str(tmp_path / name), str(release / QUERY), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and name in err and "not a PyTorch checkpoint" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "tensor.pt")
    assert embed.main([str(tmp_path / "tensor.pt"), str(release / QUERY), "--out", str(tmp_path / "o")]) == 2
    assert "without state_dict and hyper_parameters" in capsys.readouterr().err


def test_embed_keeps_existing_output_unless_overwrite(release, checkpoint, tmp_path, capsys):
    out = tmp_path / "emb"
    args = [checkpoint, str(release / QUERY), "--out", str(out), "--num-workers", "0"]
    assert embed.main(args) == 0
    before = (out / "embeddings.npz").read_bytes()
    (out / "tracklets.csv").write_text("kept\n")
    assert embed.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "tracklets.csv").read_text() == "kept\n"
    assert embed.main([*args, "--overwrite"]) == 0
    assert (out / "embeddings.npz").read_bytes() == before and (out / "tracklets.csv").read_text() != "kept\n"
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npz", "tracklets.csv"]  # no .part left
