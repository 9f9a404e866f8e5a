#!/usr/bin/env bash
# Sets up and runs the whole test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$PYTHON" -m pytest -q "$@"
