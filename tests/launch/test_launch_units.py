"""The launch pieces that need no SLURM: run resolution, sweeps, the resume decision, the run lock,
rank variables from SLURM_*, the submit helper's checks and sbatch arguments, launch/local.sh."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, pretrain_helpers, read_metrics

from launch.slurm.__main__ import build_submission, parse_args, parse_time
from launch.slurm.job import BadInput, decide, latest_step, resolve_run, split_train_args, sweep_entry
from launch.slurm.job import main as job_command
from pretrain.distributed import torch_env_from_slurm
from pretrain.runlock import (LOCK_NAME, RunLock, RunLockedError, acquire_for_training, acquire_run_lock,
                              current_owner)
from pretrain.watchdog import HANG_EXIT_CODE


@pytest.fixture
def bare_recipe(tmp_path):
    """The test recipe without run_name, runs_dir and train.max_steps: pretrain.config's defaults apply."""
    tree = json.loads(json.dumps(pretrain_helpers.TEST_RECIPE))
    del tree["run_name"], tree["train"]["max_steps"]
    path = tmp_path / "bare.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("overrides", [[], ["--run_name", "x", "--runs_dir=/tmp/elsewhere", "--train.max_steps", "7"],
                                       ["--train.max_steps=12", "--run_name=y"]], ids=["defaults", "spaced", "equals"])
def test_resolve_run_agrees_with_pretrain_config(bare_recipe, overrides):
    from pretrain.config import load_config

    config = load_config(bare_recipe, list(overrides))
    assert resolve_run(["--config", str(bare_recipe), *overrides]) == (config.run_dir, config.train.max_steps)
    assert resolve_run([*overrides, f"--config={bare_recipe}"]) == (config.run_dir, config.train.max_steps)


def test_train_args_and_sweep_files(tmp_path):
    assert split_train_args(["--a.b", "1", "--config", "c.yaml"]) == ("c.yaml", ["--a.b", "1"])
    with pytest.raises(BadInput, match="no --config"):
        split_train_args(["--a.b", "1"])
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# comment\n\na.yaml --run_name a --optim.lr 1e-3  # first\n--config b.yaml --run_name 'b c'\n")
    assert sweep_entry(sweep, 0, ["--train.max_steps", "5"]) == [
        "--config", "a.yaml", "--train.max_steps", "5", "--run_name", "a", "--optim.lr", "1e-3"]
    assert sweep_entry(sweep, 1, []) == ["--config", "b.yaml", "--run_name", "b c"]
    with pytest.raises(BadInput, match="outside the 2 runs"):
        sweep_entry(sweep, 2, [])
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(BadInput, match="lists no runs"):
        sweep_entry(tmp_path / "empty.txt", 0, [])


def _checkpoint(run_dir, step, pointer=None):
    (run_dir / "checkpoints" / f"iter_{step:07d}").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "latest").write_text(f"{pointer if pointer is not None else step}\n")


def test_latest_step_and_the_decision_after_an_attempt(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    assert latest_step(run_dir) == 0
    _checkpoint(run_dir, 4, pointer=9)  # `latest` naming a missing checkpoint does not count
    assert latest_step(run_dir) == 0
    _checkpoint(run_dir, 4)
    assert latest_step(run_dir) == 4
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert decide(run_dir, 10, 0, requeue=True, max_restarts=3) == "requeue"
    assert decide(run_dir, 10, 0, requeue=False, max_restarts=3) == "stopped"  # chain mode
    assert decide(run_dir, 10, 4, requeue=True, max_restarts=3) == "failed"  # no progress: never requeue
    assert decide(run_dir, 4, 0, requeue=True, max_restarts=3) == "done"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert decide(run_dir, 10, 0, requeue=True, max_restarts=3) == "stopped"


def test_the_end_of_an_attempt_requeues_a_hang_like_a_clean_stop(tmp_path, monkeypatch, capsys):
    """Ranks ended by the hang watchdog's exit status (pretrain/watchdog.py) after this attempt advanced
    `latest`: requeued, the lock kept for the requeued job; with no progress: failed, the lock released."""
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 4)
    acquire_run_lock(run_dir, "slurm:1")
    end = ["end", "--rc", str(HANG_EXIT_CODE), "--run-dir", str(run_dir), "--max-steps", "10", "--owner", "slurm:1",
           "--requeue"]
    assert job_command([*end, "--start-step", "0"]) == 0
    assert capsys.readouterr().out == "requeue\n" and (run_dir / LOCK_NAME).exists()
    assert job_command([*end, "--start-step", "4"]) == 0
    assert capsys.readouterr().out == "failed\n" and not (run_dir / LOCK_NAME).exists()


