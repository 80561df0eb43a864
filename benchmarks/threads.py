"""CPU thread policy: training steps/s of the demo run for several `data.compute_threads` values.

Run from the repository root (after `make demo-data`):

    python benchmarks/threads.py                       # compute_threads 1, 2 and 0 (the demo's setting)
    python benchmarks/threads.py --threads 1 2 --rounds 3

Each measurement runs the installed `farreid fit` console script on `configs/demo.yaml` (1 loader worker) twice,
for `--short` and `--long` training steps, and takes steps/s = (long - short) / (wall time difference): start-up,
data listing and model building cancel out. Settings alternate within each round, so a change of machine load
hits all of them alike; the best round is reported, with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit_seconds(data: Path, run_dir: Path, threads: int, steps: int) -> float:
    """Wall time of one `farreid fit` of `steps` training steps (no validation) with `threads` compute threads."""
    farreid = shutil.which("farreid", path=str(Path(sys.executable).parent)) or "farreid"
    command = [
        farreid, "fit", "--config", str(ROOT / "configs/demo.yaml"), "--data.root", str(data),
        "--data.compute_threads", str(threads), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", str(steps), "--trainer.check_val_every_n_epoch", "1000",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", "false",
    ]  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data/demo", help="demo data root (`make demo-data`)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 0], help="data.compute_threads values")
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        raise SystemExit(f"{args.data}/train not found: run `make demo-data` first or pass --data")
    print(f"{os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}")
    best: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for threads in args.threads:
                run_dir = Path(tmp) / f"t{threads}"
                short = fit_seconds(args.data, run_dir, threads, args.short)
                long = fit_seconds(args.data, run_dir, threads, args.long)
                rate = (args.long - args.short) / (long - short)
                best[threads] = max(best.get(threads, 0.0), rate)
                print(f"  round {round_index + 1}: compute_threads {threads}: {rate:.2f} steps/s", flush=True)
    baseline = best[args.threads[0]]
    for threads, rate in best.items():
        label = "0 (cores minus loader workers)" if threads == 0 else str(threads)
        print(f"compute_threads {label}: best {rate:.2f} steps/s ({rate / baseline:.2f}x compute_threads "
              f"{args.threads[0]})")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
