"""Fixtures for the launch tests: a real single-machine SLURM cluster, the tiny test recipe of
tests/pretrain on the session dataset (tests/conftest.py), and helpers to submit and inspect jobs."""
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from slurm_cluster import ClusterError, SlurmCluster

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pretrain_test_helpers", REPO / "tests" / "pretrain" / "conftest.py")
pretrain_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain_helpers)
read_metrics = pretrain_helpers.read_metrics


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (tests/run.sh) every test on the SLURM cluster runs on one worker: one cluster."""
    for item in items:
        if "slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture(scope="session")
def slurm():
    """4 emulated nodes x 2 CPUs. Fails (never skips) with the reason when SLURM cannot start."""
    folder = Path(tempfile.mkdtemp(prefix="sessa-slurm-"))  # not under pytest's 0700 tmp: munged must reach it
    cluster = SlurmCluster(folder, nodes=4, cpus_per_node=2)
    try:
        cluster.start()
    except ClusterError as err:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"could not start the test SLURM cluster: {err}", pytrace=False)
    yield cluster
    cluster.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def recipe(tmp_path, prepared_data) -> Path:
    """tests/pretrain's tiny recipe; a global batch of 512 tokens divides over 1, 2 and 4 ranks."""
    tree = json.loads(json.dumps(pretrain_helpers.TEST_RECIPE))
    tree["data"]["path"] = str(prepared_data)
    tree["runs_dir"] = str(tmp_path / "runs")
    tree["train"]["global_batch_tokens"] = 512
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def job_env(slurm, monkeypatch):
    """The environment of a user submitting jobs: SLURM_CONF of the test cluster, one thread per rank."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return dict(os.environ)


def start_local(recipe: Path, nproc: int, *overrides: str, log: Path) -> subprocess.Popen:
    """launch/local.sh in the background (the same-layout reference for a SLURM run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(["bash", str(REPO / "launch" / "local.sh"), "--nproc-per-node", str(nproc),
                                 "--config", str(recipe), *overrides], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    code = process.wait(timeout=timeout)
    assert code == 0, f"exit {code}:\n{log.read_text()[-4000:]}"


def job_log(path: Path) -> str:
    return path.read_text() if path.exists() else f"(no log at {path})"