def test_run_lock(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SESSA_RUN_LOCK_OWNER", raising=False)
    run_dir = tmp_path / "run"
    lock = acquire_run_lock(run_dir)
    assert lock.owner == current_owner() and json.loads((run_dir / LOCK_NAME).read_text())["owner"] == lock.owner
    assert acquire_run_lock(run_dir).owner == lock.owner  # the owner re-enters (a requeued job)

    child = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(RunLockedError, match=f"in use by pid:.*:{os.getpid()}:"):
            acquire_run_lock(run_dir, current_owner(child.pid))
        monkeypatch.setenv("SESSA_RUN_LOCK_OWNER", lock.owner)  # a trainer under its launcher
        assert acquire_run_lock(run_dir).owner == lock.owner
        monkeypatch.delenv("SESSA_RUN_LOCK_OWNER")
        RunLock(run_dir / LOCK_NAME, "pid:someone:1:1").release()  # not ours: stays
        assert (run_dir / LOCK_NAME).exists()
        lock.release()
        assert not (run_dir / LOCK_NAME).exists()
        held = acquire_run_lock(run_dir, current_owner(child.pid))
    finally:
        child.kill()
        child.wait()
    taken = acquire_run_lock(run_dir)  # the owner is gone: stale, taken over
    assert json.loads((run_dir / LOCK_NAME).read_text())["previous_owner"] == held.owner
    taken.release()

    (run_dir / LOCK_NAME).write_text(json.dumps({"owner": "slurm:123"}))
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here: cannot tell, so refuse
    with pytest.raises(RunLockedError, match="scontrol is not available"):
        acquire_run_lock(run_dir)


def test_trainer_hook_takes_the_lock_for_all_ranks(tmp_path, monkeypatch):
    """acquire_for_training inside a (one-rank, gloo) process group: the decision is broadcast."""
    import torch.distributed as dist

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("SESSA_RUN_LOCK_OWNER", "pid:launcher:1:1")
    owns_group = not dist.is_initialized()  # other tests in this process may have made one
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        child = subprocess.Popen(["sleep", "60"])
        try:
            acquire_run_lock(tmp_path / "busy", current_owner(child.pid))
            with pytest.raises(RunLockedError, match=f"in use by pid:.*:{child.pid}:"):
                acquire_for_training(tmp_path / "busy")
        finally:
            child.kill()
            child.wait()
        (tmp_path / "ours").mkdir()
        (tmp_path / "ours" / LOCK_NAME).write_text(json.dumps({"owner": "pid:launcher:1:1"}))
        assert acquire_for_training(tmp_path / "ours").reentered  # the launcher's: left to the launcher
    finally:
        if owns_group:
            dist.destroy_process_group()


def test_rank_variables_from_slurm():
    assert torch_env_from_slurm({}) == {}
    step = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "20123",
            "MASTER_ADDR": "n1"}
    assert torch_env_from_slurm(step) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "20123"}
    assert torch_env_from_slurm({**step, "RANK": "0"}) == {}  # torchrun set them
    single = {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert torch_env_from_slurm(single) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    batch_script = {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "5"}  # no step: plain process
    assert torch_env_from_slurm(batch_script) == {}


def test_parse_time():
    assert [parse_time(t) for t in ("5", "5:30", "1:00:00", "2-3", "1-00:30", "1-1:1:1")] == [
        300, 330, 3600, 183600, 88200, 90061]
    with pytest.raises(BadInput):
        parse_time("1h")


def test_submit_helper_checks_and_sbatch_arguments(recipe, tmp_path):
    def build(*argv):
        return build_submission(*parse_args(["--logs", str(tmp_path / "logs"), "--gpus-per-node", "0", *argv]))

    args, env = build("--nodes", "2", "--gpus-per-node", "2", "--time", "4:00:00", "--partition", "gpu",
                      "--config", str(recipe), "--train.max_steps", "5")
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=6", "--gpus-per-node=2", "--time=4:00:00",
            "--partition=gpu", "--signal=B:USR1@300", "--requeue", "--job-name=test"} <= set(args)
    assert env["SESSA_LAUNCH"] == "torchrun" and env["SESSA_RANKS_PER_NODE"] == "2" and env["SESSA_REQUEUE"] == "1"
    args, env = build("--launcher", "srun", "--ranks-per-node", "2", "--chain", "3", "--config", str(recipe))
    assert {"--ntasks-per-node=2", "--cpus-per-task=3", "--no-requeue"} <= set(args) and env["SESSA_REQUEUE"] == "0"
    with pytest.raises(BadInput, match="not a multiple of micro_batch_size x seq_len x data-parallel size = 768"):
        build("--gpus-per-node", "0", "--ranks-per-node", "6", "--config", str(recipe))
    with pytest.raises(BadInput, match="3 ranks do not divide by parallel.tensor x parallel.pipeline x parallel.context = 2"):
        build("--gpus-per-node", "0", "--ranks-per-node", "3", "--config", str(recipe), "--parallel.pipeline", "2")
    with pytest.raises(BadInput, match="unknown field"):
        build("--config", str(recipe), "--train.max_stepz", "5")
    with pytest.raises(BadInput, match="not longer than --signal-lead"):
        build("--time", "5", "--config", str(recipe))
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(f"{recipe} --optim.lr 1e-2\n{recipe} --optim.lr 3e-3\n")
    with pytest.raises(BadInput, match="share a run directory"):
        build("--sweep", str(sweep))
    sweep.write_text(f"{recipe} --run_name a\n{recipe} --run_name b\n")
    args, env = build("--sweep", str(sweep), "--max-parallel", "1")
    assert "--array=0-1%1" in args and env["SESSA_SWEEP"] == str(sweep)


