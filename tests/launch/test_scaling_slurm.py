"""The scaling harness on the real test SLURM cluster: a throttled array of two ladder mains, one of
them failing once (its run directory locked by another owner) and requeueing itself, and the
dependent array of cooldown branches forked from the mains' checkpoints."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pretrain.runlock import acquire_run_lock
from pretrain.scaling.launch import Registry, launch_slurm, sync_slurm_registry

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_scaling_arrays_requeue_and_dependent_cooldowns(slurm, job_env, launch_data, tmp_path):
    base = {"model": {"vocab_size": 4096, "hidden_size": 16, "num_layers": 1, "num_heads": 1,
                      "feedback_impl": "chunked", "feedback_chunk_size": 16},
            "train": {"micro_batch_size": 4, "seed": 7}, "data": {"path": str(launch_data), "num_workers": 0},
            "logging": {"interval": 5, "wandb": "disabled", "progress_bar": False}, "eval": {"batches": 2}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "pretrain.scaling", "plan", "--base", str(tmp_path / "base.yaml"),
                           "--mode", "ladder", "--widths", "16", "32", "--ratios", "0.05", "0.1", "--archs", "sessa",
                           "--seq-len", "64", "--head-size", "16", "--aspect", "16", "--micro-batch", "4",
                           "--out", str(sweep)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((sweep / "plan.json").read_text())["points"]
    mains = [p for p in plan if not p["fork_of"]]
    assert len(mains) == 2 and len(plan) == 4
    flaky = sweep / "runs" / mains[0]["name"]
    flaky.mkdir(parents=True)
    lock = acquire_run_lock(flaky)  # this process owns the run: the first attempt exits 4
    jobs = launch_slurm(sweep, max_attempts=3, throttle=1)
    assert set(jobs) == {"mains", "branches"}
    assert "--array=0-1%1" in (sweep / "slurm" / "mains.sbatch").read_text()
    assert slurm.jobs(jobs["branches"])[0]["Dependency"].startswith(f"afterany:{jobs['mains']}")
    deadline = time.time() + 300
    while not (flaky / "exit_code").exists():
        assert time.time() < deadline, "the locked task never ran"
        time.sleep(1)
    assert (flaky / "exit_code").read_text().strip() == "4"
    lock.release()
    slurm.wait(jobs["mains"], timeout=600)
    slurm.wait(jobs["branches"], timeout=600)
    sync_slurm_registry(sweep, max_attempts=3)
    registry = Registry(sweep)
    statuses = {e["name"]: (e["status"], e["attempts"]) for e in registry.entries.values()}
    assert statuses[mains[0]["name"]] == ("done", 2), statuses  # failed once, requeued, finished
    assert all(status == "done" for status, _ in statuses.values()), statuses
    for branch in (p for p in plan if p["fork_of"]):
        logs = "".join(path.read_text() for path in (sweep / "slurm").glob("scaling-branches-*.out"))
        assert f"resumed from {sweep / 'runs' / branch['name'] / 'checkpoints'}" in logs
    assert launch_slurm(sweep, max_attempts=3) == {}  # nothing left to submit
