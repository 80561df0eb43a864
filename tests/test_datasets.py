"""Every dataset reader on a generated fixture in its real layout: tracklets, cameras and views read from the names
and index files, the protocol's cases, clear errors on bad input, the datamodule's ``data.dataset`` switch."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from farreid.data.datamodule import DetReIDXDataModule
from farreid.data.datasets import READERS, dataset_provenance, make_reader, reader_class
from farreid.data.datasets.base import VideoReIDDataset
from farreid.data.layouts import LAYOUTS, write_layout

NUM_TRAIN, NUM_TEST = 8, 4
OPTIONS = {"g2a": {"aerial_cameras": [1]}}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    return {name: write_layout(base / name, name, NUM_TRAIN, NUM_TEST, seed=1) for name in LAYOUTS}


def reader(roots, name: str, **options):
    return make_reader(name, roots[name], None, {**OPTIONS.get(name, {}), **options})


def read_test_set(r):
    """The test set; the MARS-style fixtures hold one PID -1 (junk) row, which must be reported."""
    if r.name not in ("mars", "g2a"):
        return r.test_set()
    with pytest.warns(UserWarning, match="left out 1 tracklets with PID -1"):
        return r.test_set()


# Camera (from 0) and PID of a frame, read from its file name independently of the readers.
NAME_RULES = {
    "agvpreid": (r"^P(\d+)T\d+A\d+C(\d+)E", 0),
    "g2a": (r"^(\d{4})C(\d)T", 1),
    "mars": (r"^(\d{4})C(\d)T", 1),
    "lsvid": (r"^(\d+)_\d+_(\d+)_", 1),
    "dukevideo": (r"^(\d+)_C(\d+)_F", 1),
}


def frame_camera(name: str, path: str) -> tuple[int, int]:
    if name in ("ilidsvid", "prid"):
        cam = 0 if re.search(r"cam(1|_a)/", path) else 1
        return int(re.search(r"(\d+)", os.path.basename(os.path.dirname(path))).group(1)), cam
    pattern, base = NAME_RULES[name]
    pid, cam = re.match(pattern, os.path.basename(path)).groups()
    return int(pid), int(cam) - base


# ------------------------------------------------------------------------------------------ every reader
@pytest.mark.parametrize("name", LAYOUTS)
def test_reader_reads_its_layout(roots, name):
    r = reader(roots, name)
    train = r.train_tracklets()
    test = read_test_set(r)
    # every tracklet's PID and camera agree with its frames' names, and its frames exist, sorted, one folder
    for t in train + test.tracklets:
        assert len(t.frames) >= 1 and all(os.path.isfile(f) for f in t.frames)
        assert {frame_camera(name, f) for f in t.frames} == {(t.pid, t.camid)}
        assert len({os.path.dirname(f) for f in t.frames}) == 1
    if name in ("ilidsvid", "prid"):  # split 0 of the splits file decides who trains
        split = json.loads((roots[name] / r.SPLITS_FILE).read_text())[0]
        assert {t.pid for t in train} == {int(re.search(r"\d+", p).group()) for p in split["train"]}
        assert Counter(t.camid for t in train) == {0: len(split["train"]), 1: len(split["train"])}
    else:
        assert {t.pid for t in train} == set(range(1, NUM_TRAIN + 1))
    assert set(test.cases) == set(r.CASES) and not test.anonymized
    train_pids = {t.pid for t in train}
    for case, (q, g) in test.cases.items():
        assert len(q) and len(g) and not set(q.tolist()) & set(g.tolist()), case
        q_pids = {test.tracklets[i].pid for i in q}
        assert q_pids <= {test.tracklets[i].pid for i in g} and not q_pids & train_pids
    assert len(test) == len({id(t) for t in test.tracklets})


def test_agvpreid_cases_and_views(roots):
    r = reader(roots, "agvpreid")
    test = r.test_set()
    for case, (query_view, gallery_view) in {"A2G": ("aerial", "ground"), "G2A": ("ground", "aerial")}.items():
        q, g = test.cases[case]
        assert {test.tracklets[i].view for i in q} == {query_view}
        assert {test.tracklets[i].view for i in g} == {gallery_view}
    # the view follows the C field: C4/C5 are the UAVs
    assert all((t.camid in (4, 5)) == (t.view == "aerial") for t in r.train_tracklets() + test.tracklets)
    assert {r.prompt_camera(t) for t in test.tracklets} == {0, 1}
    val = r.validation_cases(r.train_tracklets())
    assert set(val.cases) == {"A2G", "G2A"}


@pytest.mark.parametrize(
    ("dataset", "folder", "bad", "message", "read"),
    [
        ("agvpreid", "train", "frame_0001.jpg", "not an AG-VPReID name", lambda r: r.train_tracklets()),
        ("dukevideo", "query", "x.jpg", "not a DukeMTMC-VideoReID name", lambda r: r.test_set()),
    ],
)
def test_bad_frame_name_is_an_error_naming_the_file(roots, tmp_path, dataset, folder, bad, message, read):
    root = tmp_path / dataset
    shutil.copytree(roots[dataset], root)
    frame = sorted((root / folder).rglob("*.jpg"))[0]
    frame.rename(frame.with_name(bad))
    with pytest.raises(ValueError, match=re.escape(bad) + ".*" + message):
        read(make_reader(dataset, root))


def test_mars_rows_queries_and_junk(roots):
    from scipy.io import loadmat

    r = reader(roots, "mars")
    info = loadmat(roots["mars"] / "info" / "tracks_test_info.mat")["track_test_info"]
    query_rows = loadmat(roots["mars"] / "info" / "query_IDX.mat")["query_IDX"].ravel().astype(int)
    test = read_test_set(r)
    assert len(test) == len(info) - 1  # the junk row is counted and left out
    q, g = test.cases["all"]
    assert len(q) == len(query_rows) and len(q) + len(g) == len(test)
    names = (roots["mars"] / "info" / "test_name.txt").read_text().split()
    for i, row in zip(q, query_rows, strict=True):  # each query is the row query_IDX names (1-based)
        start = int(info[row - 1, 0])
        assert os.path.basename(test.tracklets[i].frames[0]) == names[start - 1]


def test_mars_info_that_disagrees_with_the_names_is_an_error(roots, tmp_path):
    from scipy.io import loadmat, savemat

    root = tmp_path / "mars"
    shutil.copytree(roots["mars"], root)
    path = root / "info" / "tracks_train_info.mat"
    info = loadmat(path)["track_train_info"]
    info[2, 3] = info[2, 3] % 6 + 1  # another camera than the names say
    savemat(path, {"track_train_info": info})
    with pytest.raises(ValueError, match=r"tracks_train_info\.mat row 3: frame .* does not belong to PID"):
        make_reader("mars", root).train_tracklets()
    (root / "info" / "query_IDX.mat").unlink()
    with pytest.raises(FileNotFoundError, match="query_IDX.mat"):
        make_reader("mars", root).test_set()


def test_g2a_aerial_cameras_option(roots):
    r = reader(roots, "g2a")
    views = {(t.camid, t.view) for t in r.train_tracklets()}
    assert views == {(0, "aerial"), (1, "ground")}
    assert {r.prompt_camera(t) for t in r.train_tracklets()} == {0, 1}
    plain = make_reader("g2a", roots["g2a"])
    assert {t.view for t in plain.train_tracklets()} == {"ground"}  # no guess without the option


def test_lsvid_reads_the_hdf5_query_index(roots):
    import h5py

    r = reader(roots, "lsvid")
    test = r.test_set()
    with h5py.File(roots["lsvid"] / "test" / "data" / "info_test.mat") as f:
        rows = np.asarray(f["query"]).ravel().astype(int)
    lines = (roots["lsvid"] / "list_sequence" / "list_seq_test.txt").read_text().split("\n")
    q, _g = test.cases["all"]
    expected = sorted(os.path.basename(lines[row - 1].split()[0]).rstrip("_") for row in rows)
    assert sorted(test.tracklets[i].name for i in q) == expected


@pytest.mark.parametrize("name", ["ilidsvid", "prid"])
def test_two_camera_protocol_and_split_choice(roots, name):
    splits = json.loads((roots[name] / reader(roots, name).SPLITS_FILE).read_text())
    for split_id in (0, 7):
        r = reader(roots, name, split_id=split_id)
        test = r.test_set()
        q, g = test.cases["all"]
        assert {test.tracklets[i].camid for i in q} == {0} and {test.tracklets[i].camid for i in g} == {1}
        expected = {int(re.search(r"\d+", p).group()) for p in splits[split_id]["test"]}
        assert {test.tracklets[i].pid for i in q} == expected
        assert r.describe()["split_id"] == split_id
    with pytest.raises(ValueError, match="split_id 10 outside the 10 splits"):
        reader(roots, name, split_id=10)


def test_ilidsvid_splits_from_the_released_mat(roots, tmp_path):
    root = tmp_path / "ilids"
    shutil.copytree(roots["ilidsvid"], root)
    from_json = [make_reader("ilidsvid", root, options={"split_id": i}) for i in range(10)]
    (root / "splits.json").unlink()
    for i, json_reader in enumerate(from_json):
        mat_reader = make_reader("ilidsvid", root, options={"split_id": i})
        assert mat_reader.test_persons == json_reader.test_persons
        assert mat_reader.train_persons == json_reader.train_persons


# ------------------------------------------------------------------------------------------ selection
def test_every_name_resolves_and_bad_names_fail():
    assert set(READERS) == {"detreidx", "agvpreid", "g2a", "mars", "lsvid", "ilidsvid", "prid", "dukevideo"}
    for name, path in READERS.items():
        assert reader_class(name) is reader_class(path) and reader_class(name).name == name
    with pytest.raises(ValueError, match="expected one of"):
        reader_class("marss")
    with pytest.raises(ValueError, match="is not a farreid.data.datasets.VideoReIDDataset"):
        reader_class("pathlib.Path")
    with pytest.raises(ValueError, match="do not fit"):
        make_reader("mars", ".", options={"split_id": 1})


class TinyUserReader(VideoReIDDataset):
    """A user's own reader: the MARS fixture's training tracklets, tested on themselves."""

    name = "tiny-user"

    def train_tracklets(self):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make_reader("mars", self.root).train_tracklets()

    def test_set(self):
        return self.validation_cases(self.train_tracklets())


def test_datamodule_dataset_switch_prompts_and_user_class(roots):
    dm = DetReIDXDataModule(root=str(roots["agvpreid"]), dataset="agvpreid", val_share=0.25, num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    assert set(dm.eval_sets["val"].cases) == {"A2G", "G2A"} and set(dm.eval_sets["test"].cases) == {"A2G", "G2A"}
    # the model sees view-level prompt ids, the evaluation keeps the protocol's cameras (C0..C5)
    assert {dm.train_set[i]["camid"] for i in range(len(dm.train_set))} == {0, 1}
    test_cams = {t.camid for t in dm.eval_sets["test"].tracklets}
    assert test_cams <= set(range(6)) and max(test_cams) >= 4 and min(test_cams) <= 3
    user = DetReIDXDataModule(root=str(roots["mars"]), dataset=f"{__name__}.TinyUserReader", num_workers=0)
    user.setup("test")
    assert list(user.eval_sets["test"].cases) == ["all"]
    with pytest.raises(ValueError, match="data.dataset 'nope'"):
        DetReIDXDataModule(root=str(roots["mars"]), dataset="nope")


def test_provenance_without_checkpoint(roots):
    dm = DetReIDXDataModule(root=str(roots["prid"]), dataset="prid", dataset_options={"split_id": 3})
    info = dataset_provenance(None, dm)
    assert info["trained_on"]["dataset"] is None
    assert info["tested_on"] == {
        "dataset": "prid",
        "root": str(roots["prid"]),
        "split_id": 3,
        "splits_file": str(roots["prid"] / "splits_prid2011.json"),
    }
