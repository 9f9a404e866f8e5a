#!/usr/bin/env bash
# Train on this machine with torchrun, with the recipe arguments of the SLURM launcher:
#   bash launch/local.sh [--nproc-per-node N] --config configs/tiny.yaml [--section.field value ...]
# N defaults to the number of GPUs (nvidia-smi), else 1. Like pretrain.sbatch it takes the run
# directory's lock, records the launch under runs/<run>/launches/ and resumes from `latest`.
# SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 to this script reach the ranks, which save a checkpoint and
# exit; the script then exits 0 and the same command resumes. A second one stops at once.
# Exit 3: the run had already reached max_steps; 4: another live job or process owns the run directory.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
source "$REPO/launch/python_env.sh"  # PYTHON: the caller's, an active environment's, or $REPO/.venv
export PYTHONUNBUFFERED=1

nproc=
case ${1:-} in
  --nproc-per-node) nproc=${2:?--nproc-per-node needs a value}; shift 2 ;;
  --nproc-per-node=*) nproc=${1#*=}; shift ;;
esac
if [ -z "$nproc" ]; then
  nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$nproc" -gt 0 ] 2>/dev/null || nproc=1
fi

export SESSA_LAUNCH=local SESSA_RANKS_PER_NODE=$nproc SESSA_NNODES=1 SESSA_NODE_RANK=0 MASTER_ADDR=127.0.0.1
owner=$("$PYTHON" -c "import sys; from pretrain.runlock import current_owner; print(current_owner(int(sys.argv[1])))" $$)
vars=$("$PYTHON" -m launch.slurm.job begin --owner "$owner" -- "$@")
status=$?
eval "$vars"
[ "$status" -eq 0 ] || exit "$status"

MASTER_PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export MASTER_PORT SESSA_RANK_PIDS=$RUN_DIR/.rank-pids
rm -rf "$SESSA_RANK_PIDS"
echo "== $(date -Is) local: $nproc rank(s); run $RUN_DIR from step $START_STEP of $MAX_STEPS"
# A stop request (TERM, INT or USR1) goes to the ranks' main processes once they can catch it (see
# rank.sh signal); a second one stops everything at once.
signalled=
stop() {
  if [ -n "$signalled" ] && [ -n "$child" ]; then
    kill -s TERM -- "-$child" 2>/dev/null
    return
  fi
  signalled=$1
  local sig=$1
  [ "$sig" = INT ] && sig=USR1  # the trainer saves on TERM and USR1
  echo "== $(date -Is) local: SIG$1; asking the ranks to save and stop (again to stop at once)"
  ( while :; do "$REPO/launch/slurm/rank.sh" signal "$sig"; sleep 1; done ) &
  resignal=$!
}
child= resignal=
trap 'stop TERM' TERM
trap 'stop INT' INT
trap 'stop USR1' USR1
# Its own session: a terminal's Ctrl-C reaches only this script, which passes it on.
setsid "$REPO/launch/slurm/rank.sh" torchrun "${TRAIN_ARGS[@]}" &
child=$!
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break  # else a trapped signal interrupted wait
done
[ -n "$resignal" ] && kill "$resignal" 2>/dev/null
rm -rf "$SESSA_RANK_PIDS"

decision=$("$PYTHON" -m launch.slurm.job end --rc "$rc" --run-dir "$RUN_DIR" --max-steps "$MAX_STEPS" \
           --start-step "$START_STEP" --owner "$SESSA_RUN_LOCK_OWNER" --record "$RECORD")
echo "== $(date -Is) local: ranks exited with $rc; run $decision"
case $decision in
  done) exit 0 ;;
  stopped) [ -n "$signalled" ] && exit 0; exit "$rc" ;;  # stopped by our signal: run the same command to resume
  *) exit $(( rc ? rc : 1 )) ;;
esac
