"""Which interpreter the launch scripts use (launch/python_env.sh): the caller's $PYTHON, an active
virtual/conda environment's python, else the repository's .venv (a system python such as Debian 12's
refuses pip installs: PEP 668). setup.sh, quickstart.sh, tests/run.sh, local.sh and pretrain.sbatch
all source it, so they agree."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _choose(**env) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX")}
    done = subprocess.run(["bash", "-c", 'source launch/python_env.sh; echo "$PYTHON|$SESSA_VENV_NEEDED"'],
                          cwd=REPO, env={**base, **env}, capture_output=True, text=True, check=True)
    python, needed = done.stdout.strip().split("|")
    return python, needed


def test_no_environment_means_the_repository_venv():
    python, needed = _choose()
    assert python == str(REPO / ".venv" / "bin" / "python")
    assert needed == ("0" if Path(python).exists() else "1")


@pytest.mark.parametrize("variable", ["VIRTUAL_ENV", "CONDA_PREFIX"])
def test_an_active_environment_is_used_as_it_is(variable):
    assert _choose(**{variable: "/some/env"})[0] in ("python3", "python")


def test_the_callers_python_wins():
    assert _choose(PYTHON="/opt/py/bin/python3", VIRTUAL_ENV="/some/env") == ("/opt/py/bin/python3", "0")


def test_every_launch_script_sources_it():
    for script in ("launch/setup.sh", "launch/quickstart.sh", "tests/run.sh", "launch/local.sh",
                   "launch/slurm/pretrain.sbatch"):
        assert "launch/python_env.sh" in (REPO / script).read_text(), script
