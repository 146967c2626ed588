#!/usr/bin/env bash
# What a new user gets: the project installed as users install it (pip install . into a fresh venv), no
# user database, default settings, a cold kernel cache; runtime.matmul against numpy at 1 and 2 threads on
# a shape file (default: tools/shapes/dl-public.txt).  numpy runs on the OpenBLAS core it picks for this
# CPU (forced cores are unset).  On an AVX-512 CPU it runs again as an AVX2 CPU the embedded database has not
# seen (LOOPTUNE_ISA=avx2, numpy on OpenBLAS's Haswell core).
# usage (from the project's root): tools/out_of_box.sh [SHAPES_FILE]      about 5 minutes per shape set
set -u
here=$(cd "$(dirname "$0")" && pwd); root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
shapes=$(realpath "${1:-$here/shapes/dl-public.txt}")
d=$(mktemp -d); trap 'rm -rf "$d"' EXIT
python3 -m venv "$d/venv" && "$d/venv/bin/pip" install -q "$root" >"$d/install.log" 2>&1 \
  || { echo "pip install . failed: $(tail -3 "$d/install.log")"; exit 1; }
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE LOOPTUNE_FALLBACK LOOPTUNE_ISA
run() {  # label, threads, extra env
  local label=$1 t=$2; shift 2
  echo "== $label, $t thread(s)"
  ( cd "$d" && env "$@" OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t LOOPTUNE_NUM_THREADS=$t \
      LOOPTUNE_DB="$d/none-$RANDOM.h5" LOOPTUNE_CACHE_DIR="$d/cache-$RANDOM" \
      "$d/venv/bin/python" "$here/out_of_box.py" "$shapes" --threads "$t" ) | tail -n "${LINES_SHOWN:-1}"
}
for t in 1 2; do run "this CPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))" $t; done
if grep -qw avx512f /proc/cpuinfo; then
  for t in 1 2; do run "an unseen AVX2 CPU (LOOPTUNE_ISA=avx2, OPENBLAS_CORETYPE=Haswell)" $t LOOPTUNE_ISA=avx2 OPENBLAS_CORETYPE=Haswell; done
fi
