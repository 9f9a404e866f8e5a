#!/usr/bin/env bash
# The CPU quickstart: set up, prepare the bundled corpus, train configs/tiny.yaml, get preempted
# (SIGTERM -> checkpoint -> clean exit), resume from `latest`, and print a sample at the end.
#   bash launch/quickstart.sh [extra overrides, e.g. --train.max_steps 100]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source launch/python_env.sh  # the interpreter setup.sh installed into
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [ ! -f data/builtin/manifest.json ]; then
  echo "== preparing the built-in corpus (Python 3.11 docs, pydocs4k BPE, 256-token sequences)"
  "$PYTHON" -m data_pipeline prepare --source builtin --tokenizer pydocs4k --seq-len 256 --out data/builtin
fi

echo "== training configs/tiny.yaml; a SIGTERM after ${PREEMPT_AFTER_S:=60} s plays the cluster's preemption"
status=0
timeout --signal=TERM "$PREEMPT_AFTER_S" "$PYTHON" -m pretrain --config configs/tiny.yaml "$@" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then exit "$status"; fi

echo "== the same command again resumes from runs/tiny/checkpoints/latest"
"$PYTHON" -m pretrain --config configs/tiny.yaml "$@"
echo "== done: runs/tiny holds config.yaml, metrics.jsonl, checkpoints/ and wandb/ (offline)"
