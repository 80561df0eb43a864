"""The challenge submission CSV: one row per query tracklet with the whole gallery ranked, best first.

The organisers' format (`generate_ranking_csv` in `evaluate_all_cases.py` of the VReID-XFD baseline): columns
`row_id,case,query_tracklet,ranked_gallery_tracklets`; `row_id` runs from 1 over the whole file; the `case` column
holds "Case 1: Aerial to Ground", "Case 2: Ground to Aerial" or "Case 3: Aerial to Aerial", cases in that order
whatever the order of the `rankings` mapping, queries in their given order; the ranked list is the whole
gallery's tracklet folder names, best first, joined by single spaces.
"""

import csv
from pathlib import Path

COLUMNS = ("row_id", "case", "query_tracklet", "ranked_gallery_tracklets")

# farreid case key (farreid.data.detreidx.CASES) -> value of the `case` column, in file order (the organisers'
# `all_cases` names in evaluate_all_cases.py; their scorer groups rows by this text).
CASE_LABELS: dict[str, str] = {
    "A2G": "Case 1: Aerial to Ground",
    "G2A": "Case 2: Ground to Aerial",
    "A2A": "Case 3: Aerial to Aerial",
}
FIRST_ROW_ID = 1
_ORDER = {case: i for i, case in enumerate(CASE_LABELS)}

Rankings = dict[str, tuple[list[str], list[list[str]]]]


def _check_case(case: str, queries: list[str], ranked: list[list[str]], row_ids: list[int]) -> None:
    """Raises ValueError unless every query row is a permutation of one gallery, each tracklet once."""
    if len(queries) != len(ranked):
        raise ValueError(f"case {case!r}: {len(queries)} query tracklets but {len(ranked)} ranked lists")
    if not ranked:
        return
    gallery = set(ranked[0])
    for row_id, query, row in zip(row_ids, queries, ranked, strict=True):
        if len(set(row)) != len(row):
            seen: set[str] = set()
            repeated = next(name for name in row if name in seen or seen.add(name))
            raise ValueError(f"row_id {row_id} (case {case!r}, query {query!r}) lists {repeated!r} more than once")
        if set(row) != gallery:
            missing, extra = sorted(gallery - set(row)), sorted(set(row) - gallery)
            raise ValueError(
                f"row_id {row_id} (case {case!r}, query {query!r}) must list each of the {len(gallery)} gallery "
                f"tracklets exactly once; missing {missing[:5]}, unexpected {extra[:5]}"
            )
        if any(not name or any(c.isspace() for c in name) for name in row):
            raise ValueError(f"row_id {row_id}: tracklet names must be non-empty and contain no whitespace")


def write_submission(path: str | Path, rankings: Rankings) -> Path:
    """Writes the challenge CSV.

    Args:
        path: output file; parent directories are created.
        rankings: case key ("A2G", "G2A", "A2A", see `CASE_LABELS`) -> (query tracklet names (Q,),
            per query the whole gallery's tracklet names, best first (Q lists of G names)). Cases are written in
            `CASE_LABELS` order.

    Returns:
        The path written.

    Raises:
        ValueError: on an unknown case or a ranked list that is not a permutation of the gallery.
    """
    path = Path(path)
    unknown = [case for case in rankings if case not in CASE_LABELS]
    if unknown:
        raise ValueError(f"unknown case {unknown[0]!r}: expected one of {list(CASE_LABELS)}")
    row_id = FIRST_ROW_ID
    rows = []
    for case in (case for case in CASE_LABELS if case in rankings):
        queries, ranked = rankings[case]
        _check_case(case, list(queries), [list(r) for r in ranked], list(range(row_id, row_id + len(queries))))
        for query, row in zip(queries, ranked, strict=True):
            rows.append((row_id, CASE_LABELS[case], query, " ".join(row)))
            row_id += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def read_submission(path: str | Path) -> Rankings:
    """Parses and validates a challenge CSV written by `write_submission` (or by hand).

    Args:
        path: the CSV file.

    Returns:
        The `rankings` mapping that `write_submission` takes, cases in file order.

    Raises:
        ValueError: naming the file and row on a wrong header, a row_id out of sequence, an unknown case, cases
            out of order or interleaved, or a ranked list that does not contain each gallery tracklet of its case
            exactly once.
    """
    path = Path(path)
    labels = {label: case for case, label in CASE_LABELS.items()}
    rankings: Rankings = {}
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(f"{path}: header must be {','.join(COLUMNS)}, got {header}")
        row_ids: dict[str, list[int]] = {}
        for expected_id, record in enumerate(reader, start=FIRST_ROW_ID):
            if len(record) != len(COLUMNS):
                raise ValueError(f"{path}: row {expected_id} has {len(record)} fields, expected {len(COLUMNS)}")
            row_id, label, query, ranked = record
            if row_id != str(expected_id):
                raise ValueError(
                    f"{path}: row_id {row_id!r} where {expected_id} was expected (ids run from {FIRST_ROW_ID})"
                )
            if label not in labels:
                raise ValueError(f"{path}: row_id {row_id} has case {label!r}, expected one of {list(labels)}")
            case = labels[label]
            current = list(rankings)[-1] if rankings else None
            if case != current and (case in rankings or (current and _ORDER[case] < _ORDER[current])):
                raise ValueError(
                    f"{path}: row_id {row_id} has case {label!r} after {CASE_LABELS[current]!r}; "
                    f"cases must come in the order {list(CASE_LABELS.values())}, each in one block"
                )
            row_ids.setdefault(case, []).append(expected_id)
            queries, lists = rankings.setdefault(case, ([], []))
            queries.append(query)
            lists.append(ranked.split(" ") if ranked else [])
    for case, (queries, lists) in rankings.items():
        try:
            _check_case(case, queries, lists, row_ids[case])
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    return rankings
