#!/usr/bin/env bash
# Sets up and runs the whole test suite (what CI runs). Extra arguments go to pytest.
# --durations=25: the 25 slowest tests are listed at the end, so a CI run shows where its time goes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source launch/python_env.sh  # the interpreter setup.sh installed into
# Two pytest workers (pytest-xdist): most tests keep one core busy, so the suite takes about half
# the time on 2 cores; one thread each. The SLURM tests share one cluster: one worker runs them all.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PYTHON" -m pytest -q --durations=25 -n "${TEST_WORKERS:-2}" --dist loadgroup "$@"
