"""The DetReIDX layout reader: file-name grammar, folder walking, and its error messages."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from farreid.data.detreidx import CASES, FrameMeta, Tracklet, case_split, parse_frame_name, read_split

GROUND = "0024_5453_G01_000123.jpg"
AERIAL_S1 = "0024_5454_D1_S1_00_000_35.5_80.0_60_1_000007.jpg"
AERIAL_S2 = "0024_5455_D2_S2_00_000_5.8_12.25_90_2_000001.jpg"


def make_tracklet(root: Path, split: str, pid: str, name: str, frames: list[str]) -> Path:
    folder = root / split / pid / name
    folder.mkdir(parents=True)
    for frame in frames:
        (folder / frame).write_bytes(b"not decoded by the reader")
    return folder


def test_parse_ground_and_aerial_names():
    assert parse_frame_name(GROUND) == FrameMeta(view="ground", camid=0)
    assert parse_frame_name("/some/dir/" + AERIAL_S1) == FrameMeta("aerial", 1, 35.5, 80.0, 60.0)
    assert parse_frame_name(AERIAL_S2) == FrameMeta("aerial", 2, 5.8, 12.25, 90.0)
    # Any session number other than 1 is the second UAV session.
    assert parse_frame_name("a_b_c_d_e_f_10_20_30_7_000001.png").camid == 2


@pytest.mark.parametrize(
    "name",
    ["a_b_c_d_e_f_10_20.jpg", "a_b_c_d_e_f_high_20_30_1_0.jpg", "a_b_c_d_e_f_10_20_30_one_0.jpg"],
)
def test_parse_rejects_broken_aerial_names(name):
    with pytest.raises(ValueError, match=name.split(".")[0]) as info:
        parse_frame_name(name)
    assert "field 6 altitude" in str(info.value)


def test_case_split_and_cases():
    assert case_split("A2G", "query") == "case1_aerial_to_ground/query"
    assert case_split("A2A", "gallery") == "case3_aerial_to_aerial/gallery"
    assert set(CASES) == {"A2G", "G2A", "A2A"}
    with pytest.raises(ValueError, match="'X2Y'"):
        case_split("X2Y", "query")
    with pytest.raises(ValueError, match="'probe'"):
        case_split("A2G", "probe")


def test_read_split_parses_tracklets_in_order(tmp_path):
    aerial = [AERIAL_S1.replace("000007", f"{i:06d}") for i in (12, 3, 7)]
    make_tracklet(tmp_path, "train", "0024", "0024_5454", aerial)
    make_tracklet(tmp_path, "train", "0024", "0024_5453", [GROUND, GROUND.replace("123", "100")])
    make_tracklet(tmp_path, "train", "0007", "0007_0001", ["0007_0001_G02_000001.png"])
    tracklets = read_split(tmp_path, "train")
    assert [(t.pid, t.name) for t in tracklets] == [(7, "0007_0001"), (24, "0024_5453"), (24, "0024_5454")]
    ground, air = tracklets[1], tracklets[2]
    assert (ground.view, ground.camid, ground.altitude, ground.distance, ground.angle) == ("ground", 0, 0, 0, 0)
    assert (air.view, air.camid, air.altitude, air.distance, air.angle) == ("aerial", 1, 35.5, 80.0, 60.0)
    assert [Path(f).name for f in air.frames] == sorted(aerial)
    assert all(Path(f).is_file() for f in air.frames)
    assert isinstance(air, Tracklet) and isinstance(air.frames, tuple)


def test_read_split_case_folder(tmp_path):
    make_tracklet(tmp_path, case_split("A2A", "gallery"), "0003", "0003_9", [AERIAL_S2])
    (tracklet,) = read_split(str(tmp_path), case_split("A2A", "gallery"))
    assert (tracklet.pid, tracklet.camid, tracklet.angle) == (3, 2, 90.0)


def test_empty_tracklets_are_counted_in_one_warning(tmp_path):
    make_tracklet(tmp_path, "train", "0001", "0001_1", [GROUND])
    for i in range(5):
        make_tracklet(tmp_path, "train", "0002", f"0002_{i}", ["notes.txt"] if i == 0 else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracklets = read_split(tmp_path, "train")
    assert len(tracklets) == 1
    skipped = [w for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == 1
    message = str(skipped[0].message)
    assert "skipped 5 tracklet folders" in message and "0002_0" in message
    assert any("1 non-image files" in str(w.message) for w in caught)


def test_missing_root_and_split_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        read_split(missing, "train")
    assert "ROOT/train/PID/TRACKLET" in str(info.value)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="case1_aerial_to_ground") as info:
        read_split(tmp_path, case_split("A2G", "query"))
    assert str(tmp_path) in str(info.value)


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="'train'"):
        read_split(tmp_path, "train")


def test_non_integer_pid_folder_is_named(tmp_path):
    make_tracklet(tmp_path, "train", "0001", "0001_1", [GROUND])
    make_tracklet(tmp_path, "train", "bob", "bob_1", [GROUND])
    with pytest.raises(ValueError, match="'bob' is not an integer"):
        read_split(tmp_path, "train")


def test_inconsistent_frames_name_the_tracklet(tmp_path):
    make_tracklet(tmp_path, "train", "0024", "0024_77", [AERIAL_S1, AERIAL_S2])
    with pytest.raises(ValueError, match="0024_77") as info:
        read_split(tmp_path, "train")
    assert AERIAL_S2 in str(info.value)
