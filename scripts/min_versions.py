"""Pin every dependency of farreid to exactly its declared lower bound (a pip constraints file).

`scripts/min_versions.sh` installs these pins in a throw-away virtualenv and runs the fast test tier, so the
lower bounds in pyproject.toml are versions that were run, not guesses. Run alone, this prints the constraints:

    python3 scripts/min_versions.py [--pyproject PATH] [--extras cpu,dev,export,datasets] [--override torch==X]

Needs Python >= 3.11 (tomllib) and `packaging`.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# The extras a CPU machine installs and the tests use. `gpu` (faiss-gpu) is left out: it needs a CUDA device
# and provides the same `faiss` module as `cpu`, so the two are never installed together.
DEFAULT_EXTRAS = ("cpu", "dev", "export", "datasets")


def declared_requirements(pyproject: Path, extras=DEFAULT_EXTRAS) -> list[tuple[str, Requirement]]:
    """The requirement strings of the base dependencies and of `extras`, each with the group it came from."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"{pyproject}: no extra {unknown} in [project.optional-dependencies] (has {sorted(optional)})")
    groups = [("dependencies", project.get("dependencies", []))]
    groups += [(f"optional-dependencies.{extra}", optional[extra]) for extra in extras]
    return [(group, Requirement(text)) for group, texts in groups for text in texts]


def lower_bounds(pyproject: Path, extras=DEFAULT_EXTRAS) -> dict[str, str]:
    """Canonical package name -> its `>=` lower bound. Every dependency must declare exactly one, and a package
    declared in several groups must declare the same one everywhere."""
    bounds: dict[str, tuple[str, str]] = {}
    for group, requirement in declared_requirements(pyproject, extras):
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(floors) != 1:
            raise SystemExit(
                f"{pyproject}: [project.{group}] {requirement} must declare exactly one `>=` lower bound, "
                f"found {len(floors)}"
            )
        name = canonicalize_name(requirement.name)
        if name in bounds and bounds[name][0] != floors[0]:
            raise SystemExit(
                f"{pyproject}: {name} has lower bound {floors[0]} in [project.{group}] but {bounds[name][0]} in "
                f"[project.{bounds[name][1]}]: declare one bound"
            )
        bounds[name] = (floors[0], group)
    return {name: version for name, (version, _) in bounds.items()}


def constraints(pyproject: Path, extras=DEFAULT_EXTRAS, overrides=()) -> dict[str, str]:
    """The pins: each lower bound, except for packages given in `overrides` (`name==version`)."""
    pins = lower_bounds(pyproject, extras)
    for override in overrides:
        requirement = Requirement(override)
        specs = list(requirement.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise SystemExit(f"--override {override!r}: expected NAME==VERSION")
        name = canonicalize_name(requirement.name)
        if name not in pins:
            raise SystemExit(f"--override {override!r}: {name} is not a declared dependency ({sorted(pins)})")
        pins[name] = specs[0].version
    return pins


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    parser.add_argument("--extras", default=",".join(DEFAULT_EXTRAS), help="comma-separated extras to include")
    parser.add_argument("--override", action="append", default=[], help="NAME==VERSION instead of the lower bound")
    parser.add_argument("--print-extras", action="store_true", help="print the extras covered (for pip) and stop")
    args = parser.parse_args(argv)
    extras = tuple(extra for extra in args.extras.split(",") if extra)
    if args.print_extras:
        print(",".join(extras))
        return 0
    for name, version in sorted(constraints(args.pyproject, extras, args.override).items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
