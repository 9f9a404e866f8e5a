#!/usr/bin/env bash
# The prepared GPU check (issue 17), from the repository root on a bare H100/H200 machine with the
# wheels of benchmarks/gpu/wheels.sh in .whl/:
#
#   bash benchmarks/gpu/run.sh             # about 8 minutes; writes $OUT/gpu.json and $OUT/gpu.md
#   bash benchmarks/gpu/run.sh --dry-run   # on CPU: every part with tiny shapes, Triton interpreter
#   bash benchmarks/gpu/run.sh --part paper [--dry-run] [--budget-s S]   # a separate invocation: the paper's
#        comparison (benchmarks/gpu/paper.py), 240 s wall in all from here; writes $OUT/paper.json and paper.md
#
# Results go to $OUT, or benchmarks/results/ when OUT is unset. Installs .whl/ into a temporary target
# put on PYTHONPATH (skipped when the Python already imports megatron.core, webdataset and torchdata),
# prints versions and the device, then runs benchmarks/gpu/check.py (parts a-d, each time-boxed).
set -euo pipefail
STARTED="$(date +%s.%N)"  # the paper part's budget counts from here: the wheels' install is in it
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON="${PYTHON:-python3}"
ARGS=()
SCRIPT=benchmarks/gpu/check.py
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) ARGS+=(--dry-run); export TRITON_INTERPRET=1 ;;
        --part)
            if [ "${2:-}" != paper ]; then
                echo "[gpu-check] --part takes 'paper' (the main check runs without --part)" >&2; exit 2
            fi
            SCRIPT=benchmarks/gpu/paper.py; ARGS+=(--started "$STARTED"); shift ;;
        *) ARGS+=("$1") ;;
    esac
    shift
done
export PYTHONUNBUFFERED=1

# One interpreter both checks the imports and prints the versions (each start imports torch and
# megatron: seconds that a loaded CI machine multiplies).
VERSIONS='
import platform, torch, triton, megatron.core, webdataset, torchdata
print(f"[gpu-check] python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, megatron-core {megatron.core.__version__}")
print("[gpu-check] device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA device)")'
if "$PYTHON" -c "$VERSIONS" 2>/dev/null; then
    echo "[gpu-check] megatron.core, webdataset and torchdata import already: .whl/ not installed"
elif compgen -G ".whl/*.whl" >/dev/null; then
    SITE="$(mktemp -d)/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu-check] installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
    "$PYTHON" -c "$VERSIONS"
else
    echo "[gpu-check] megatron.core, webdataset or torchdata is missing and .whl/ is empty: run" \
         "bash benchmarks/gpu/wheels.sh where the package index is reachable and carry .whl/ along" >&2
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

exec "$PYTHON" "$SCRIPT" "${ARGS[@]}"
