#!/usr/bin/env bash
# Installs everything the recipe needs into the current Python (3.11). Idempotent.
# torch goes first: a package that asks for torch with none present pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
# DeepSpeed: no C++/CUDA ops at install time (they JIT-compile on first use, only when needed:
# CPU-Adam with offload, FusedAdam). Its CPU shared-memory comm op is never built on CPU machines
# (pretrain/deepspeed_engine.py marks it unused), so tests compile nothing.
DS_BUILD_OPS=0 "$PYTHON" -m pip install --quiet -r requirements.txt
