#!/usr/bin/env bash
# Installs everything the recipe needs into the current Python (3.11). Idempotent.
# torch goes first: a package that asks for torch with none present pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -r requirements.txt
