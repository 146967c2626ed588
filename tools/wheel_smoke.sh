#!/usr/bin/env bash
# What a user installs, tested as a user gets it: build LoopTune's wheel, install it (not
# editable) in a fresh virtual environment whose dependencies come from the package index, and
# run tools/wheel_smoke.py there (import, a matmul against numpy, the shipped data files,
# `looptune info`, a one-problem `looptune build-db`).  .ci/run calls it after the test suite.
#
#   tools/wheel_smoke.sh [SOURCE_DIR]      # default: this repository
#
# The wheel is built from a copy of the source (an in-tree build would write build/ and
# *.egg-info into the working tree).  PYTHON picks the interpreter (default: python, as in the README).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "${1:-$here/..}" && pwd)
python=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/looptune-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
t0=$SECONDS

echo "wheel smoke: building the wheel of $src"
mkdir "$work/src"
tar -C "$src" --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=./.hypothesis --exclude=./.pytest_cache --exclude=./.venv -cf - . | tar -C "$work/src" -xf -
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/looptune-*.whl)

echo "wheel smoke: installing $(basename "$wheel") in a fresh venv"
"$python" -m venv "$work/venv"
env -u PYTHONPATH "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"

echo "wheel smoke: running tools/wheel_smoke.py in the venv"
mkdir "$work/run"
cp "$here/wheel_smoke.py" "$work/run/"
cd "$work/run"          # nothing of the source tree on sys.path
env -u PYTHONPATH LOOPTUNE_CACHE_DIR="$work/cache" LOOPTUNE_DB="$work/run/user.h5" \
    "$work/venv/bin/python" wheel_smoke.py "$work/run"
echo "wheel smoke: passed in $((SECONDS - t0)) s"
