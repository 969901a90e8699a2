#!/usr/bin/env bash
# Run the deployq demo on the embedded MNIST-5k data (creates .venv on first use).
set -euo pipefail
. "$(dirname "$0")/env.sh"
exec deployq demo "$@"
