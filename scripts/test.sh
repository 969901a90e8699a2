#!/usr/bin/env bash
# Run the deployq test suite (creates .venv on first use).
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
ruff check .
exec python -m pytest -q -p no:cacheprovider "$@"
