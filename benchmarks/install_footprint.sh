#!/usr/bin/env bash
# Install footprint of bpo-plugins extras: MB on disk (the venv's site-packages) and seconds to install from a warm
# pip cache, each into a fresh venv. With PASSES=2 (default) each install runs twice and the second is timed; PASSES=1
# times the only one (warm when the same packages were installed before).
#   [PASSES=1] [EXTRAS="langchain,openai server local"] bash benchmarks/install_footprint.sh WHEEL LABEL > rows.tsv
# WHEEL: a built wheel (python -m build). The CPU build of torch comes from constraints-cpu.txt, as in the README.
set -euo pipefail
wheel=$1 label=$2
constraints="$(cd "$(dirname "$0")/.." && pwd)/constraints-cpu.txt"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for extra in ${EXTRAS:-langchain,openai server local}; do
  for _ in $(seq "${PASSES:-2}"); do
    rm -rf "$work/venv"
    python -m venv "$work/venv"
    start=$(date +%s.%N)
    "$work/venv/bin/pip" install -q -c "$constraints" "$wheel[$extra]" 2>&1 | grep -v "^WARNING: Location" || true
    end=$(date +%s.%N)
  done
  site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mb=$(du -sm "$site" | cut -f1)
  torch=$("$work/venv/bin/python" -c 'import importlib.util as u; print("yes" if u.find_spec("torch") else "no")')
  printf '%s\t[%s]\t%s\t%.0f\t%s\n' "$label" "$extra" "$mb" "$(echo "$end - $start" | bc)" "$torch"
done
