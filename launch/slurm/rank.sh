#!/usr/bin/env bash
# One srun task of launch/slurm/pretrain.sbatch (also used by launch/local.sh):
#   rank.sh rank ARGS...       one training rank: python -m pretrain ARGS (RANK etc. from torchrun or SLURM_*)
#   rank.sh torchrun ARGS...   this node's $SESSA_RANKS_PER_NODE ranks under torchrun, node rank $SLURM_NODEID,
#                              static rendezvous on $MASTER_ADDR:$MASTER_PORT
#   rank.sh signal SIG         send SIG to this node's ranks that catch it, once each; exit 1 while
#                              some rank cannot catch it yet (still starting)
# Stop requests go to the ranks' main processes only: a signal that reaches the processes a rank
# starts (data-loader workers, megatron's checkpoint writers and their multiprocessing manager)
# breaks a checkpoint being written, and one that reaches a rank after its handler is gone
# (start-up, interpreter shutdown) kills it. So a rank records its pid under $SESSA_RANK_PIDS/<host>/,
# SIGUSR1 stays ignored until the trainer installs its handler (ignored signals survive exec), and
# `signal` sends only to pids whose /proc/<pid>/status shows the signal caught.
set -euo pipefail
trap '' USR1
mode=$1
shift
case $mode in
  rank)
    if [ -n "${SESSA_RANK_PIDS:-}" ]; then
      mkdir -p "$SESSA_RANK_PIDS/$(hostname)"
      : > "$SESSA_RANK_PIDS/$(hostname)/$$"  # exec keeps the pid
    fi
    exec "${PYTHON:-python3}" -m pretrain "$@" ;;
  signal)
    sig=$1
    num=$(kill -l "$sig")
    waiting=0
    for file in "${SESSA_RANK_PIDS:?}/$(hostname)"/*; do
      pid=${file##*/}
      case $pid in *[!0-9]*) continue ;; esac  # markers: <pid>.<SIG>
      [ -e "$file.$sig" ] && continue
      grep -qa pretrain "/proc/$pid/cmdline" 2>/dev/null || continue  # gone
      caught=$(awk '/^SigCgt:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
      if [ -n "$caught" ] && (( (0x$caught >> (num - 1)) & 1 )); then
        kill -s "$sig" "$pid" && : > "$file.$sig"
      else
        waiting=1
      fi
    done
    exit "$waiting" ;;
  torchrun)
    # torchrun ignores SIGUSR1 (the ranks get it from `signal`): told to handle it, torchrun would
    # stop the ranks itself and exit 1 even when all saved. SLURM's SIGTERM (cancel, preemption,
    # time limit) reaches every process; torchrun passes it on and gives the ranks
    # $SESSA_TERM_GRACE_S seconds (default 20) to save before it kills them: report 0 then (the
    # checkpoint decides what comes next), so that srun --kill-on-bad-exit spares the other nodes' saves.
    stopped=
    trap 'stopped=TERM' TERM
    trap 'stopped=INT' INT
    "${PYTHON:-python3}" -m torch.distributed.run \
      --nnodes="${SESSA_NNODES:-${SLURM_STEP_NUM_NODES:-1}}" --node-rank="${SESSA_NODE_RANK:-${SLURM_NODEID:-0}}" \
      --nproc-per-node="${SESSA_RANKS_PER_NODE:-1}" \
      --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
      --max-restarts=0 --shutdown-timeout="${SESSA_TERM_GRACE_S:-20}" \
      --no-python "$0" rank "$@" &
    child=$!
    while :; do
      rc=0
      wait "$child" || rc=$?
      kill -0 "$child" 2>/dev/null || break  # else a trapped signal interrupted wait
    done
    if [ -n "$stopped" ] && [ "$rc" -ne 0 ]; then
      echo "rank.sh: torchrun stopped by SIG$stopped (exit $rc)" >&2
      rc=0
    fi
    exit "$rc" ;;
  *)
    echo "usage: $0 rank|torchrun ARGS... | signal SIG" >&2
    exit 2 ;;
esac
