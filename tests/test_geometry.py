"""Geometry conditioning: parsing and normalisation, unknown geometry, bad input, the sources, zero-init identity."""

import warnings

import numpy as np
import pytest
import torch

from farreid.data.datasets import make_reader
from farreid.data.geometry import RANGES, CSVGeometry, FileNameGeometry, normalise
from farreid.data.geometry_predictor import PredictedGeometry
from farreid.data.layouts import write_layout
from farreid.data.tracklets import Tracklet
from farreid.models.backbone import CLIPVisionBackbone
from farreid.models.geometry import GeometryEncoder
from tests import geometry_stand_in
from tests.conftest import TINY_VISION_CONFIG


def _tracklet(name: str, view: str = "aerial", altitude=30.0, distance=40.0, angle=60.0, frames=()) -> Tracklet:
    return Tracklet(1, 1 if view == "aerial" else 0, view, altitude, distance, angle, name, tuple(frames))


@pytest.fixture(scope="module")
def release(make_release):
    return make_release(num_train_ids=4, num_test_ids=2, seed=5, max_frames=4)


# ------------------------------------------------------------------------------------------ parsing, ranges
def test_detreidx_names_give_normalised_geometry_and_ground_is_unknown(release):
    reader = make_reader("detreidx", release)
    tracklets = reader.train_tracklets()
    geo = FileNameGeometry().geometry(tracklets, reader)
    for t, values, known in zip(tracklets, geo.values, geo.known, strict=True):
        if t.view == "ground":
            assert not known.any()
        else:  # the frame name's fields 6-8, scaled by the documented ranges
            assert known.all()
            raw = [t.altitude, t.distance, t.angle]
            expected = [(v - RANGES[q][0]) / (RANGES[q][1] - RANGES[q][0]) for v, q in zip(raw, RANGES, strict=True)]
            np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert {t.view for t in tracklets} == {"aerial", "ground"}


def test_agvpreid_altitude_only_when_its_unit_is_given(tmp_path):
    root = write_layout(tmp_path / "ag", "agvpreid", 3, 2, seed=1)
    plain = make_reader("agvpreid", root)
    tracklets = plain.train_tracklets()
    assert not FileNameGeometry().geometry(tracklets, plain).known.any()  # unit undocumented: nothing read
    metres = make_reader("agvpreid", root, options={"altitude_unit_m": 10.0})
    geo = FileNameGeometry().geometry(tracklets, metres)
    for t, values, known in zip(tracklets, geo.values, geo.known, strict=True):
        assert known.tolist() == ([True, False, False] if t.view == "aerial" else [False] * 3)
        if t.view == "aerial":  # the A field of P...T...A<alt>C..., times 10 m
            field = int(t.frames[0].rsplit("/", 1)[1].split("A")[1].split("C")[0])
            assert values[0] == pytest.approx(10.0 * field / RANGES["altitude"][1])


def test_a_dataset_without_geometry_is_all_unknown(tmp_path):
    root = write_layout(tmp_path / "mars", "mars", 3, 2, seed=1)
    reader = make_reader("mars", root)
    tracklets = reader.train_tracklets()
    assert not FileNameGeometry().geometry(tracklets, reader).known.any()


def test_out_of_range_values_are_counted_reported_with_the_first_file_and_made_unknown():
    raw = np.array([[30.0, 40.0, 60.0], [5000.0, 40.0, 400.0], [20.0, 10.0, 30.0], [9000.0, 1.0, 1.0]])
    names = ["a/f1.jpg", "b/f2.jpg", "c/f3.jpg", "d/f4.jpg"]
    with pytest.warns(UserWarning, match=r"3 geometry values outside .* first: b/f2\.jpg altitude=5000"):
        geo = normalise(raw, names, "train")
    assert geo.out_of_range == 3
    assert geo.known.tolist() == [[True] * 3, [False, True, False], [True] * 3, [False, True, True]]
    assert (geo.values[~geo.known] == 0).all() and geo.values.max() <= 1.0


def test_file_name_geometry_reports_the_frame_of_a_bad_value():
    bad = _tracklet("0001_0002", altitude=5000.0, frames=("r/0001/0001_0002/x_1_2_3_4_5_5000_40_60.jpg",))
    with pytest.warns(UserWarning, match=r"1 geometry values .* first: r/0001/0001_0002/x_1_2_3_4_5_5000_40_60\.jpg"):
        geo = FileNameGeometry().geometry([_tracklet("ok"), bad], where="train")
    assert geo.known[1].tolist() == [False, True, True]


# ------------------------------------------------------------------------------------------------ CSV sidecar
def _csv(path, rows) -> str:
    path.write_text("tracklet,altitude,distance,pitch\n" + "".join(f"{r}\n" for r in rows))
    return str(path)


