"""Validation split carved from training identities, and the released case folders."""

import numpy as np
import pytest

from farreid.data.protocols import released_cases, split_identities, validation_cases
from farreid.data.synthetic import generate
from farreid.data.tracklets import Tracklet


def _tracklet(pid: int, camid: int, n: int) -> Tracklet:
    view = "ground" if camid == 0 else "aerial"
    return Tracklet(
        pid=pid, camid=camid, view=view, altitude=0.0, distance=0.0, angle=0.0, name=f"{pid}_{n}", frames=("f",)
    )


def test_split_identities_disjoint_reproducible_and_sized():
    pids = [p for p in range(100) for _ in range(3)]
    train, val = split_identities(pids, 0.2, seed=3)
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == set(range(100))
    assert len(val) == 20
    assert split_identities(pids, 0.2, seed=3) == (train, val)
    assert split_identities(pids, 0.2, seed=4)[1] != val


def test_split_identities_rejects_bad_share():
    with pytest.raises(ValueError, match="val_share"):
        split_identities([1, 2, 3], 1.0, seed=0)


def test_validation_cases_recreate_the_three_protocols():
    tracklets = [_tracklet(pid, cam, n) for pid in range(5) for n, cam in enumerate((0, 0, 1, 1, 2, 2))]
    es = validation_cases(tracklets)
    cams = np.array([t.camid for t in tracklets])
    q, g = es.cases["A2G"]
    assert (cams[q] > 0).all() and (cams[g] == 0).all()
    q, g = es.cases["G2A"]
    assert (cams[q] == 0).all() and (cams[g] > 0).all()
    q, g = es.cases["A2A"]
    assert (cams[q] == 1).all() and (cams[g] == 2).all()
    assert len(es.cases["A2G"][0]) == 20 and len(es.cases["A2A"][1]) == 10


def test_validation_cases_empty_case_is_an_error():
    with pytest.raises(ValueError, match="A2A"):
        validation_cases([_tracklet(1, 0, 0), _tracklet(1, 1, 1)])


@pytest.mark.parametrize("anonymize", [False, True])
def test_released_cases_detects_anonymized_release(tmp_path, anonymize):
    root = generate(tmp_path / "d", num_train_ids=2, num_test_ids=3, seed=1, anonymize=anonymize, max_frames=4)
    es = released_cases(str(root))
    assert es.anonymized is anonymize
    assert set(es.cases) == {"A2G", "G2A", "A2A"}
    for q, g in es.cases.values():
        assert len(q) > 0 and len(g) > 0 and set(q).isdisjoint(g)
