"""Geometry through real runs: batches a real Trainer sees, the trained model reading geometry, embed, export, the
console script on the ablation configs, and the predictor source inside a fit."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from farreid.cli import main
from farreid.data.dataset import TrackletDataset
from farreid.data.geometry import Geometry
from farreid.data.index_cache import read_split
from farreid.data.transforms import TrackletTransform, normalize_clip
from farreid.runs import last_checkpoint
from farreid.tools import embed, export
from tests import geometry_stand_in
from tests.conftest import TINY_RUN

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SWITCHES = {
    "off": [],
    "prompts": ["--config", str(CONFIGS / "ablations" / "geometry_prompts.yaml")],
    "qk": ["--config", str(CONFIGS / "ablations" / "geometry_qk.yaml")],
}
QUERY = "case1_aerial_to_ground/query"


class GeometryBatches(Callback):
    """Keeps the camera ids and geometry of every training batch the Trainer hands the module."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((batch["camid"].cpu(), batch["geometry"].cpu(), batch["geometry_known"].cpu()))


@pytest.fixture(scope="module")
def release(make_release) -> Path:
    return make_release(num_train_ids=6, num_test_ids=3, seed=4, max_frames=5)


@pytest.fixture(scope="module")
def fits(release, tmp_path_factory):
    """Two optimizer steps of the tiny recipe per switch, through ``main``; {switch: (cli, recorder)}."""
    out = {}
    for name, extra in SWITCHES.items():
        root = tmp_path_factory.mktemp(f"fit_{name}")
        args = ["fit", *TINY_RUN, *extra, "--data.root", str(release), "--trainer.default_root_dir", str(root)]
        args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0"]
        args += ["--model.optimizer.init_args.lr", "1e-2"]  # two large steps: geometry's effect well above rounding
        cli = main([*args, "--trainer.callbacks+=tests.test_geometry_cli.GeometryBatches"])
        out[name] = (cli, next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GeometryBatches"))
    return out


def test_every_training_batch_carries_geometry_with_ground_unknown(fits):
    _cli, recorder = fits["qk"]
    assert len(recorder.seen) == 2
    for camids, values, known in recorder.seen:
        assert values.shape == known.shape == (len(camids), 3) and values.dtype == torch.float32
        assert torch.equal(known.all(1), camids != 0) and not known[camids == 0].any()  # ground: unknown
        assert ((values >= 0) & (values <= 1)).all() and values[known].gt(0).any()


def _clip(cli) -> tuple[list[int], int]:
    """(H, W) and T of the run's evaluation clips."""
    return list(cli.datamodule.hparams.image_size), cli.datamodule.num_frames_test


def _embeddings(cli, altitude: float) -> torch.Tensor:
    model, (size, t) = cli.model.eval(), _clip(cli)
    torch.manual_seed(0)
    frames = torch.randn(2, t, 3, *size)
    geometry = torch.tensor([[altitude, 0.3, 0.6], [altitude, 0.3, 0.6]])
    batch = {"frames": frames, "camid": torch.tensor([1, 2]), "geometry": geometry}
    return model.embed({**batch, "geometry_known": torch.ones(2, 3, dtype=torch.bool)})[0]


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_after_training_altitude_changes_the_embedding_only_with_a_switch_on(fits, switch):
    low, high = _embeddings(fits[switch][0], 0.1), _embeddings(fits[switch][0], 0.9)
    if switch == "off":
        assert torch.equal(low, high)
    else:
        assert not torch.equal(low, high)  # the only difference between the two calls is the altitude


def test_embed_reads_the_frame_name_geometry(fits, release):
    model, (size, t) = fits["qk"][0].model.eval(), _clip(fits["qk"][0])
    rows, got = embed.embed_folder(model, release / QUERY, image_size=size, num_frames=t, batch_size=4)
    tracklets = read_split(release, QUERY)
    unknown = Geometry(np.zeros((len(tracklets), 3), np.float32), np.zeros((len(tracklets), 3), bool))
    blind = TrackletDataset(tracklets, t, False, TrackletTransform(size, training=False), geometry=unknown)
    with torch.inference_mode():
        batch = torch.utils.data.default_collate([blind[i] for i in range(len(blind))])
        batch["frames"] = normalize_clip(batch["frames"])
        expected = model.embed(batch)[0].numpy()
    aerial = np.array([r["view"] == "aerial" for r in rows])
    assert aerial.any()
    assert np.abs(got[aerial] - expected[aerial]).max() > 1e-4  # embed used the names' altitude/distance/pitch
    np.testing.assert_allclose(got[~aerial], expected[~aerial], atol=1e-5)  # ground: unknown either way


@pytest.mark.slow
def test_export_takes_geometry_and_matches_pytorch(fits, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, (size, t) = fits["qk"][0].model.eval(), _clip(fits["qk"][0])
    path = export.export_onnx(model, tmp_path / "geo.onnx", num_frames=t, image_size=size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["frames", "camids", "geometry", "geometry_known"]
    torch.manual_seed(1)
    frames = torch.randn(3, t, 3, *size)
    camids, known = torch.tensor([1, 0, 2]), torch.tensor([[True] * 3, [False] * 3, [True, False, True]])
    outs = []
    for altitude in (0.1, 0.9):
        geometry = torch.tensor([[altitude, 0.5, 0.6]] * 3)
        batch = {"frames": frames, "camid": camids, "geometry": geometry, "geometry_known": known}
        expected = model.embed(batch)[0].numpy()
        feeds = {"frames": frames.numpy(), "camids": camids.numpy(), "geometry": geometry.numpy()}
        (got,) = session.run(None, {**feeds, "geometry_known": known.numpy()})
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        outs.append(got)
    assert np.abs(outs[0][0] - outs[1][0]).max() > 1e-5  # a known altitude reaches the exported graph
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-6)  # an unknown one does not


@pytest.mark.slow
def test_predicted_geometry_source_inside_a_fit(release, tmp_path):
    ckpt = geometry_stand_in.save(tmp_path / "stand_in.pt")
    source = '{"class_path": "farreid.data.geometry_predictor.PredictedGeometry", "init_args": {"checkpoint": "%s", '
    source += '"loader": "tests.geometry_stand_in.load", "image_size": [32, 16]}}'
    args = ["fit", *TINY_RUN, *SWITCHES["qk"], "--data.root", str(release), "--trainer.fast_dev_run", "1"]
    cli = main([*args, "--trainer.default_root_dir", str(tmp_path / "run"), "--data.geometry", source % ckpt])
    train = cli.datamodule.train_set
    train = getattr(train, "dataset", train)  # the LabelView's TrackletDataset
    aerial = np.array([t.view == "aerial" for t in train.tracklets])
    assert train.geometry.known[aerial].all() and not train.geometry.known[~aerial].any()
    # The predictor's numbers, not the names': the names' altitude differs from the stand-in's.
    names = np.array([t.altitude for t in train.tracklets])[aerial] / 150.0
    assert np.abs(train.geometry.values[aerial, 0] - names).max() > 1e-3


@pytest.mark.slow
def test_console_script_fits_tests_and_embeds_with_both_switches(release, tmp_path):
    """The ablation configs' demo command (both switches; shrunk to 2 steps) through the installed `farreid` script:
    fit, test, embed."""
    script = str(Path(sys.executable).with_name("farreid"))
    configs = ["--config", str(CONFIGS / "demo.yaml"), *SWITCHES["prompts"], *SWITCHES["qk"]]
    common = [*configs, "--data.root", str(release), "--trainer.default_root_dir", str(tmp_path / "run")]
    common += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]
    common += ["--data.p", "4", "--data.k", "2"]  # the 6 training identities of the small release
    fit = [script, "fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    done = subprocess.run([*fit, "--data.val_share", "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert any("geometry_prompts" in k for k in saved["state_dict"]) and any(
        "geometry_qk" in k for k in saved["state_dict"]
    )
    test = [
        script,
        "test",
        *common,
        "--ckpt_path",
        str(ckpt),
        "--evaluator.figures",
        "false",
        "--evaluator.report",
        "false",
    ]
    done = subprocess.run(test, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "overall" in done.stdout
    out = tmp_path / "emb"
    done = subprocess.run([script, "embed", str(ckpt), str(release / QUERY), "--out", str(out), "--num-workers", "0"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out / "embeddings.npz") as saved_emb:
        assert saved_emb["embeddings"].shape[0] == len(read_split(release, QUERY))


@pytest.mark.slow
def test_embed_reads_a_geometry_sidecar_and_rejects_a_wrong_one(fits, release, tmp_path, capsys):
    from farreid.data.geometry import CSVGeometry

    model, (size, t) = fits["qk"][0].model.eval(), _clip(fits["qk"][0])
    tracklets = read_split(release, QUERY)
    sidecar = tmp_path / "geo.csv"
    sidecar.write_text("tracklet,altitude,distance,pitch\n" + "".join(f"{x.name},140,5,10\n" for x in tracklets))
    kw = dict(image_size=size, num_frames=t, batch_size=4)
    _, names = embed.embed_folder(model, release / QUERY, **kw)
    rows, csv_geometry = embed.embed_folder(model, release / QUERY, geometry=CSVGeometry(str(sidecar)), **kw)
    aerial = np.array([r["view"] == "aerial" for r in rows])
    assert np.abs(csv_geometry[aerial] - names[aerial]).max() > 1e-4  # the sidecar's numbers were used
    # The CLI flag; a sidecar lacking a tracklet of the folder is a one-line error and nothing is written.
    ckpt = str(last_checkpoint(fits["qk"][0].trainer))
    sidecar.write_text("tracklet,altitude,distance,pitch\n" + "".join(f"{x.name},140,5,10\n" for x in tracklets[1:]))
    code = embed.main([ckpt, str(release / QUERY), "--out", str(tmp_path / "o"), "--geometry-csv", str(sidecar)])
    assert code == 2 and f"no row for 1 tracklets of the dataset, e.g. {tracklets[0].name}" in capsys.readouterr().err
    assert not (tmp_path / "o" / "embeddings.npz").exists()


@pytest.mark.slow
def test_a_sidecar_on_a_test_only_release_covers_its_cases(release, tiny_checkpoint, tmp_path):
    """`farreid test` on a release without train/: the CSV must name exactly the case tracklets, and is read."""
    import shutil

    from farreid.data.datasets import make_reader

    root = tmp_path / "cases_only"
    for case in ("case1_aerial_to_ground", "case2_ground_to_aerial", "case3_aerial_to_aerial"):
        shutil.copytree(release / case, root / case)
    names = sorted({t.name for t in make_reader("detreidx", root).test_set().tracklets})
    sidecar = tmp_path / "geo.csv"
    sidecar.write_text("tracklet,altitude,distance,pitch\n" + "".join(f"{n},50,20,60\n" for n in names))
    source = '{"class_path": "farreid.data.geometry.CSVGeometry", "init_args": {"path": "%s"}}'
    args = ["test", *TINY_RUN, "--data.root", str(root), "--ckpt_path", tiny_checkpoint]
    args += ["--trainer.default_root_dir", str(tmp_path / "run"), "--evaluator.figures", "false"]
    cli = main([*args, "--evaluator.report", "false", "--data.geometry", source % sidecar])
    table = cli.datamodule._geometry_table
    assert sorted(table) == names and all(known.all() for _, known in table.values())
    sidecar.write_text("tracklet,altitude,distance,pitch\n" + "".join(f"{n},50,20,60\n" for n in names[1:]))
    with pytest.raises(ValueError, match=f"no row for 1 tracklets of the dataset, e.g. {names[0]}"):
        main([*args, "--evaluator.report", "false", "--data.geometry", source % sidecar])
