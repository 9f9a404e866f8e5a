"""Shared fixtures: the tiny test recipe and helpers that launch the real trainer."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

TEST_RECIPE = {
    "run_name": "test",
    "model": {"vocab_size": 4096, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "feedback_impl": "chunked", "feedback_chunk_size": 16},
    "train": {"max_steps": 10, "global_batch_tokens": 256, "micro_batch_size": 2, "seed": 7},
    "data": {"num_workers": 2},
    "optim": {"lr": 3.0e-3, "min_lr": 3.0e-4},
    "schedule": {"warmup_steps": 2},
    "checkpoint": {"interval_steps": 0, "keep_last": 5},
    "logging": {"interval": 1, "wandb": "disabled", "progress_bar": False},
    "eval": {"interval": 0, "batches": 1, "sample_tokens": 0},
}


@pytest.fixture
def recipe(tmp_path, prepared_data) -> Path:
    """TEST_RECIPE on tests/conftest.py's session dataset."""
    tree = json.loads(json.dumps(TEST_RECIPE))
    tree["data"]["path"] = str(prepared_data)
    tree["runs_dir"] = str(tmp_path / "runs")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_command(recipe: Path, *overrides: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        launcher = [sys.executable, "-m", "pretrain"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                    "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "pretrain"]
    return [*launcher, "--config", str(recipe), *overrides]


def pretrain_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_pretrain(recipe: Path, *overrides: str, nproc: int = 1, expect_ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(pretrain_command(recipe, *overrides, nproc=nproc), cwd=REPO, env=pretrain_env(),
                          capture_output=True, text=True, timeout=900)
    if expect_ok and done.returncode != 0:
        raise AssertionError(f"pretrain failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def start_pretrain(recipe: Path, *overrides: str, nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(pretrain_command(recipe, *overrides, nproc=nproc), cwd=REPO, env=pretrain_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_launch(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to a launch started by start_pretrain and to every rank's process group, then reap it.
    torchrun starts each rank in a session of its own, so killing torchrun's group alone leaves the
    ranks training (and saving) after a "crash"."""
    children = psutil.Process(process.pid).children(recursive=True)
    for pid in {process.pid} | {child.pid for child in children}:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), sig)
    process.wait()
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"still running after the kill: {alive}"


def read_metrics(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """step -> value; a step logged twice (before a crash and after the resume) keeps its last value."""
    values = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if key in record:
                values[record["step"]] = record[key]
    return values
