#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv with the pinned stack, then activate it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x "$root/.venv/bin/python" ] || [ "$root/pyproject.toml" -nt "$root/.venv/.deployq-installed" ]; then
  echo "deployq: setting up $root/.venv (first run takes about a minute)" >&2
  "$py" -m venv "$root/.venv"
  # (pip's notes about unused local index folders are filtered out; real errors still fail the script)
  "$root/.venv/bin/python" -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
  "$root/.venv/bin/python" -m pip install -q -e "$root[dev]" 2>&1 | { grep -v -e "^WARNING: Location" || true; }
  touch "$root/.venv/.deployq-installed"
fi
# the native libraries (deployq/native/*.cc) are compiled next to the package against the installed mxnet; without
# a compiler deployq warns once and runs its NumPy/MXNet fallback (same results, slower)
if [ ! -e "$root/deployq/native/libdeployq_fakequant.so" ] || [ ! -e "$root/deployq/native/libdeployq_calibops.so" ]; then
  "$root/.venv/bin/python" -m deployq.native >/dev/null || echo "deployq: native libraries not built (fallback in use)" >&2
fi
# shellcheck disable=SC1091
. "$root/.venv/bin/activate"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MXNET_SUBGRAPH_VERBOSE=0 PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