def _local(recipe, *overrides):
    return subprocess.Popen(["bash", str(REPO / "launch" / "local.sh"), "--nproc-per-node", "1", "--config",
                             str(recipe), *overrides], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_local_launcher_refuses_finished_and_locked_runs(recipe, tmp_path):
    run_dir = tmp_path / "runs" / "test"
    _checkpoint(run_dir, 10)
    process = _local(recipe)
    out = process.communicate(timeout=60)[0]
    assert process.returncode == 3 and "already reached step 10 of 10" in out
    lock = acquire_run_lock(run_dir, current_owner())  # this live process owns the run
    process = _local(recipe, "--train.max_steps", "20")
    out = process.communicate(timeout=60)[0]
    assert process.returncode == 4 and f"in use by {lock.owner}" in out


@pytest.mark.slow
def test_local_launcher_stops_cleanly_on_sigterm(recipe, tmp_path):
    """SIGTERM to launch/local.sh reaches the rank (not its loader workers or checkpoint writers): it
    saves and exits, the script exits 0 and releases the lock; the same command would resume."""
    run_dir = tmp_path / "runs" / "test"
    process = _local(recipe, "--train.max_steps", "400", "--checkpoint.interval_steps", "1")
    deadline = time.time() + 120
    while max(read_metrics(run_dir), default=0) < 2:
        assert process.poll() is None and time.time() < deadline, process.stdout.read()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # most likely during one of the per-step saves
    out = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "received SIGTERM" in out and "run stopped" in out, out[-3000:]
    stopped = int((run_dir / "checkpoints" / "latest").read_text())
    assert 2 <= stopped < 400 and not (run_dir / LOCK_NAME).exists()
    (record,) = [json.loads(p.read_text()) for p in (run_dir / "launches").glob("*.json")]
    assert record["decision"] == "stopped" and record["reached_step"] == stopped and record["launcher"] == "local"


def test_submit_helper_takes_resources_from_the_recipe_launch_section(recipe, tmp_path, monkeypatch):
    """Resources: flag, else the recipe's launch: section, else the default; GPUs per node default
    to what SLURM reports (no SLURM here, no nvidia-smi: 0, so no --gpus-per-node=8 on CPU nodes)."""
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-slurm.conf"))  # sinfo fails: no cluster
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "nvidia-smi").exists()))

    def build(path, *argv):
        return build_submission(*parse_args(["--logs", str(tmp_path / "logs"), "--config", str(path), *argv]))

    args, env = build(recipe)
    assert "--nodes=1" in args and not any(a.startswith(("--gpus-per-node", "--time", "--partition")) for a in args)
    assert env["SESSA_RANKS_PER_NODE"] == "1" and env["SESSA_TERM_GRACE_S"] == "20"
    tree = yaml.safe_load(recipe.read_text())
    tree["launch"] = {"nodes": 2, "gpus_per_node": 2, "time": "30:00", "partition": "cpu", "account": "proj",
                      "term_grace_s": 12}
    with_launch = tmp_path / "with_launch.yaml"
    with_launch.write_text(yaml.safe_dump(tree))
    args, env = build(with_launch)
    assert {"--nodes=2", "--gpus-per-node=2", "--time=30:00", "--partition=cpu", "--account=proj"} <= set(args)
    assert env["SESSA_RANKS_PER_NODE"] == "2" and env["SESSA_TERM_GRACE_S"] == "12"
    args, env = build(with_launch, "--nodes", "1", "--gpus-per-node", "0", "--time", "1:00:00", "--term-grace", "5")
    assert {"--nodes=1", "--time=1:00:00", "--partition=cpu"} <= set(args)
    assert not any(a.startswith("--gpus-per-node") for a in args) and env["SESSA_TERM_GRACE_S"] == "5"
    args, _ = build(with_launch, "--launch.nodes", "4", "--ranks-per-node", "1")  # an override is the recipe's
    assert "--nodes=4" in args
    with_launch.write_text(with_launch.read_text().replace("'30:00'", "30:00"))  # YAML: 1800 (seconds)
    with pytest.raises(BadInput, match="launch.time must be a quoted SLURM time"):
        build(with_launch)
    with pytest.raises(BadInput, match="launch.time '1h' is not a SLURM time"):
        build(recipe, "--launch.time", "1h")
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(f"{recipe} --run_name a --launch.nodes 2\n{recipe} --run_name b\n")
    with pytest.raises(BadInput, match=r"different launch.nodes \(1, 2\).*give --nodes"):
        build_submission(*parse_args(["--logs", str(tmp_path / "logs"), "--sweep", str(sweep)]))
    args, _ = build_submission(*parse_args(["--logs", str(tmp_path / "logs"), "--sweep", str(sweep), "--nodes", "2"]))
    assert "--nodes=2" in args


