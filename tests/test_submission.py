"""The challenge CSV: round trip, exact format, and validation errors that name the row."""

import pytest

from farreid.evaluation.submission import COLUMNS, read_submission, write_submission

RANKINGS = {
    "A2G": (["q1", "q2"], [["g3", "g1", "g2"], ["g1", "g2", "g3"]]),
    "G2A": (["q9"], [["a2", "a1"]]),
}


def test_round_trip_and_format(tmp_path):
    path = write_submission(tmp_path / "out" / "submission.csv", RANKINGS)
    lines = path.read_text().splitlines()
    assert lines == [
        ",".join(COLUMNS),
        "0,A2G,q1,g3 g1 g2",
        "1,A2G,q2,g1 g2 g3",
        "2,G2A,q9,a2 a1",
    ]
    assert read_submission(path) == RANKINGS


def test_write_rejects_bad_rankings(tmp_path):
    with pytest.raises(ValueError, match="unknown case 'X2Y'"):
        write_submission(tmp_path / "s.csv", {"X2Y": (["q"], [["g"]])})
    with pytest.raises(ValueError, match="row_id 1 .* 'g2' more than once"):
        write_submission(tmp_path / "s.csv", {"A2G": (["q1", "q2"], [["g1", "g2"], ["g2", "g2"]])})
    with pytest.raises(ValueError, match="2 query tracklets but 1 ranked lists"):
        write_submission(tmp_path / "s.csv", {"A2G": (["q1", "q2"], [["g1"]])})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["row_id,case,query,ranked", "0,A2G,q1,g1"], "header"),
        (["row_id,case,query_tracklet,ranked_gallery_tracklets", "1,A2G,q1,g1"], "row_id '1' where 0"),
        (["row_id,case,query_tracklet,ranked_gallery_tracklets", "0,B2B,q1,g1"], "case 'B2B'"),
        (
            ["row_id,case,query_tracklet,ranked_gallery_tracklets", "0,A2G,q1,g1 g2 g3", "1,A2G,q2,g1 g3"],
            r"row_id 1 .* missing \['g2'\]",
        ),
        (
            ["row_id,case,query_tracklet,ranked_gallery_tracklets", "0,A2G,q1,g1 g2", "1,A2G,q2,g1 g2 g4"],
            r"row_id 1 .* unexpected \['g4'\]",
        ),
    ],
)
def test_read_names_the_faulty_row(tmp_path, lines, message):
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_submission(path)