def test_csv_sidecar_reads_values_with_empty_cells_unknown(tmp_path):
    tracklets = [_tracklet("t1"), _tracklet("t2", view="ground")]
    geo = CSVGeometry(_csv(tmp_path / "g.csv", ["t1,75,30,90", "t2,,,"])).geometry(tracklets)
    np.testing.assert_allclose(geo.values[0], [0.5, 0.2, 1.0])
    assert geo.known.tolist() == [[True] * 3, [False] * 3]


def test_csv_sidecar_missing_or_unknown_tracklets_are_clear_errors(tmp_path):
    tracklets = [_tracklet("t1"), _tracklet("t2")]
    with pytest.raises(ValueError, match=r"no row for 1 tracklets of the dataset, e\.g\. t2"):
        CSVGeometry(_csv(tmp_path / "a.csv", ["t1,75,30,90"])).geometry(tracklets)
    with pytest.raises(ValueError, match=r"1 rows name tracklets not in the dataset, e\.g\. ghost"):
        CSVGeometry(_csv(tmp_path / "b.csv", ["t1,75,30,90", "t2,1,2,3", "ghost,1,2,3"])).geometry(tracklets)
    with pytest.raises(ValueError, match="listed twice"):
        CSVGeometry(_csv(tmp_path / "c.csv", ["t1,1,2,3", "t1,1,2,3"])).geometry(tracklets)
    with pytest.raises(FileNotFoundError, match="none.csv"):
        CSVGeometry(str(tmp_path / "none.csv")).geometry(tracklets)
    with pytest.warns(UserWarning, match="first: tracklet t2 pitch=400"):
        CSVGeometry(_csv(tmp_path / "d.csv", ["t1,75,30,90", "t2,10,10,400"])).geometry(tracklets)


# ------------------------------------------------------------------------------------------------- predictor
def test_predicted_geometry_with_an_injected_stand_in(release, tmp_path):
    ckpt = geometry_stand_in.save(tmp_path / "stand_in.pt")
    source = PredictedGeometry(str(ckpt), loader="tests.geometry_stand_in.load", image_size=(32, 16), batch_size=5)
    reader = make_reader("detreidx", release)
    tracklets = reader.train_tracklets()[:8]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stand-in's outputs lie inside the ranges: nothing to report
        geo = source.geometry(tracklets, reader)
    net = geometry_stand_in.load(str(ckpt))
    for t, values, known in zip(tracklets, geo.values, geo.known, strict=True):
        if t.view == "ground":
            assert not known.any()
            continue
        # Brute force: the median over the same evenly spaced frames, one image at a time.
        picks = sorted({round(x) for x in np.linspace(0, len(t.frames) - 1, min(len(t.frames), 3))})
        with torch.no_grad():
            preds = np.array([[float(v) for v in net(source._image(t.frames[i])[None])] for i in picks])
        expected = np.median(preds, axis=0) / np.array([RANGES[q][1] for q in RANGES])
        np.testing.assert_allclose(values, expected, rtol=1e-5)
        assert known.all()


def test_predicted_geometry_never_downloads_and_loads_lazily(tmp_path):
    with pytest.raises(ValueError, match="local file"):
        PredictedGeometry("https://example.org/model.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        PredictedGeometry(str(tmp_path / "missing.pt"))
    source = PredictedGeometry(str(geometry_stand_in.save(tmp_path / "s.pt")), loader=geometry_stand_in.load)
    assert source._predictor is None  # nothing read until geometry is asked for
    no_package = PredictedGeometry(str(tmp_path / "s.pt"))
    with pytest.raises(ImportError, match="aerialgeometry"):
        no_package.raw([_tracklet("t", frames=(str(tmp_path / "s.pt"),))])


# ------------------------------------------------------------------------------------- model: unknown, zero-init
def test_unknown_geometry_uses_the_learned_embedding_not_zero():
    torch.manual_seed(0)
    enc = GeometryEncoder(dim=16)
    unknown = torch.zeros(2, 3, dtype=torch.bool)
    a = enc(torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]]), unknown)
    torch.testing.assert_close(a[0], a[1])  # the values of unknown quantities never reach the code
    torch.testing.assert_close(enc.codes(2, None, None), a)  # no geometry at all = all unknown
    zero_metres = enc(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))
    assert not torch.allclose(zero_metres, a[:1])  # 0 m is a value, not "unknown"
    partly = enc(torch.tensor([[0.1, 0.5, 0.3]]), torch.tensor([[False, True, False]]))
    assert not torch.allclose(partly, a[:1])


def _backbones(**geometry) -> tuple[CLIPVisionBackbone, CLIPVisionBackbone]:
    torch.manual_seed(0)
    kw = dict(config=TINY_VISION_CONFIG, trainable_blocks=-1, adapter_dim=8, prompt_blocks=2, prompt_tokens=2)
    with_geometry = CLIPVisionBackbone(**kw, **geometry)
    for block in with_geometry.blocks:  # open the prompt gates, so that prompt tokens do reach the output
        if block.prompt_attention is not None:
            torch.nn.init.constant_(block.prompt_attention.gate, 0.7)
    plain = CLIPVisionBackbone(**kw)
    missing, unexpected = plain.load_state_dict(with_geometry.state_dict(), strict=False)
    assert not missing and all("geometry" in k for k in unexpected)
    return with_geometry.eval(), plain.eval()