def test_gpus_per_node_from_sinfo_gres():
    from launch.slurm.__main__ import _gres_gpus

    assert [_gres_gpus(g) for g in ("gpu:8", "gpu:h100:4(S:0-1),shard:8", "(null)", "shard:2,gpu:a100:2(S:0,1)",
                                    "mps:100")] == [8, 4, 0, 2, 0]


def test_slurm_daemons_are_found_in_sbin_when_path_lacks_it(tmp_path):
    """Debian puts slurmctld, slurmd and munged in /usr/sbin; a restricted PATH without it must not read
    as "not installed": the lookup also searches the sbin directories and names those PATH lacks."""
    from slurm_cluster import BINARIES, missing_binaries

    sbin, bin_dir, empty = tmp_path / "sbin", tmp_path / "bin", tmp_path / "empty"
    for folder in (sbin, bin_dir, empty):
        folder.mkdir()
    daemons = {"slurmctld", "slurmd", "munged"}
    for name in BINARIES:
        tool = (sbin if name in daemons else bin_dir) / name
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    restricted = os.pathsep.join([str(empty), str(bin_dir)])
    assert missing_binaries(restricted, sbin_dirs=(str(sbin),)) == ([], [str(sbin)])
    assert missing_binaries(os.pathsep.join([restricted, str(sbin)]), sbin_dirs=(str(sbin),)) == ([], [])
    missing, _ = missing_binaries(restricted, sbin_dirs=(str(empty),))
    assert sorted(missing) == sorted(daemons)
