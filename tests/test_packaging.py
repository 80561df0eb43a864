"""`make test-min` really pins every declared lower bound: the constraint generation of scripts/min_versions.sh
is checked against pyproject.toml read independently here (the heavy virtualenv run itself is not in this tier)."""

import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "min_versions.sh"


def constraints_only(*, env_extra=None, pyproject=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TORCH_PIN", None)  # the caller's own pin would change the expected constraints
    env.update(env_extra or {})
    command = ["bash", str(SCRIPT), "--constraints-only"]
    if pyproject is not None:  # the parser alone, on another pyproject
        command = [sys.executable, str(REPO / "scripts" / "min_versions.py"), "--pyproject", str(pyproject)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def parse_pins(stdout: str) -> dict[str, str]:
    pins = {}
    for line in stdout.splitlines():
        name, sep, version = line.partition("==")
        assert sep and name and version, f"not a NAME==VERSION pin: {line!r}"
        assert name not in pins, f"{name} pinned twice"
        pins[name] = version
    return pins


def test_every_lower_bound_is_pinned_exactly():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    covered = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "min_versions.py"), "--print-extras"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().split(",")  # fmt: skip
    # Every extra is installed by `make test-min` except `gpu` (faiss-gpu needs CUDA; `cpu` provides the same module).
    assert sorted(covered) == sorted(set(extras) - {"gpu"})
    declared = project["dependencies"] + [text for extra in covered for text in extras[extra]]

    proc = constraints_only()
    assert proc.returncode == 0, proc.stderr
    pins = parse_pins(proc.stdout)
    expected = {}
    for text in declared:
        requirement = Requirement(text)
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(floors) == 1, f"{text!r} in pyproject.toml declares no single `>=` lower bound"
        expected[canonicalize_name(requirement.name)] = floors[0]
    assert pins == expected
    assert {"torch", "transformers", "lightning", "faiss-cpu", "onnxruntime", "pytest"} <= set(pins)


def test_torch_pin_overrides_only_torch():
    default = parse_pins(constraints_only().stdout)
    proc = constraints_only(env_extra={"TORCH_PIN": "torch==2.13.0"})
    assert proc.returncode == 0, proc.stderr
    assert parse_pins(proc.stdout) == {**default, "torch": "2.13.0"}


@pytest.mark.parametrize(
    ("dependencies", "message"),
    [
        (["numpy"], "numpy must declare exactly one `>=` lower bound, found 0"),
        (["numpy<3"], "numpy<3 must declare exactly one `>=` lower bound, found 0"),
        (["numpy>=1.26", "NumPy>=2.0"], "numpy has lower bound 2.0"),
    ],
    ids=["unbounded", "upper-only", "conflicting"],
)
def test_undeclared_or_conflicting_bound_is_an_error(tmp_path, dependencies, message):
    pyproject = tmp_path / "pyproject.toml"
    quoted = ", ".join(f'"{text}"' for text in dependencies)
    pyproject.write_text(
        f'[project]\nname = "x"\ndependencies = [{quoted}]\n'
        "[project.optional-dependencies]\ncpu = []\ndev = []\nexport = []\ndatasets = []\n"
    )
    proc = constraints_only(pyproject=pyproject)
    assert proc.returncode != 0
    assert str(pyproject) in proc.stderr and message in proc.stderr, proc.stderr


def test_each_install_path_has_exactly_one_faiss_wheel():
    """faiss-cpu and faiss-gpu provide the same `faiss` module: only the `cpu` and `gpu` extras name one, one each."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    faiss = {
        group: [
            Requirement(text).name for text in texts if canonicalize_name(Requirement(text).name).startswith("faiss")
        ]
        for group, texts in groups.items()
    }
    assert faiss.pop("cpu") == ["faiss-cpu"] and faiss.pop("gpu") == ["faiss-gpu"]
    assert not any(faiss.values()), f"a FAISS wheel outside the cpu/gpu extras: {faiss}"
    # `make install` takes its FAISS from the `cpu` extra only.
    pip_lines = [line for line in (REPO / "Makefile").read_text().splitlines() if "pip install" in line]
    assert any("'.[cpu,dev]'" in line for line in pip_lines) and not any("faiss" in line for line in pip_lines)


@pytest.mark.slow
def test_the_wheel_carries_the_report_page_assets(tmp_path):
    """A non-editable install (Docker, a cluster's site-packages) has the report's HTML, CSS and JavaScript."""
    import zipfile

    repo = REPO
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(repo)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("farreid-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("report.html", "report.css", "report.js"):
        assert f"farreid/evaluation/assets/{asset}" in names