GEOMETRY_SWITCHES = {
    "prompts": {"geometry_prompts": True},
    "qk": {"geometry_qk_blocks": [0, -1], "geometry_qk_rank": 3},
    "both": {"geometry_prompts": True, "geometry_qk_blocks": [-1], "geometry_qk_rank": 2},
}


@pytest.mark.parametrize("switch", sorted(GEOMETRY_SWITCHES))
def test_zero_init_reproduces_the_model_without_geometry(switch):
    with_geometry, plain = _backbones(**GEOMETRY_SWITCHES[switch])
    frames, camids = torch.randn(3, 2, 3, 32, 16), torch.tensor([0, 1, 2])
    geometry, known = torch.rand(3, 3), torch.tensor([[False] * 3, [True] * 3, [True, False, True]])
    expected = plain.forward_features(frames, camids)
    for given in ((geometry, known), (None, None)):
        got = with_geometry.forward_features(frames, camids, *given)
        assert torch.equal(got.cls, expected.cls) and torch.equal(got.proj, expected.proj)
    # The check can fail: once the zero-initialised layers move, geometry changes the output.
    for name, p in with_geometry.named_parameters():
        if name.endswith(("geometry_prompts.out.weight", "query.up.weight", "key.up.weight")):
            torch.nn.init.normal_(p, std=0.5)
    moved = with_geometry.forward_features(frames, camids, geometry, known)
    assert not torch.allclose(moved.cls, expected.cls)


def test_geometry_qk_under_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    kw = dict(config=TINY_VISION_CONFIG, trainable_blocks=-1, prompt_blocks=1, geometry_qk_blocks=[0, 1])
    eager = CLIPVisionBackbone(**kw)
    for name, p in eager.named_parameters():
        if name.endswith("up.weight"):
            torch.nn.init.normal_(p, std=0.3)
    checkpointed = CLIPVisionBackbone(**kw, checkpoint_blocks=-1)
    checkpointed.load_state_dict(eager.state_dict())
    frames, camids = torch.randn(2, 2, 3, 32, 16), torch.tensor([0, 1])
    geometry, known = torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)
    grads = []
    for model in (eager, checkpointed):
        model.train()
        model.forward_features(frames, camids, geometry, known).cls.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "geometry" in n})
    assert grads[0] and all(g is not None for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_geometry_prompts_need_camera_prompts():
    with pytest.raises(ValueError, match="prompt_blocks > 0"):
        CLIPVisionBackbone(config=TINY_VISION_CONFIG, prompt_blocks=0, geometry_prompts=True)


# ------------------------------------------------------------------------------------------ the synthetic preset
def test_geometry_preset_holds_its_cells_out_of_training(tmp_path):
    from farreid.data.synthetic import ALTITUDE_EDGES, DISTANCE_EDGES, HELD_OUT_CELLS, generate, geometry_cell
    from farreid.evaluation.queries import ALTITUDE_BINS, DISTANCE_BINS

    assert (ALTITUDE_EDGES, DISTANCE_EDGES) == (ALTITUDE_BINS, DISTANCE_BINS)  # the reporting bins, repeated
    preset = {"geometry_strength": 1.0, "held_out_share": 0.5}
    root = generate(tmp_path / "g", num_train_ids=12, num_test_ids=6, seed=1, min_frames=2, max_frames=2, **preset)
    reader = make_reader("detreidx", root)
    cells = lambda ts: [geometry_cell(t.altitude, t.distance, int(t.angle)) for t in ts if t.view == "aerial"]  # noqa: E731
    train = cells(reader.train_tracklets())
    test = cells(reader.test_set().tracklets)
    assert train and not set(train) & set(HELD_OUT_CELLS)
    held = sum(c in HELD_OUT_CELLS for c in test)
    assert 0.2 < held / len(test) < 0.8  # about held_out_share of the test identities' aerial tracklets


def test_a_backbone_written_without_geometry_arguments_still_works():
    from farreid.module import ReIDModule

    class TwoArgumentBackbone(CLIPVisionBackbone):  # the documented forward_features(frames, camids) contract
        def forward_features(self, frames, camids):
            return super().forward_features(frames, camids)

    torch.manual_seed(0)
    model = ReIDModule(backbone=TwoArgumentBackbone(config=TINY_VISION_CONFIG, prompt_blocks=1), num_classes=3).eval()
    batch = {"frames": torch.randn(2, 2, 3, 32, 16), "camid": torch.tensor([0, 1])}
    geometry = {"geometry": torch.rand(2, 3), "geometry_known": torch.ones(2, 3, dtype=torch.bool)}
    torch.testing.assert_close(model.embed({**batch, **geometry})[0], model.embed(batch)[0])
