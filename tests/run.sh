#!/usr/bin/env bash
# Sets up and runs the whole test suite (what CI runs). Extra arguments go to pytest.
# --durations=25: the 25 slowest tests are listed at the end, so a CI run shows where its time goes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source launch/python_env.sh  # the interpreter setup.sh installed into
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$PYTHON" -m pytest -q --durations=25 "$@"
