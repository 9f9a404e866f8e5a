#!/usr/bin/env bash
# Installs everything the recipe needs (Python 3.11). Idempotent. Which interpreter: launch/python_env.sh
# (an active venv/conda env as it is; otherwise ./.venv, created here, since a system python such as
# Debian 12's refuses pip installs: PEP 668, externally-managed-environment).
# torch goes first: a package that asks for torch with none present pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/python_env.sh
if [ "$SESSA_VENV_NEEDED" = 1 ]; then
  base=$(command -v python3)
  echo "== setup: no virtual environment is active; creating ./.venv from $base (used by every launch script)"
  if ! "$base" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "== setup: python3 -m venv needs Debian's python3-venv; installing it"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      "$base" -m venv .venv
    else
      echo "setup: '$base -m venv .venv' failed. Install your distribution's venv package" \
           "(Debian/Ubuntu: sudo apt-get install python3-venv), or activate a virtual environment, and rerun." >&2
      exit 1
    fi
  fi
fi
echo "== setup: using $("$PYTHON" -c 'import sys; print(sys.executable)')"
# quiet pip: no root notice, no version nag, no setuptools notice about distutils (pip's own business)
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
pip_quiet=(env "PYTHONWARNINGS=ignore:Setuptools is replacing distutils" "$PYTHON" -m pip install --quiet)
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "${pip_quiet[@]}" "torch==2.13.0"
fi
# DeepSpeed: no C++/CUDA ops at install time (they JIT-compile on first use, only when needed:
# CPU-Adam with offload, FusedAdam). Its CPU shared-memory comm op is never built on CPU machines
# (pretrain/engines/deepspeed.py marks it unused), so tests compile nothing.
DS_BUILD_OPS=0 "${pip_quiet[@]}" -r requirements.txt
# lm-evaluation-harness finds models only in its registry: register `sessa` in this environment
"$PYTHON" -W ignore -m pretrain.evaluate install-lm-eval >/dev/null
