"""What the error-analysis report costs a DetReIDX-sized test, and whether its page opens without stalling.

Run from the repository root:

    python benchmarks/report.py                    # ~5,000 queries (620 test identities)
    python benchmarks/report.py --test-ids 120     # quicker

Generates a release in the DetReIDX layout (``--test-ids`` identities, 4 frames per tracklet), then runs ``farreid
test`` in this process with the tiny random CLIP of ``configs/tiny.yaml`` (CPU), ``--repeats`` times each with
``evaluator.report`` off and on, alternating after one uncounted warm-up run, with ``--workers`` DataLoader workers
(the report decodes its thumbnails in as many processes), and prints: the queries, the test's wall time both ways
(median), the ratio (on - off) / off, and the report's own time from ``results.json`` (thumbnails, page) as a
fraction of the report-off test. The tiny model embeds a tracklet in a fraction of what ViT-L/14 needs, so this
ratio is an upper bound of what a real test pays. With Chromium installed it also loads ``report.html`` headless and
prints how long the page took to render its first page of queries (``--dump-dom`` wall time; a blank page takes the
same start-up, also printed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from farreid.cli import main  # noqa: E402
from farreid.data.synthetic import generate  # noqa: E402

CONFIGS = REPO / "configs"


def _test(release: Path, root: Path, report: bool, workers: int) -> tuple[float, Path]:
    args = ["test", "--config", str(CONFIGS / "vitl14.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
            "--model.text", "null", "--trainer.enable_progress_bar", "false", "--data.root", str(release),
            "--trainer.default_root_dir", str(root), "--evaluator.report", str(report).lower(),
            "--data.num_workers", str(workers)]  # fmt: skip
    start = time.perf_counter()
    main(args)
    seconds = time.perf_counter() - start
    return seconds, max(root.glob("test-*"), key=lambda p: p.stat().st_mtime)


def _chromium_seconds(page: str) -> float | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    with tempfile.TemporaryDirectory() as profile:
        start = time.perf_counter()
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        f"--user-data-dir={profile}", "--dump-dom", page],
                       capture_output=True, check=True, timeout=300)  # fmt: skip
        return time.perf_counter() - start


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test-ids", type=int, default=620, help="test identities (620: ~5,000 queries)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers of both runs (the report's too)")
    parser.add_argument("--tree", type=Path, default=None, help="where the release goes (default: a temporary dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="farreid-report-bench-"))
    release = args.tree or work / "release"
    if not (release / "case1_aerial_to_ground").is_dir():
        start = time.perf_counter()
        generate(release, num_train_ids=8, num_test_ids=args.test_ids, seed=0, min_frames=4, max_frames=4, workers=2)
        print(f"generated {release} in {time.perf_counter() - start:.1f} s")
    _test(release, work / "warm-up", False, args.workers)  # imports, index cache, page cache: not counted
    times: dict[bool, list[float]] = {False: [], True: []}
    report_seconds, thumb_seconds, run = [], [], None
    for repeat in range(args.repeats):
        for report in (False, True):
            seconds, run = _test(release, work / f"runs-{repeat}-{int(report)}", report, args.workers)
            times[report].append(seconds)
            if report:
                info = json.loads((run / "results.json").read_text())["report"]
                report_seconds.append(info["seconds"])
                thumb_seconds.append(info["thumbnail_seconds"])
    off, on = statistics.median(times[False]), statistics.median(times[True])
    info = json.loads((run / "results.json").read_text())
    queries = info["report"]["queries"]
    page = run / "report.html"
    thumbs = list((run / "report").glob("*.jpg"))
    mib = sum(p.stat().st_size for p in thumbs) / 2**20
    print(f"\nqueries: {queries} (A2G {info['A2G']['num_query']}, G2A {info['G2A']['num_query']}, "
          f"A2A {info['A2A']['num_query']}); {len(thumbs)} thumbnails, {mib:.1f} MiB; "
          f"report.html {page.stat().st_size / 2**20:.1f} MiB")  # fmt: skip
    print(f"farreid test, report off: median {off:.1f} s  {times[False]}")
    print(f"farreid test, report on:  median {on:.1f} s  {times[True]}")
    pairs = [(b - a) / a for a, b in zip(times[False], times[True], strict=True)]
    print(f"(on - off) / off: {(on - off) / off:+.1%} (medians); per round {', '.join(f'{p:+.1%}' for p in pairs)}")
    rep = statistics.median(report_seconds)
    print(f"report's own time: median {rep:.2f} s (thumbnails {statistics.median(thumb_seconds):.2f} s) = "
          f"{rep / off:.1%} of the report-off test")  # fmt: skip
    shown = _chromium_seconds(page.as_uri())
    if shown is not None:
        blank = work / "blank.html"
        blank.write_text("<!doctype html><title>blank</title>")
        print(f"headless Chromium, report.html: {shown:.2f} s; a blank page: {_chromium_seconds(blank.as_uri()):.2f} s")
    else:
        print("headless Chromium not installed: page load not measured")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main_()
