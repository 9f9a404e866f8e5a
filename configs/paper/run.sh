#!/usr/bin/env bash
# The paper's comparison (SESSA.md §7) as a recipe: Sessa, Transformer++, Sessa without the
# feedback branch and the Mamba-2 arm (M-M-) at matched parameter counts, on two-style
# classification and Diffuse MQAR, over several seeds, then the table. Run from the repository root:
#     bash configs/paper/run.sh                 # STEPS=600 SEEDS="1 2 3" by default
#     STEPS=300 SEEDS="1 2" LIMIT=100 bash configs/paper/run.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-600}
SEEDS=${SEEDS:-"1 2 3"}
LIMIT=${LIMIT:-200}
RUNS=${RUNS_DIR:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# Task data (chars tokenizer, one example per sequence, loss on the answer). Knobs: an easy CPU
# setting; test lags of Diffuse MQAR reach 4x the longest trained lag.
[ -f data/paper/two-style/manifest.json ] || $PY -m data_pipeline synth two-style --out data/paper/two-style \
    --n 4000 --n-val 100 --n-test 200 --seed 0 --min-length 160 --max-length 240 --block-min 32 --block-max 48
[ -f data/paper/diffuse-mqar/manifest.json ] || $PY -m data_pipeline synth diffuse-mqar --out data/paper/diffuse-mqar \
    --n 4000 --n-val 100 --n-test 200 --seed 0 --pairs 32 --max-lag 6

runs=()
for task in two-style diffuse-mqar; do
  for model in sessa transformer sessa-nofb mamba2; do
    for seed in $SEEDS; do
      name=paper-$task-$model-s$seed
      $PY -m pretrain --config configs/paper/$task-$model.yaml --run_name $name --runs_dir "$RUNS" \
          --train.seed $seed --train.max_steps $STEPS
      runs+=("$RUNS/$name")
    done
  done
done
$PY -m pretrain.evaluate table --runs "${runs[@]}" --limit "$LIMIT" --no-progress \
    --out "$RUNS/paper-table.md" --json "$RUNS/paper-table.json"
