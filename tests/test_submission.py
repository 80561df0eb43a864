"""The challenge CSV: round trip, exact format, and validation errors that name the row."""

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from farreid.data.protocols import released_cases
from farreid.data.synthetic import generate
from farreid.evaluation.callback import ReIDEvaluator
from farreid.evaluation.submission import COLUMNS, read_submission, write_submission

HEADER = "row_id,case,query_tracklet,ranked_gallery_tracklets"
A2G, G2A = "Case 1: Aerial to Ground", "Case 2: Ground to Aerial"
RANKINGS = {
    "A2G": (["q1", "q2"], [["g3", "g1", "g2"], ["g1", "g2", "g3"]]),
    "G2A": (["q9"], [["a2", "a1"]]),
}


def test_round_trip_and_format(tmp_path):
    path = write_submission(tmp_path / "out" / "submission.csv", RANKINGS)
    lines = path.read_text().splitlines()
    assert lines == [
        ",".join(COLUMNS),
        "1,Case 1: Aerial to Ground,q1,g3 g1 g2",
        "2,Case 1: Aerial to Ground,q2,g1 g2 g3",
        "3,Case 2: Ground to Aerial,q9,a2 a1",
    ]
    assert read_submission(path) == RANKINGS


def test_cases_are_written_in_the_organisers_order(tmp_path):
    reversed_order = dict(reversed([*RANKINGS.items(), ("A2A", (["q5"], [["b1"]]))]))
    path = write_submission(tmp_path / "s.csv", reversed_order)
    assert [line.split(",")[1] for line in path.read_text().splitlines()[1:]] == [
        "Case 1: Aerial to Ground",
        "Case 1: Aerial to Ground",
        "Case 2: Ground to Aerial",
        "Case 3: Aerial to Aerial",
    ]


def test_write_rejects_bad_rankings(tmp_path):
    with pytest.raises(ValueError, match="unknown case 'X2Y'"):
        write_submission(tmp_path / "s.csv", {"X2Y": (["q"], [["g"]])})
    with pytest.raises(ValueError, match="row_id 2 .* 'g2' more than once"):
        write_submission(tmp_path / "s.csv", {"A2G": (["q1", "q2"], [["g1", "g2"], ["g2", "g2"]])})
    with pytest.raises(ValueError, match="2 query tracklets but 1 ranked lists"):
        write_submission(tmp_path / "s.csv", {"A2G": (["q1", "q2"], [["g1"]])})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["row_id,case,query,ranked", f"1,{A2G},q1,g1"], "header"),
        ([HEADER, f"0,{A2G},q1,g1"], "row_id '0' where 1"),
        ([HEADER, "1,A2G,q1,g1"], "case 'A2G'"),
        ([HEADER, f"1,{A2G},q1,g1 g2 g3", f"2,{A2G},q2,g1 g3"], r"row_id 2 .* missing \['g2'\]"),
        ([HEADER, f"1,{A2G},q1,g1 g2", f"2,{A2G},q2,g1 g2 g4"], r"row_id 2 .* unexpected \['g4'\]"),
        ([HEADER, f"1,{G2A},q1,g1", f"2,{A2G},q2,g1"], "row_id 2 has case 'Case 1: Aerial to Ground' after"),
        ([HEADER, f"1,{A2G},q1,g1", f"2,{G2A},q2,g1", f"3,{A2G},q3,g1"], "row_id 3 has case"),
    ],
)
def test_read_names_the_faulty_row(tmp_path, lines, message):
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_submission(path)


# ------------------------------------------------------------------ the organisers' format, read independently
ORGANISER_COLUMNS = ["row_id", "case", "query_tracklet", "ranked_gallery_tracklets"]
ORGANISER_CASES = {  # `case` text -> case folder, in file order (evaluate_all_cases.py of the VReID-XFD baseline)
    "Case 1: Aerial to Ground": "case1_aerial_to_ground",
    "Case 2: Ground to Aerial": "case2_ground_to_aerial",
    "Case 3: Aerial to Aerial": "case3_aerial_to_aerial",
}


