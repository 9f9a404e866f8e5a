"""The scaling harness on the real test SLURM cluster, submitting through launch/slurm: a throttled
array of two ladder mains, one of them failing (its run directory locked by another owner), the
dependent array of cooldown branches forked from the mains' checkpoints (the failed main's branch
fails too), and a second `launch` that resubmits exactly the failed main and its branch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.runlock import acquire_run_lock
from pretrain.scaling.launch import Registry, launch_slurm, sync_slurm_registry

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_scaling_arrays_requeue_and_dependent_cooldowns(slurm, job_env, prepared_data, tmp_path):
    base = {"model": {"vocab_size": 4096, "hidden_size": 16, "num_layers": 1, "num_heads": 1,
                      "feedback_impl": "chunked", "feedback_chunk_size": 16},
            "train": {"micro_batch_size": 4, "seed": 7}, "data": {"path": str(prepared_data), "num_workers": 0},
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
    lock = acquire_run_lock(flaky)  # this process owns the run: its task exits 4 before training
    options = ["--gpus-per-node", "0", "--cpus-per-rank", "1", "--launcher", "srun"]
    jobs = launch_slurm(sweep, max_attempts=3, throttle=1, launch_args=options)
    assert set(jobs) == {"mains", "branches"}
    assert slurm.jobs(jobs["branches"])[0]["Dependency"].startswith(f"afterany:{jobs['mains']}")
    with pytest.raises(RuntimeError, match="still queued or running"):
        launch_slurm(sweep, max_attempts=3, launch_args=options)
    for job in jobs.values():
        slurm.wait(job, timeout=600)
    lock.release()
    logs = lambda: "".join(path.read_text() for path in (sweep / "slurm").glob("scaling-*.out"))
    sync_slurm_registry(sweep, max_attempts=3)
    statuses = {e["name"]: (e["status"], e["attempts"]) for e in Registry(sweep).entries.values()}
    flaky_branch = next(p["name"] for p in plan if p["fork_of"] == mains[0]["name"])
    assert statuses[mains[0]["name"]] == statuses[flaky_branch] == ("failed", 1), statuses
    assert [s for name, s in statuses.items() if name not in (mains[0]["name"], flaky_branch)] == [("done", 1)] * 2
    assert "cannot start: the run lock belongs to process" in logs() and "the checkpoint to start from" in logs()

    again = launch_slurm(sweep, max_attempts=3, throttle=1, launch_args=options)  # the failed two only
    assert (sweep / "slurm" / "mains.txt").read_text().strip().endswith(f"{mains[0]['name']}.yaml")
    for job in again.values():
        slurm.wait(job, timeout=600)
    sync_slurm_registry(sweep, max_attempts=3)
    statuses = {e["name"]: (e["status"], e["attempts"]) for e in Registry(sweep).entries.values()}
    assert statuses[mains[0]["name"]] == statuses[flaky_branch] == ("done", 2), statuses
    assert all(status == "done" for status, _ in statuses.values()), statuses
    for branch in (p for p in plan if p["fork_of"]):
        assert f"resumed from {sweep / 'runs' / branch['name'] / 'checkpoints'}" in logs()
    assert launch_slurm(sweep, max_attempts=3, launch_args=options) == {}  # nothing left to submit
