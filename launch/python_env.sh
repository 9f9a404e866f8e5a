# Sourced by setup.sh, quickstart.sh, local.sh and tests/run.sh: chooses the one interpreter they all use.
#   - $PYTHON set by the caller: used as it is;
#   - an active virtual environment or conda environment: its python, as it is;
#   - otherwise (system python, including Debian's externally-managed one, PEP 668): the repository's
#     .venv, created by setup.sh on first use.
# Exports PYTHON (an absolute path where it is the .venv's) and SESSA_VENV_NEEDED=1 when .venv must be made.
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SESSA_VENV_NEEDED=0
if [ -n "${PYTHON:-}" ]; then
  :
elif [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  PYTHON=python3
  command -v python3 >/dev/null 2>&1 || PYTHON=python
else
  PYTHON=$_repo/.venv/bin/python
  [ -x "$PYTHON" ] || SESSA_VENV_NEEDED=1
fi
export PYTHON SESSA_VENV_NEEDED
unset _repo
