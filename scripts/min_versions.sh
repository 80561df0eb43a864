#!/usr/bin/env bash
# Install every farreid dependency at exactly its declared lower bound in a throw-away virtualenv and run the
# fast test tier there. Exit status: pytest's. Re-runnable: the virtualenv is rebuilt from scratch each time.
#
#   scripts/min_versions.sh                     # `make test-min`; extra arguments go to pytest
#   scripts/min_versions.sh --constraints-only  # print the pins and stop
#
# Environment:
#   MIN_VENV   where the throw-away virtualenv goes (default /tmp/farreid-min-venv; never inside the repo)
#   TORCH_PIN  e.g. torch==2.13.0 to test another torch than the declared floor (default: the floor)
#   PYTHON     the interpreter that builds the virtualenv and reads pyproject.toml (default python3, >= 3.11)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
MIN_VENV=${MIN_VENV:-/tmp/farreid-min-venv}
# The extras installed and pinned (min_versions.DEFAULT_EXTRAS: every extra but `gpu`).
EXTRAS=$("$PYTHON" "$REPO/scripts/min_versions.py" --print-extras)
pins() { "$PYTHON" "$REPO/scripts/min_versions.py" ${TORCH_PIN:+--override "$TORCH_PIN"}; }

if [[ ${1:-} == --constraints-only ]]; then
    pins
    exit 0
fi

MIN_VENV=$(realpath -m "$MIN_VENV")
case "$MIN_VENV/" in
    "$REPO"/*) echo "MIN_VENV=$MIN_VENV is inside the repository $REPO: choose a path outside it" >&2; exit 2 ;;
esac
if [[ -e $MIN_VENV && ! -f $MIN_VENV/pyvenv.cfg ]]; then
    echo "MIN_VENV=$MIN_VENV exists and is not a virtualenv (no pyvenv.cfg): refusing to delete it" >&2
    exit 2
fi

CONSTRAINTS=$(mktemp /tmp/farreid-min-constraints.XXXXXX.txt)
trap 'rm -f "$CONSTRAINTS"' EXIT
pins > "$CONSTRAINTS"
echo "== constraints (each dependency at its lower bound${TORCH_PIN:+, $TORCH_PIN})"
cat "$CONSTRAINTS"

echo "== fresh virtualenv in $MIN_VENV"
rm -rf "$MIN_VENV"
"$PYTHON" -m venv "$MIN_VENV"
PIP=("$MIN_VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# torch first and alone: its floor is a large wheel set, and everything after resolves around it.
"${PIP[@]}" install -q -c "$CONSTRAINTS" torch
"${PIP[@]}" install -q -c "$CONSTRAINTS" -e "$REPO[$EXTRAS]"
"${PIP[@]}" check

echo "== installed versions of the pinned packages"
"${PIP[@]}" freeze --exclude-editable > "$MIN_VENV/freeze.txt"
"$MIN_VENV/bin/python" - "$CONSTRAINTS" "$MIN_VENV/freeze.txt" <<'PY'
import sys

from packaging.utils import canonicalize_name

pinned = {canonicalize_name(line.split("==")[0]) for line in open(sys.argv[1]) if line.strip()}
installed = {canonicalize_name(line.split("==")[0]): line.strip() for line in open(sys.argv[2]) if "==" in line}
missing = sorted(pinned - set(installed))
for name in sorted(pinned & set(installed)):
    print(installed[name])
if missing:
    sys.exit(f"pinned but not installed: {missing}")
PY
echo "(full list: $MIN_VENV/freeze.txt)"

echo "== fast test tier at these versions"
cd "$REPO"
set +e
"$MIN_VENV/bin/python" -m pytest -q -m "not slow and not gpu" "$@"
status=$?
echo "== pytest exit status $status (virtualenv kept in $MIN_VENV)"
exit $status
