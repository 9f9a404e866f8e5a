#!/usr/bin/env bash
# One srun task of launch/slurm/pretrain.sbatch (also used by launch/local.sh):
#   rank.sh rank ARGS...       one training rank: python -m pretrain ARGS (RANK etc. from torchrun or SLURM_*)
#   rank.sh torchrun ARGS...   this node's $SESSA_RANKS_PER_NODE ranks under torchrun, node rank $SLURM_NODEID,
#                              static rendezvous on $MASTER_ADDR:$MASTER_PORT
# SIGUSR1 (the time-limit warning) is ignored until the trainer installs its handler: ignored signals
# survive exec, so a warning that arrives while a rank still imports cannot kill it.
set -euo pipefail
trap '' USR1
mode=$1
shift
case $mode in
  rank)
    exec "${PYTHON:-python3}" -m pretrain "$@" ;;
  torchrun)
    # torchrun passes SIGUSR1 on to its ranks only when told to, and kills ranks that have not exited
    # --shutdown-timeout seconds after a signal: give them the time to save.
    exec "${PYTHON:-python3}" -m torch.distributed.run \
      --nnodes="${SESSA_NNODES:-${SLURM_STEP_NUM_NODES:-1}}" --node-rank="${SESSA_NODE_RANK:-${SLURM_NODEID:-0}}" \
      --nproc-per-node="${SESSA_RANKS_PER_NODE:-1}" \
      --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
      --max-restarts=0 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
      --shutdown-timeout="${SESSA_SHUTDOWN_TIMEOUT:-600}" \
      --no-python "$0" rank "$@" ;;
  *)
    echo "usage: $0 rank|torchrun ARGS..." >&2
    exit 2 ;;
esac
