"""The synthetic DetReIDX generator: determinism, layout, camera roles and anonymization."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farreid.data.detreidx import CASES, case_split
from farreid.data.index_cache import read_split
from farreid.data.render import sample_people
from farreid.data.synthetic import generate, main

SMALL = dict(num_train_ids=4, num_test_ids=3, min_frames=3, max_frames=6)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    a = tree_bytes(generate(tmp_path / "a", seed=3, **SMALL))
    b = tree_bytes(generate(tmp_path / "b", seed=3, **SMALL))
    assert len(a) > 50 and a == b
    c = tree_bytes(generate(tmp_path / "c", seed=4, **SMALL))
    assert c != a


def test_workers_do_not_change_the_output(tmp_path):
    a = tree_bytes(generate(tmp_path / "a", seed=1, **SMALL))
    b = tree_bytes(generate(tmp_path / "b", seed=1, workers=2, **SMALL))
    assert a == b


def test_layout_views_and_roles(tmp_path):
    root = generate(tmp_path / "d", seed=0, **SMALL)
    train = read_split(root, "train")
    assert {t.pid for t in train} == {1, 2, 3, 4}
    assert {t.camid for t in train} == {0, 1, 2}
    expected_camids = {
        ("A2G", "query"): {1, 2},
        ("A2G", "gallery"): {0},
        ("G2A", "query"): {0},
        ("G2A", "gallery"): {1, 2},
        ("A2A", "query"): {1},
        ("A2A", "gallery"): {2},
    }
    names: dict[str, set[str]] = {}
    for (case, part), camids in expected_camids.items():
        tracklets = read_split(root, case_split(case, part))
        assert {t.camid for t in tracklets} <= camids and len(tracklets) > 0
        assert {t.pid for t in tracklets} == {5, 6, 7}  # every test identity appears in every part
        for t in tracklets:
            assert (t.view == "ground") == (t.camid == 0)
            assert t.name.startswith(f"{t.pid:04d}_") and 3 <= len(t.frames) <= 6
            if t.view == "aerial":
                assert 5.8 <= t.altitude <= 120 and t.distance <= 120 and t.angle in (30, 60, 90)
                assert 14 <= Image.open(t.frames[0]).height <= 49
            else:
                assert Image.open(t.frames[0]).size == (64, 128)
        names[f"{case}/{part}"] = {t.name for t in tracklets}
    # The same tracklet plays complementary roles: A2G queries are the G2A gallery, and so on.
    assert names["A2G/query"] == names["G2A/gallery"]
    assert names["A2G/gallery"] == names["G2A/query"]
    assert names["A2A/query"] | names["A2A/gallery"] == names["A2G/query"]
    train_names = {t.name for t in train}
    assert not train_names & names["A2G/query"]
    assert len(train_names) == len(train)  # tracklet folder names are unique


def test_anonymize_breaks_pid_matches(tmp_path):
    plain = generate(tmp_path / "p", seed=2, **SMALL)
    anon = generate(tmp_path / "a", seed=2, anonymize=True, **SMALL)
    assert [t.pid for t in read_split(anon, "train")] == [t.pid for t in read_split(plain, "train")]
    for case in CASES:
        query = read_split(anon, case_split(case, "query"))
        gallery = read_split(anon, case_split(case, "gallery"))
        assert not {t.pid for t in query} & {t.pid for t in gallery}
        assert len({t.pid for t in query}) == 3
        for t in query:  # nothing in the folder or frame names gives the true identity away
            assert t.name.split("_")[0] == f"{t.pid:04d}"
            assert all(Path(f).name.startswith(f"{t.pid:04d}_") for f in t.frames)
        plain_query = read_split(plain, case_split(case, "query"))
        assert sorted(len(t.frames) for t in query) == sorted(len(t.frames) for t in plain_query)


def test_identities_are_distinct_attribute_combinations():
    people = sample_people(60, np.random.default_rng(0))
    keys = {(p.upper, p.pattern, p.pattern_colour, p.lower, p.build, p.skin, p.hair, p.accessory) for p in people}
    assert len(keys) == 60
    # No single cue identifies a person: every accessory and pattern value is shared by several people.
    for cue in ("accessory", "pattern", "build", "hair"):
        counts = Counter(getattr(p, cue) for p in people)
        assert len(counts) >= 3 and min(counts.values()) >= 2, cue


def test_refuses_to_overwrite_and_cli(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--seed", "5", "--num-train-ids", "2", "--num-test-ids", "1"])
    assert "frames under" in capsys.readouterr().out
    assert len(read_split(tmp_path / "cli", "train")) >= 6
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(tmp_path / "cli", num_train_ids=2, num_test_ids=1)
    generate(tmp_path / "cli", num_train_ids=2, num_test_ids=1, overwrite=True)


def test_cli_layout_is_a_choice_and_writes_other_layouts(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "bad"), "--layout", "marss"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--layout" in err and "'marss'" in err and "mars" in err
    assert not (tmp_path / "bad").exists()
    main([str(tmp_path / "prid"), "--layout", "prid", "--num-train-ids", "2", "--num-test-ids", "1"])
    assert "frames under" in capsys.readouterr().out
    assert len(list((tmp_path / "prid").rglob("*.png"))) > 0
