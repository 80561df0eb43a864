"""The DetReIDX layout reader: file-name grammar, folder walking, and its error messages."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest

from farreid.data.detreidx import CASES, case_split, list_split, parse_frame_name
from farreid.data.index_cache import read_split
from farreid.data.tracklets import FrameMeta, FrameNamesBuilder, NumberedFrames, Tracklet, number_pattern

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
    assert isinstance(air, Tracklet) and air.frames[0] == air.frames[:1][0] and list(air.frames)[-1] == air.frames[-1]


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


def test_camera_of_every_frame_is_checked(tmp_path):
    """The fast check parses only names whose prefix differs from the first frame's; a changed camera is found."""
    stem = "0024_5454_D1_S1_00_000_35.5_80.0_60_{session}_{frame:06d}.jpg"
    frames = [stem.format(session=1, frame=i) for i in range(40)]
    frames[27] = stem.format(session=2, frame=27)
    make_tracklet(tmp_path, "train", "0024", "0024_1", frames)
    with pytest.raises(ValueError, match="0024_1") as info:
        read_split(tmp_path, "train")
    assert frames[27] in str(info.value) and "camid 2" in str(info.value)
    # A 9-field aerial name ends with the angle, which is read: every name is parsed, a broken one is named.
    nine = ["a_b_c_d_e_f_10_20_30.jpg", "a_b_c_d_e_f_10_20_31.jpg", "a_b_c_d_e_f_10_20_xx.jpg"]
    make_tracklet(tmp_path, "case3_aerial_to_aerial/query", "0001", "0001_1", nine)
    with pytest.raises(ValueError, match="a_b_c_d_e_f_10_20_xx"):
        read_split(tmp_path, "case3_aerial_to_aerial/query")
    # Ground names with the same prefix need no parse; a mixed-case suffix is still a frame.
    make_tracklet(tmp_path, "case1_aerial_to_ground/query", "0002", "0002_1", ["0002_1_G01_000001.JPG", GROUND])
    (tracklet,) = read_split(tmp_path, "case1_aerial_to_ground/query")
    assert len(tracklet.frames) == 2 and tracklet.camid == 0


def test_frames_are_a_compact_sequence_of_paths(tmp_path):
    names = [f"0001_1_G01_{i:06d}.jpg" for i in (3, 1, 2)] + ["é_0001_1_G01_000009.jpg"]
    folder = make_tracklet(tmp_path, "train", "0001", "0001_1", names)
    make_tracklet(tmp_path, "train", "0002", "0002_1", [GROUND])
    first, second = read_split(tmp_path, "train")
    expected = [str(folder / n) for n in sorted(names)]
    assert len(first.frames) == 4 and list(first.frames) == expected
    assert first.frames[0] == expected[0] and first.frames[-1] == expected[-1] and first.frames[1:3] == expected[1:3]
    assert first.frames == tuple(expected) and second.frames[0].endswith(GROUND)
    with pytest.raises(IndexError):
        first.frames[4]
    index = list_split(tmp_path, "train")
    # The first tracklet's names differ in more than the number: stored as they are, one byte per name character,
    # a NUL and a 4-byte offset. The second is a prefix, a suffix and a 4-byte number. No Python object per frame.
    assert index.names.width.tolist() == [0, 6] and index.names.prefix == ["", GROUND[:-10]]
    per_tracklet = 2 * (8 + 8 + 1)  # first, count, width
    assert index.names.nbytes == sum(len(n.encode()) + 1 + 4 for n in names) + 4 + per_tracklet


# Tracklets of names that share everything but the last run of digits (stored as numbers), and names that do not.
NUMBERED = {
    "ground": [f"0001_7_G01_{i:06d}.jpg" for i in (0, 1, 2, 5, 999_999)],
    "aerial": [f"0001_8_D1_S1_00_000_35.5_80.0_60_1_{i:06d}.jpg" for i in range(3)],
    "unpadded, equal widths": ["f10.png", "f11.png", "f99.png"],
    "no suffix digits": ["0001C1T0001F001.jpg", "0001C1T0001F002.jpg"],
    "number then text": ["x_001_a.jpg", "x_002_a.jpg"],
    "non-ASCII prefix": ["é_01.jpg", "é_02.jpg"],
    "nine digits": ["a999999999.jpg", "a000000000.jpg"],
    "one name": ["0003_1_G01_000042.jpg"],
}
EXACT = {
    "one name unpadded": ["f9.jpg", "f10.jpg"],  # sorted as strings; widths differ
    "another prefix": ["0001_7_G01_000001.jpg", "0001_8_G01_000002.jpg"],
    "another suffix": ["0001_7_G01_000001.jpg", "0001_7_G01_000002.JPG"],
    "no digits": ["frame.jpg", "other.jpg"],
    "ten digits": ["a1234567890.jpg", "a1234567891.jpg"],
    "a digit more inside": ["a_1_01.jpg", "a_12_01.jpg"],
    "non-ASCII digit": ["a_01.jpg", "a_0\u0661.jpg"],
    "same length, other bytes": ["a_01.jpg", "b_01.jpg"],
}


