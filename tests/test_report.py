"""The error-analysis report of `farreid test` (report.html, report/, per_query.csv), read the way a person and a
script read it: through a real test run, in headless Chromium, in the W&B offline record; and `farreid compare`."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from farreid.cli import main
from farreid.evaluation.queries import CSV_NAME, FIELDS, case_means, read_csv
from farreid.tools import compare
from tests.conftest import TINY_RUN
from tests.test_operations import _wait_for_wandb_records
from tests.test_runs import run_farreid

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
NO_CHROMIUM = "no headless Chromium here (scripts/ensure_chromium.sh installs Debian's `chromium`)"


def _copy_release(release: Path, to: Path) -> Path:
    shutil.copytree(release, to)
    return to


def _break_frames(root: Path) -> list[Path]:
    """Empty the first frame of one A2G query tracklet and truncate the first frame of one G2A gallery tracklet."""
    query = sorted((root / "case1_aerial_to_ground" / "query").glob("*/*"))[0]
    gallery = sorted((root / "case2_ground_to_aerial" / "gallery").glob("*/*"))[0]
    empty, truncated = sorted(query.glob("*.jpg"))[0], sorted(gallery.glob("*.jpg"))[0]
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:40])
    return [empty, truncated]


def _test_run(root: Path, release: Path, *extra: str) -> Path:
    main(["test", *TINY_RUN, "--data.root", str(release), "--trainer.default_root_dir", str(root), *extra])
    (run,) = sorted(root.glob("test-*"))
    return run


@pytest.fixture(scope="module")
def broken_run(make_release, tiny_checkpoint, tmp_path_factory) -> dict:
    """A test of the tiny checkpoint, figures on and an offline W&B logger, on a release with an empty query frame
    and a truncated gallery frame."""
    tmp = tmp_path_factory.mktemp("report")
    release = _copy_release(make_release(num_train_ids=6, num_test_ids=3, seed=3, max_frames=6), tmp / "release")
    broken = _break_frames(release)
    patch = pytest.MonkeyPatch()
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        patch.setenv(name, str(tmp))
    patch.setenv("WANDB_MODE", "offline")
    logger = ["--trainer.logger=WandbLogger", f"--trainer.logger.save_dir={tmp}", "--trainer.logger.offline=true",
              "--trainer.logger.project=farreid-test"]  # fmt: skip
    try:
        with pytest.warns(UserWarning, match="skipping unreadable frame"):
            main(["test", *TINY_RUN, "--data.root", str(release), "--trainer.default_root_dir", str(tmp / "runs"),
                  "--ckpt_path", tiny_checkpoint, "--evaluator.figures", "true", *logger])  # fmt: skip
        import wandb

        wandb.finish()
    finally:
        patch.undo()
    (run,) = sorted((tmp / "runs").glob("test-*"))
    return {"run": run, "broken": broken, "root": tmp}


def test_bad_frames_are_placeholders_counted_and_the_run_finishes(broken_run):
    run = broken_run["run"]
    results = json.loads((run / "results.json").read_text())
    assert results["unreadable"]["count"] == 0  # the scorer skipped the bad frames (warned); no tracklet was lost
    assert results["A2G"]["num_query"] == 10
    assert results["figures"]["files"] >= 5 and (run / "figures" / "ranked_A2G.png").is_file()
    drawn = results["report"]["unreadable_frames"]
    broken = {b.name for b in broken_run["broken"]}
    assert drawn["count"] >= 1 and any(Path(p).name in broken for p in drawn["examples"])
    assert results["figures"]["unreadable_frames"]["count"] >= 1
    page = (run / "report.html").read_text()
    assert "could not be read and are drawn as placeholders" in page


def test_per_query_table_is_the_results_mAP(broken_run):
    run = broken_run["run"]
    rows = read_csv(run / CSV_NAME)
    results = json.loads((run / "results.json").read_text())
    assert list(rows[0])[: len(FIELDS)] == list(FIELDS)
    for case, mean in case_means(rows).items():
        assert mean == pytest.approx(results[case]["mAP"], abs=1e-9), case
        assert sum(r["case"] == case for r in rows) == results[case]["num_query"]
    for case, mean in case_means(rows, "ap_rerank").items():
        assert mean == pytest.approx(results["rerank"][case]["mAP"], abs=1e-9), case
    for r in rows:
        assert (r["ap"] is None) == (r["first_match_rank"] is None), r
        if r["ap"] == 1.0:
            assert r["first_match_rank"] == 1, r
        assert (r["altitude"] is None) == (r["view"] == "ground")


def test_report_is_static_and_names_its_thumbnails(broken_run):
    run = broken_run["run"]
    page = (run / "report.html").read_text()
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page), "the page must load nothing from the network"
    data = json.loads(page.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0])
    rows = read_csv(run / CSV_NAME)
    assert len(data["queries"]) == len(rows)
    sheets = {p.name for p in (run / data["sheets"]).glob("s*.jpg")}
    for q in data["queries"]:
        assert f"s{q['s'][0]}.jpg" in sheets and q["s"][3] == 4 * 32  # the strip of the 4 scorer frames
        assert len(q["w"]) == 4 and abs(sum(q["w"]) - 1.0) < 1e-3  # and their pooling weights
        assert 1 <= len(q["top"]) <= 10 and all(f"s{g[4][0]}.jpg" in sheets for g in q["top"])
        marks = [g[3] for g in q["top"]]
        assert set(marks) <= {0, 1, 2}
        kept = [m for m in marks if m != 2]  # the ranking after the scorer's junk removal
        if q["fm"] is not None and q["fm"] <= len(kept):  # the first true match where per_query.csv says
            assert kept[: q["fm"]] == [0] * (q["fm"] - 1) + [1], (q["q"], marks, q["fm"])
    assert data["anonymized"] is False


def test_worst_queries_reach_the_offline_wandb_run(broken_run):
    record = _wait_for_wandb_records(broken_run["root"], [b"test/worst_queries", b"media/images/"])
    assert b"test/worst_queries" in record
    assert len(re.findall(rb"media/images/[0-9a-f]{20}\.png", record)) >= 2, "the table's thumbnails"
    (table,) = broken_run["root"].rglob("worst_queries_*.table.json")
    columns = json.loads(table.read_text())["columns"]
    assert columns[:4] == ["case", "query", "pid", "ap"] and "frames" in columns


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_rendered_page_lists_every_query_worst_first(broken_run, tmp_path):
    """The DOM after the page's script ran in a real browser: one entry per query and case, ascending AP within
    each case, the AP values of per_query.csv; the first page is paginated."""
    run = broken_run["run"]
    rows = read_csv(run / CSV_NAME)
    dom = _dump_dom(run / "report.html", "#all", tmp_path)
    entries = re.findall(r'<div class="query" data-query="([^"]*)" data-case="([^"]*)" data-ap="([^"]*)">', dom)
    assert len(entries) == len(rows)
    expected = {(r["case"], r["query"]): r["ap"] for r in rows}
    assert {(c, q) for q, c, _ in entries} == set(expected)
    for q, c, ap in entries:
        assert float(ap) == pytest.approx(expected[(c, q)], abs=1e-12)
    for case in {c for _, c, _ in entries}:
        aps = [float(ap) for _, c, ap in entries if c == case]
        assert aps == sorted(aps), case
    cases = [c for _, c, _ in entries]
    assert cases == sorted(cases, key=["A2G", "G2A", "A2A"].index)
    first = _dump_dom(run / "report.html", "", tmp_path)
    assert first.count('class="query"') == len(rows)  # fewer than a page of 50


def _dump_dom(page: Path, fragment: str, tmp: Path) -> str:
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=5000", "--dump-dom",
         page.resolve().as_uri() + fragment],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split('<div id="queries">', 1)[1].split("<script", 1)[0]  # the rendered entries, not the script


def test_anonymized_release_reports_rankings_without_marks(make_release, tmp_path):
    release = make_release(num_train_ids=4, num_test_ids=3, seed=5, max_frames=4, anonymize=True)
    run = _test_run(tmp_path, release)
    assert (run / "submission.csv").is_file()
    page = (run / "report.html").read_text()
    data = json.loads(page.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0])
    assert data["anonymized"] is True and data["queries"]
    assert all(q["ap"] is None and all(g[3] is None for g in q["top"]) for q in data["queries"])
    assert all(r["ap"] is None for r in read_csv(run / CSV_NAME))
    if CHROMIUM:
        dom = _dump_dom(run / "report.html", "#all", tmp_path)
        assert dom.count('class="query"') == len(data["queries"]) and 'class="hit m1"' not in dom


# ------------------------------------------------------------------------------------------ farreid compare
def _fake_run(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "results.json").write_text("{}")
    with (path / CSV_NAME).open("w") as f:
        f.write(",".join(FIELDS) + "\n")
        for r in rows:
            full = {"camid": 1, "view": "aerial", "altitude": 30.0, "distance": 50.0, "pitch": 60.0, "num_frames": 8,
                    "ap_rerank": "", "first_match_rank": 1, "first_match_rank_rerank": "", **r}  # fmt: skip
            f.write(",".join("" if full[k] is None else str(full[k]) for k in FIELDS) + "\n")
    return path


def _rows(aps: dict) -> list[dict]:
    return [{"case": c, "query": q, "pid": int(q[:4]), "ap": ap} for (c, q), ap in aps.items()]


def test_compare_sorts_regressions_first_and_summarises_per_case_and_bin(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", _rows({("A2G", "0001_1"): 0.5, ("A2G", "0002_1"): 0.2, ("G2A", "0003_1"): 1.0}))
    b = _fake_run(tmp_path / "b", _rows({("A2G", "0001_1"): 0.9, ("A2G", "0002_1"): 0.1, ("G2A", "0003_1"): 0.25}))
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    table = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [r["query"] for r in table] == ["0003_1", "0002_1", "0001_1"]  # -0.75, -0.1, +0.4
    assert float(table[0]["delta"]) == pytest.approx(-0.75)
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert summary["cases"]["A2G"]["mAP_a"] == pytest.approx(0.35) and summary["cases"]["A2G"]["mAP_b"] == 0.5
    assert summary["cases"]["A2G"]["better"] == 1 and summary["cases"]["A2G"]["worse"] == 1
    assert summary["altitude"]["A2G"]["20-40"]["queries"] == 2 and "30-60" in summary["distance"]["G2A"]
    out = capsys.readouterr().out
    assert "largest regressions" in out and out.index("0003_1") < out.index("0001_1")
    assert len(out.splitlines()) < 40  # one screen
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "data-query='0003_1'" in page and "http" not in page


@pytest.mark.parametrize(
    ("b_rows", "message"),
    [
        ({("A2G", "0001_1"): 0.5, ("A2A", "0002_1"): 0.5}, "different cases"),
        ({("A2G", "0001_1"): 0.5, ("A2G", "0009_1"): 0.5}, "case A2G: the runs scored different queries: 1 only in A"),
    ],
)
def test_compare_refuses_runs_over_different_cases_or_queries(tmp_path, capsys, b_rows, message):
    a = _fake_run(tmp_path / "a", _rows({("A2G", "0001_1"): 0.5, ("A2G", "0002_1"): 0.5}))
    b = _fake_run(tmp_path / "b", _rows(b_rows))
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cmp").exists()


def test_compare_names_what_is_not_a_test_run(tmp_path, capsys):
    good = _fake_run(tmp_path / "good", _rows({("A2G", "0001_1"): 0.5}))
    (tmp_path / "plain").mkdir()
    no_table = tmp_path / "no_table"
    no_table.mkdir()
    (no_table / "results.json").write_text("{}")
    for other, expected in ((tmp_path / "plain", "no results.json"), (no_table, "no per_query.csv"),
                            (tmp_path / "missing", "no such directory")):  # fmt: skip
        assert compare.main([str(good), str(other), "--out", str(tmp_path / "cmp")]) == 1
        err = capsys.readouterr().err.strip()
        assert expected in err and str(other) in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_test_then_compare_through_the_console_script(make_release, tiny_checkpoint, tmp_path):
    """`farreid test` on a release with a broken query frame exits 0 with its report and figures, so that `fit &&
    test && compare` chains go on; `farreid compare` of it and an untrained run prints the summary and writes its
    files; a directory that is not a run gets a one-line error."""
    release = _copy_release(make_release(num_train_ids=6, num_test_ids=3, seed=3, max_frames=6), tmp_path / "rel")
    _break_frames(release)
    common = [*TINY_RUN, "--data.root", str(release), "--evaluator.figures", "true"]
    for name, extra in (("untrained", []), ("trained", ["--ckpt_path", tiny_checkpoint])):
        proc = run_farreid("test", *common, "--trainer.default_root_dir", str(tmp_path / name), *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run,) = sorted((tmp_path / name).glob("test-*"))
        assert {"report.html", CSV_NAME, "results.json", "figures", "report"} <= set(os.listdir(run))
    (a,), (b,) = sorted((tmp_path / "untrained").glob("test-*")), sorted((tmp_path / "trained").glob("test-*"))
    proc = run_farreid("compare", str(a), str(b), "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all queries" in proc.stdout and (tmp_path / "cmp" / "compare.html").is_file()
    proc = run_farreid("compare", str(a), str(tmp_path), "--out", str(tmp_path / "cmp2"), cwd=tmp_path)
    assert proc.returncode == 1 and "not a `farreid test` run directory" in proc.stderr


def test_thumbnails_forked_or_not_give_the_same_sheets_and_the_right_pixels(make_release, tmp_path):
    """Sprite references point at the pixels of the scorer's frames; decoding in forked workers changes nothing."""
    import numpy as np
    from PIL import Image

    from farreid.data.protocols import released_cases
    from farreid.evaluation.frames import TILE, FrameReader, scorer_frames
    from farreid.evaluation.report import _Thumbnails

    eval_set = released_cases(str(make_release(num_train_ids=4, num_test_ids=4, seed=5, max_frames=9)))
    queries, gallery = eval_set.cases["A2G"]
    sequence = [(int(q), [int(g) for g in gallery[:10]]) for q in queries]
    built = {}
    for workers in (0, 2):
        thumbs = _Thumbnails(eval_set, 4, tmp_path / str(workers), workers=workers, chunk=3)
        thumbs.build(sequence, keep=set())
        thumbs.close()
        refs = [(thumbs.strip(q), [thumbs.tile(g) for g in top]) for q, top in sequence]
        files = {p.name: p.read_bytes() for p in (tmp_path / str(workers)).iterdir()}
        built[workers] = (refs, files)
    assert built[0] == built[2] and len(built[0][1]) >= 1
    sheets = {name: np.asarray(Image.open(tmp_path / "0" / name)).astype(int) for name in built[0][1]}
    reader = FrameReader()
    for (strip, tiles), (q, top) in zip(built[0][0], sequence, strict=True):
        frames = scorer_frames(eval_set.tracklets[q].frames, 4)
        sheet, x, y, width = strip
        drawn = sheets[f"s{sheet}.jpg"][y : y + TILE[0], x : x + width]
        assert np.abs(drawn - reader.strip(frames).astype(int)).mean() < 8  # JPEG-close to the decoded frames
        for (sheet, x, y, width), g in zip(tiles, top, strict=True):
            middle = scorer_frames(eval_set.tracklets[g].frames, 4)[2]
            drawn = sheets[f"s{sheet}.jpg"][y : y + TILE[0], x : x + width]
            assert width == TILE[1] and np.abs(drawn - reader.read(middle).astype(int)).mean() < 8


@pytest.mark.slow
def test_the_demo_leaves_a_report_and_a_comparison(small_release, tmp_path):
    """`make demo`'s command, shrunk to 2 epochs of 2 steps: exit 0, the trained test's report.html and the
    untrained-vs-trained comparison beside it, both named on the terminal."""
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "farreid.demo", "--config", str(repo / "configs" / "demo.yaml"),
         "--data.root", small_release, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
         "--trainer.check_val_every_n_epoch", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [p for p in tmp_path.rglob("test-*/report.html")]
    assert len(reports) == 2 and sum(p.as_uri() in proc.stdout for p in reports) == 1  # the trained test's
    (page,) = tmp_path.rglob("compare-untrained-trained/compare.html")
    assert "all queries" in proc.stdout and page.is_file()