def organiser_read(path) -> dict[str, list[tuple[str, list[str]]]]:
    """What the challenge scorer does with the file: rows grouped by the `case` text, in file order."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ORGANISER_COLUMNS
        rows = list(reader)
    assert [int(row["row_id"]) for row in rows] == list(range(1, len(rows) + 1))
    grouped: dict[str, list[tuple[str, list[str]]]] = {}
    for row in rows:
        grouped.setdefault(row["case"], []).append((row["query_tracklet"], row["ranked_gallery_tracklets"].split(" ")))
    labels = [row["case"] for row in rows]
    assert labels == sorted(labels, key=list(ORGANISER_CASES).index)  # one block per case, Case 1 -> 2 -> 3
    return grouped


def pid_of(name: str) -> int:
    """Tracklet names are `{pid}_{tracklet}`."""
    pid, tracklet = name.split("_")
    assert pid.isdigit() and tracklet.isdigit(), name
    return int(pid)


def average_precision(query: str, ranked: list[str]) -> float:
    """Non-interpolated AP of one ranked list, relevance = same pid parsed from the names."""
    hits, total = 0, 0.0
    for rank, name in enumerate(ranked, start=1):
        if pid_of(name) == pid_of(query):
            hits += 1
            total += hits / rank
    return total / hits if hits else 0.0


def folder_tracklets(root: Path, folder: str, side: str) -> set[str]:
    return {p.name for p in (root / folder / side).glob("*/*") if p.is_dir()}


def write_like_the_evaluator(root: Path, out: Path, features: torch.Tensor | None = None):
    """Score the case folders with the evaluator and write the CSV the way `farreid predict` does."""
    eval_set = released_cases(str(root))
    if features is None:
        generator = torch.Generator().manual_seed(0)
        features = F.normalize(torch.randn(len(eval_set.tracklets), 8, generator=generator), dim=1)
    evaluator = ReIDEvaluator()
    rankings = evaluator.score(eval_set, features, rerank=False)["rankings"]
    evaluator._write_submission(out, eval_set, rankings)
    return out / "submission.csv", eval_set, features


def test_csv_matches_the_case_folders_and_the_argsort_of_the_distances(tmp_path):
    root = generate(tmp_path / "anon", num_train_ids=2, num_test_ids=4, seed=3, anonymize=True, max_frames=4)
    path, eval_set, features = write_like_the_evaluator(root, tmp_path / "run")
    grouped = organiser_read(path)
    assert list(grouped) == list(ORGANISER_CASES)
    names = [t.name for t in eval_set.tracklets]
    for label, folder in ORGANISER_CASES.items():
        queries = folder_tracklets(root, folder, "query")
        gallery = folder_tracklets(root, folder, "gallery")
        assert {query for query, _ in grouped[label]} == queries and len(grouped[label]) == len(queries)
        index = {name: i for i, name in enumerate(names) if name in gallery}
        for query, ranked in grouped[label]:
            assert sorted(ranked) == sorted(gallery)  # the whole gallery, each tracklet once
            q = names.index(query)
            g = [index[name] for name in sorted(gallery)]
            distances = 1.0 - features[g] @ features[q]  # (G,) cosine distance, brute force
            assert ranked == [sorted(gallery)[i] for i in torch.argsort(distances).tolist()]


def test_scoring_the_csv_by_tracklet_names(tmp_path):
    """On a tree with real PIDs, a scorer that only reads the CSV recovers the ranking quality."""
    root = generate(tmp_path / "real", num_train_ids=2, num_test_ids=4, seed=3, max_frames=4)
    eval_set = released_cases(str(root))
    pids = torch.tensor([t.pid for t in eval_set.tracklets])
    one_hot = F.one_hot(pids - pids.min()).float()  # (N, identities): every query ranks its own pid first
    path, _, _ = write_like_the_evaluator(root, tmp_path / "perfect", one_hot + 0.01 * torch.rand(one_hot.shape))
    for rows in organiser_read(path).values():
        assert all(average_precision(query, ranked) == 1.0 for query, ranked in rows)
    query_rows = torch.tensor(sorted({i for q, _ in eval_set.cases.values() for i in q}))
    worst = one_hot.clone()
    worst[query_rows] *= -1  # a query is least similar to its own identity's gallery tracklets
    path, _, _ = write_like_the_evaluator(root, tmp_path / "worst", worst + 0.01 * torch.rand(one_hot.shape))
    for rows in organiser_read(path).values():
        for query, ranked in rows:  # every true match ranked last: AP = mean over hits j of j / (G - m + j)
            m = sum(pid_of(name) == pid_of(query) for name in ranked)
            expected = sum(j / (len(ranked) - m + j) for j in range(1, m + 1)) / m if m else 0.0
            assert average_precision(query, ranked) == pytest.approx(expected)