def test_frame_names_are_numbers_where_they_fit_and_exact_elsewhere():
    """Every tracklet gives back its names exactly, as paths; only those that fit a number pattern are numbers."""
    cases = {**NUMBERED, **EXACT}
    builder = FrameNamesBuilder()
    for names in cases.values():
        builder.add(names)
    store = builder.build()
    for i, (what, names) in enumerate(cases.items()):
        frames = store.frames(i, f"/data/{i}")
        assert list(frames) == [f"/data/{i}/{n}" for n in names], what
        assert [frames.name(j) for j in range(len(names))] == names, what
        assert isinstance(frames, NumberedFrames) == (what in NUMBERED), what
    assert len(store) == sum(len(n) for n in cases.values())
    assert len(store.numbers) == sum(len(n) for n in NUMBERED.values())  # one uint32 per numbered frame
    assert number_pattern(NUMBERED["ground"], os.fsencode("\0".join(NUMBERED["ground"])))[:2] == ("0001_7_G01_", ".jpg")


def test_listing_round_trips_names_of_every_shape_and_pickles(tmp_path, monkeypatch):
    """list_split gives each folder's sorted names back exactly; tracklets pickle (spawned DataLoader workers) and
    the cache file (its format version) gives the same frames back."""
    for i, names in enumerate([*NUMBERED.values(), *EXACT.values()]):
        make_tracklet(tmp_path / "data", "train", "0001", f"t{i:02d}", names)
    tracklets = read_split(tmp_path / "data", "train")
    for tracklet in tracklets:
        folder = tmp_path / "data" / "train" / "0001" / tracklet.name
        assert list(tracklet.frames) == [str(folder / n) for n in sorted(os.listdir(folder))]
    index = list_split(tmp_path / "data", "train")
    assert (index.names.width > 0).sum() == len(NUMBERED) and (index.names.width == 0).sum() == len(EXACT)
    again = pickle.loads(pickle.dumps(tracklets))
    assert again == tracklets and [list(t.frames) for t in again] == [list(t.frames) for t in tracklets]
    assert [type(t.frames) for t in again] == [type(t.frames) for t in tracklets]
    assert hash(again[0].frames) == hash(tracklets[0].frames)
    import farreid.data.index_cache as index_cache

    root, cache = tmp_path / "data", tmp_path / "cache"
    monkeypatch.setattr(index_cache, "_VERSION", 1)  # a cache file of the previous format is not trusted
    read_split(root, "train", cache_dir=cache)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="stale .*cache format 1"):
        written = read_split(root, "train", cache_dir=cache)
    monkeypatch.setattr(index_cache, "list_split", None)  # the next read must come from the cache file
    cached = read_split(root, "train", cache_dir=cache)
    assert cached == written == tracklets and [list(t.frames) for t in cached] == [list(t.frames) for t in tracklets]
    assert [type(t.frames) for t in cached] == [type(t.frames) for t in tracklets]


def test_index_cache_is_reused_rebuilt_when_stale_and_survives_damage(tmp_path, monkeypatch):
    import farreid.data.index_cache as index_cache

    root, cache = tmp_path / "data", tmp_path / "cache"
    make_tracklet(root, "train", "0001", "0001_1", [GROUND])
    make_tracklet(root, "train", "0002", "0002_1", [AERIAL_S1])
    make_tracklet(root, "train", "0002", "0002_2", [])  # empty: its warning is replayed from the cache
    with pytest.warns(UserWarning, match="skipped 1 tracklet"):
        built = read_split(root, "train", cache_dir=cache)
    path = index_cache.cache_path(root, "train", cache)
    assert path.is_file() and [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left

    def no_listing(*args):
        raise AssertionError("listed the folders although the cache is valid")

    monkeypatch.setattr(index_cache, "list_split", no_listing)
    with pytest.warns(UserWarning, match="skipped 1 tracklet"):
        cached = read_split(root, "train", cache_dir=cache)
    assert cached == built and [list(t.frames) for t in cached] == [list(t.frames) for t in built]
    monkeypatch.undo()
    # A new frame changes its folder's time: the cache is stale, said so, and rebuilt.
    (root / "train" / "0001" / "0001_1" / "0001_1_G01_000200.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="stale"):
        fresh = read_split(root, "train", cache_dir=cache)
    assert len(fresh[0].frames) == 2
    # A damaged file is rebuilt, never trusted.
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="stale .*unreadable cache"):
        again = read_split(root, "train", cache_dir=cache)
    assert [len(t.frames) for t in again] == [2, 1]
