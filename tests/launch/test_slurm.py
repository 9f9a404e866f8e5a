"""launch/slurm on a real SLURM cluster (tests/launch/slurm_cluster.py): multi-node training in both
launch modes, time-limit signal + requeue + exact resume, SIGTERM, a hung rank + requeue + exact resume,
run lock, afterany chains, job arrays, a corpus prepared as an array of parts and merged."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, finish, job_log, read_metrics, start_local
from slurm_cluster import ENDED, SBIN_DIRS, ensure_installed

from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import prepare
from launch.slurm.__main__ import build_prepare_submission, build_submission, parse_args, submit
from launch.slurm.job import BadInput
from pretrain.distributed import torch_env_from_slurm
from pretrain.loop import TEST_DATA_DELAY_ENV
from pretrain.runlock import LOCK_NAME, RunLockedError, acquire_run_lock

pytestmark = pytest.mark.slow
_spec = importlib.util.spec_from_file_location("dp_helpers", REPO / "tests" / "data_pipeline" / "dp_helpers.py")
dp_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dp_helpers)


def helper(tmp_path, *argv: str) -> list[str]:
    """`python -m launch.slurm ARGV` in this process (the recipe check imports torch once, not per call)."""
    opts, train_args = parse_args(["--gpus-per-node", "0", "--cpus-per-rank", "1", "--logs", str(tmp_path / "logs"),
                                   *argv])
    return submit(opts, train_args)


def test_two_nodes_both_launchers_match_local_torchrun(slurm, job_env, recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # jobs run in the submit directory, not the repository
    local_log = tmp_path / "local.log"
    local = start_local(recipe, 4, "--run_name", "local4", log=local_log)
    # srun mode through the helper: 2 nodes x 2 srun tasks, ranks from SLURM_PROCID/NTASKS/LOCALID.
    (srun_job,) = helper(tmp_path, "--nodes", "2", "--ranks-per-node", "2", "--launcher", "srun",
                         "--config", str(recipe), "--run_name", "srun22")
    # torchrun mode by plain sbatch, as documented for users without the helper.
    sbatch = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2",
         f"--output={tmp_path / 'logs' / '%x-%j.out'}", str(REPO / "launch" / "slurm" / "pretrain.sbatch"),
         "--config", str(recipe), "--run_name", "torchrun22"],
        env={**job_env, "SESSA_REPO": str(REPO), "SESSA_RANKS_PER_NODE": "2"}, capture_output=True, text=True)
    assert sbatch.returncode == 0, sbatch.stderr
    torchrun_job = sbatch.stdout.strip()

    finish(local, local_log)
    reference = read_metrics(tmp_path / "runs" / "local4")
    assert sorted(reference) == list(range(1, 11))
    for job, run, log_name in ((srun_job, "srun22", "srun22"), (torchrun_job, "torchrun22", "sessa-pretrain")):
        (record,) = slurm.wait(job, timeout=300)
        log = job_log(tmp_path / "logs" / f"{log_name}-{job}.out")
        assert record["JobState"] == "COMPLETED", log[-4000:]
        assert len(slurm.run("scontrol", "show", "hostnames", record["NodeList"]).stdout.split()) == 2
        assert "world 4 (TP 1 x PP 1 x DP 4)" in log
        run_dir = tmp_path / "runs" / run
        assert read_metrics(run_dir) == reference, run
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "10"
        assert not (run_dir / "RUN_LOCK").exists()  # released when the run is done
        (launch,) = [json.loads(p.read_text()) for p in (run_dir / "launches").glob("*.json")]
        assert launch["slurm"]["SLURM_JOB_ID"] == job and launch["decision"] == "done"
        assert len(launch["git"]["commit"]) == 40 and launch["train_args"][:2] == ["--config", str(recipe)]
        assert (run_dir / "config.yaml").exists()


def test_time_limit_signal_requeues_and_resumes_exactly(slurm, job_env, recipe, tmp_path, monkeypatch):
    """--time 1 with a 45 s signal lead: SLURM warns the batch script at its first time-limit check
    (every 30 s, so 0-30 s into the job, often while the ranks still import); the script signals
    each rank once it can catch the signal (retrying every 2 s here); the ranks save and exit; the
    job requeues itself and resumes. The requeued job gets 10 minutes so that the test ends after
    one requeue; the loss curve must equal an uninterrupted run's at every step."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SESSA_RESIGNAL_S", "2")
    steps = 200
    common = ("--train.max_steps", str(steps), "--logging.interval", "1", "--checkpoint.keep_last", "2")
    local_log = tmp_path / "local.log"
    local = start_local(recipe, 2, "--run_name", "straight", *common, log=local_log)
    # The job's steps are held to >= 0.3 s (rank 0 waits 0.15 s for each of its 2 micro-batches; the
    # numbers are untouched), so it outlasts the warning (<= 45 s in) however fast the machine: on an
    # idle one the 200 steps had finished before SLURM's first time-limit check.
    monkeypatch.setenv(TEST_DATA_DELAY_ENV, "0:0.15")
    (job,) = helper(tmp_path, "--nodes", "2", "--ranks-per-node", "1", "--time", "1", "--signal-lead", "45",
                    "--config", str(recipe), "--run_name", "preempted", *common)
    log_path = tmp_path / "logs" / f"preempted-{job}.out"

    # While it runs, a second job on the same run directory must refuse to start.
    deadline = time.time() + 120
    while not (tmp_path / "runs" / "preempted" / "RUN_LOCK").exists():
        assert time.time() < deadline, job_log(log_path)[-3000:]
        time.sleep(0.5)
    (intruder,) = helper(tmp_path, "--nodes", "1", "--ranks-per-node", "1", "--launcher", "srun",
                         "--job-name", "intruder", "--config", str(recipe), "--run_name", "preempted", *common)
    (intruder_record,) = slurm.wait(intruder, timeout=120)
    intruder_log = job_log(tmp_path / "logs" / f"intruder-{intruder}.out")
    assert intruder_record["JobState"] == "FAILED" and intruder_record["ExitCode"] == "4:0", intruder_log
    assert f"is in use by slurm:{job} " in intruder_log

    deadline = time.time() + 180
    while "run requeue" not in job_log(log_path):
        state = slurm.jobs(job)[0]["JobState"]
        assert state not in ENDED, f"the job ended ({state}) without a requeue (if it finished before the warning, " \
                                   f"raise `steps`):\n{job_log(log_path)[-5000:]}"
        assert time.time() < deadline, job_log(log_path)[-5000:]
        time.sleep(0.5)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    finish(local, local_log)
    (record,) = slurm.wait(job, timeout=420)
    log = job_log(log_path)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log[-5000:]
    assert "time-limit warning" in log and "received SIGUSR1" in log and "resumed from" in log
    run_dir = tmp_path / "runs" / "preempted"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == str(steps)
    first, second = sorted((json.loads(p.read_text()) for p in (run_dir / "launches").glob("*.json")),
                           key=lambda r: r["restart"])
    assert (first["decision"], second["decision"]) == ("requeue", "done")
    assert 0 < first["reached_step"] == second["start_step"] < steps
    reference, resumed = read_metrics(tmp_path / "runs" / "straight"), read_metrics(run_dir)
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed == reference  # every step, including those after the resume, bitwise


def test_afterany_chain_without_requeue(slurm, job_env, recipe, tmp_path, monkeypatch):
    """Chain mode: job 1 gets the time-limit warning early (SIGUSR1 to its batch script, as
    --signal=B:USR1 sends it), stops and ends without requeue; job 2 (afterany) resumes and
    finishes; job 3 finds the run complete."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SESSA_RESIGNAL_S", "1")  # the tiny run may start and finish within the default 10 s
    jobs = helper(tmp_path, "--chain", "3", "--launcher", "srun", "--config", str(recipe), "--run_name", "chained",
                  "--train.max_steps", "40")
    run_dir = tmp_path / "runs" / "chained"
    deadline = time.time() + 180
    while not (run_dir / "RUN_LOCK").exists():  # job 1 is starting its ranks
        assert time.time() < deadline, job_log(tmp_path / "logs" / f"chained-{jobs[0]}.out")
        time.sleep(0.2)
    slurm.run("scancel", "--batch", "--signal=USR1", jobs[0])
    records = [slurm.wait(job, timeout=240)[0] for job in jobs]
    logs = [job_log(tmp_path / "logs" / f"chained-{job}.out") for job in jobs]
    assert [r["JobState"] for r in records] == ["COMPLETED"] * 3, logs
    assert [r["Restarts"] for r in records] == ["0"] * 3
    assert records[0]["EndTime"] <= records[1]["StartTime"] and records[1]["EndTime"] <= records[2]["StartTime"]
    assert "time-limit warning" in logs[0] and "received SIGUSR1" in logs[0] and "run stopped" in logs[0]
    assert "resumed from" in logs[1] and "run done" in logs[1]
    assert "already reached step 40 of 40: nothing to do" in logs[2] and "step 1 " not in logs[2]
    assert sorted(read_metrics(run_dir)) == list(range(1, 41))


def test_job_array_sweep_runs_every_line(slurm, job_env, recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(f"# lr sweep\n{recipe} --run_name lr_high --optim.lr 3e-3\n\n"
                     f"{recipe} --run_name lr_low --optim.lr 3e-4 --optim.min_lr 3e-5\n")
    # No --gpus-per-node: the helper asks sinfo (these nodes have no GPUs) instead of requesting 8.
    done = subprocess.run([sys.executable, "-m", "launch.slurm", "--cpus-per-rank", "1",
                           "--launcher", "srun", "--logs", str(tmp_path / "logs"), "--sweep", str(sweep),
                           "--train.max_steps", "4"], cwd=tmp_path, capture_output=True, text=True,
                          env={**job_env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "launch: 0 GPU(s) per node (sinfo GRES of partition (default)" in done.stderr
    array_job = done.stdout.strip()
    records = slurm.wait(array_job, timeout=240)
    logs = {r["ArrayTaskId"]: job_log(tmp_path / "logs" / f"sweep-sweep-{array_job}_{r['ArrayTaskId']}.out")
            for r in records}
    assert sorted(logs) == ["0", "1"] and all(r["JobState"] == "COMPLETED" for r in records), logs
    high, low = (read_metrics(tmp_path / "runs" / name) for name in ("lr_high", "lr_low"))
    assert sorted(high) == sorted(low) == [1, 2, 3, 4]
    assert high[1] == low[1] and high[4] < low[4]  # same start, the larger lr falls faster
    for index, name, lr in (("0", "lr_high", "3e-3"), ("1", "lr_low", "3e-4")):
        (launch,) = [json.loads(p.read_text()) for p in (tmp_path / "runs" / name / "launches").glob("*.json")]
        assert launch["slurm"]["SLURM_ARRAY_JOB_ID"] == array_job and launch["slurm"]["SLURM_ARRAY_TASK_ID"] == index
        assert launch["train_args"][:4] == ["--config", str(recipe), "--train.max_steps", "4"]  # common first
        assert launch["train_args"][4:8] == ["--run_name", name, "--optim.lr", lr]


def test_run_lock_owner_state_and_master_address_from_slurm(slurm, job_env, tmp_path):
    """A lock held by a live SLURM job blocks; one held by an ended or unknown job is stale. Rank 0's
    node comes from `scontrol show hostnames` of the step's node list."""
    sbatch = ("sbatch", "--parsable", f"--output={tmp_path / '%j.out'}")
    ended = slurm.run(*sbatch, "--wrap", "true").stdout.strip()
    running = slurm.run(*sbatch, "--wrap", "sleep 300").stdout.strip()
    try:
        slurm.wait(ended, timeout=60)
        deadline = time.time() + 60
        while slurm.jobs(running)[0]["JobState"] != "RUNNING":
            assert time.time() < deadline
            time.sleep(0.5)
        lock = tmp_path / "run" / LOCK_NAME
        lock.parent.mkdir()
        for owner, live in ((running, True), (ended, False), ("999999", False)):
            lock.write_text(json.dumps({"owner": f"slurm:{owner}"}))
            if live:
                with pytest.raises(RunLockedError, match=f"in use by slurm:{owner} "):
                    acquire_run_lock(lock.parent, "slurm:1")
            else:
                acquire_run_lock(lock.parent, "slurm:1")
                assert json.loads(lock.read_text())["previous_owner"] == f"slurm:{owner}"
    finally:
        slurm.run("scancel", running)
    step = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
            "SLURM_STEP_NODELIST": "n[3-4]"}
    assert torch_env_from_slurm(step)["MASTER_ADDR"] == "n3"


def test_installed_daemons_found_with_a_path_lacking_sbin(slurm, monkeypatch):
    """The cluster fixture installed SLURM; a PATH without the sbin directories still finds the daemons."""
    restricted = [d for d in os.environ["PATH"].split(os.pathsep) if d.rstrip("/") not in SBIN_DIRS]
    monkeypatch.setenv("PATH", os.pathsep.join(restricted))
    extra_dirs = ensure_installed()  # raises "installed ... but ... are still missing" if the lookup fails
    assert any(os.access(os.path.join(d, "slurmctld"), os.X_OK) for d in extra_dirs), extra_dirs


def test_submit_helper_refuses_more_cpus_than_the_nodes_have(slurm, job_env, recipe, tmp_path):
    """The test nodes have 2 CPUs (sinfo). The recipe's data.num_workers 2 asks 3 CPUs per rank: refused
    before sbatch, naming the cause; a request that fits is built."""
    def build(*argv):
        return build_submission(*parse_args(["--logs", str(tmp_path / "logs"), "--gpus-per-node", "0", *argv,
                                             "--config", str(recipe)]))

    with pytest.raises(BadInput, match=r"1 rank\(s\) per node x 3 CPUs per rank \(data.num_workers \+ 1\) = 3 CPUs, "
                                       r"but the nodes of partition \(default\) have 2 \(sinfo\)"):
        build("--ranks-per-node", "1")
    with pytest.raises(BadInput, match=r"2 rank\(s\) per node x 2 CPUs per rank \(--cpus-per-rank\) = 4 CPUs"):
        build("--ranks-per-node", "2", "--cpus-per-rank", "2")
    args, _ = build("--ranks-per-node", "1", "--data.num_workers", "1")
    assert "--cpus-per-task=2" in args


@pytest.mark.parametrize("launcher,scope", [("torchrun", "--full"), ("srun", "--full"), ("torchrun", "steps")])
def test_sigterm_saves_within_grace_and_requeues(slurm, job_env, recipe, tmp_path, monkeypatch, launcher, scope):
    """SIGTERM mid-run, as `scancel --signal=TERM --full` sends it (the batch script and all its
    children, srun included: srun would kill its step at once) or to the steps only (torchrun and
    the ranks): the ranks save the step they are on within the grace time, and the job requeues
    itself and finishes, like the time-limit path. What the first attempt reached must be the step
    saved on the signal (its log line), after the periodic checkpoint (every 50 steps)."""
    monkeypatch.chdir(tmp_path)
    steps = 150  # 55 before the signal, the rest after the requeue
    (job,) = helper(tmp_path, "--nodes", "2", "--ranks-per-node", "1", "--launcher", launcher, "--term-grace", "20",
                    "--config", str(recipe), "--run_name", "terminated", "--train.max_steps", str(steps),
                    "--checkpoint.interval_steps", "50", "--checkpoint.keep_last", "2")
    run_dir, log_path = tmp_path / "runs" / "terminated", tmp_path / "logs" / f"terminated-{job}.out"
    deadline = time.time() + 240
    while max(read_metrics(run_dir), default=0) < 55:  # past the first periodic checkpoint
        assert slurm.jobs(job)[0]["JobState"] not in ENDED and time.time() < deadline, job_log(log_path)[-5000:]
        time.sleep(0.5)
    slurm.run("scancel", "--signal=TERM", *(["--full"] if scope == "--full" else []), job)
    signalled = time.time()
    deadline = signalled + 120
    while "run requeue" not in job_log(log_path):
        state = slurm.jobs(job)[0]["JobState"]
        assert state not in ENDED, f"the job ended ({state}) without a requeue:\n{job_log(log_path)[-5000:]}"
        assert time.time() < deadline, job_log(log_path)[-5000:]
        time.sleep(0.2)
    assert time.time() - signalled < 20 + 30  # the grace, then the job-end helper (slow on a busy machine)
    (record,) = slurm.wait(job, timeout=300)
    log = job_log(log_path)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log[-5000:]  # one stop, then done
    assert "forcing job termination" not in log and "resumed from" in log, log[-5000:]
    if scope == "--full":  # the batch script got it and passed it on
        assert "SIGTERM; the ranks save within 20 s and stop" in log and "received SIGUSR1" in log, log[-5000:]
    else:
        assert "received SIGTERM" in log, log[-5000:]
    first, second = sorted((json.loads(p.read_text()) for p in (run_dir / "launches").glob("*.json")),
                           key=lambda r: r["restart"])
    assert (first["decision"], second["decision"]) == ("requeue", "done")
    assert 55 <= first["reached_step"] == second["start_step"] < steps, first
    assert f"saved step {first['reached_step']}, exiting" in log
    assert sorted(read_metrics(run_dir)) == list(range(1, steps + 1))


def _rank_pid(run_dir, rank: int) -> int | None:
    """The pid of a rank's trainer, from the pids launch/slurm/rank.sh records under $RUN_DIR/.rank-pids."""
    for marker in (run_dir / ".rank-pids").glob("*/*"):
        try:
            environ = (Path("/proc") / marker.name / "environ").read_bytes().split(b"\0")
        except OSError:  # a signal marker (<pid>.USR1), or a rank already gone
            continue
        if f"SLURM_PROCID={rank}".encode() in environ:
            return int(marker.name)
    return None


def test_a_hung_rank_ends_the_job_which_requeues_and_resumes_exactly(slurm, job_env, recipe, tmp_path, monkeypatch):
    """The SLURM side of train.hang_timeout_s (pretrain/watchdog.py; tests/pretrain/test_hangs.py checks
    the report itself): 2 nodes x 1 rank under srun, rank 1 frozen with SIGSTOP after a periodic
    checkpoint. Rank 0's watchdog names rank 1 and exits 7, srun ends the step, the batch script sees
    that `latest` advanced and requeues the job, which resumes from `latest` and finishes; the steps
    the first attempt logged after `latest` are repeated bitwise."""
    monkeypatch.chdir(tmp_path)
    steps, interval, hang_timeout_s = 60, 10, 6
    (job,) = helper(tmp_path, "--nodes", "2", "--ranks-per-node", "1", "--launcher", "srun",
                    "--config", str(recipe), "--run_name", "hung", "--data.num_workers", "0",
                    "--train.max_steps", str(steps), "--checkpoint.interval_steps", str(interval),
                    "--train.hang_timeout_s", str(hang_timeout_s), "--parallel.timeout_minutes", "2")
    run_dir, log_path = tmp_path / "runs" / "hung", tmp_path / "logs" / f"hung-{job}.out"

    # Freeze rank 1 inside a training step, never inside a save: the watchdog does not time saves (their
    # collectives wait parallel.timeout_minutes). A logged step that is not a checkpoint step proves the
    # save before it finished; after a step that is one, rank 1 may be in its save: thaw and retry.
    deadline = time.time() + 240
    while True:
        assert slurm.jobs(job)[0]["JobState"] not in ENDED and time.time() < deadline, job_log(log_path)[-5000:]
        last = max(read_metrics(run_dir), default=0)
        rank1 = _rank_pid(run_dir, 1)
        if last > interval and 0 < last % interval < interval - 3 and rank1:
            os.kill(rank1, signal.SIGSTOP)
            time.sleep(1.5)  # rank 0 logs the step rank 1 finished before it stopped, if any
            if max(read_metrics(run_dir)) % interval:
                break
            os.kill(rank1, signal.SIGCONT)
        time.sleep(0.2)

    deadline = time.time() + hang_timeout_s + 60
    while "run requeue" not in job_log(log_path):
        state = slurm.jobs(job)[0]["JobState"]
        assert state not in ENDED, f"the job ended ({state}) without a requeue:\n{job_log(log_path)[-5000:]}"
        assert time.time() < deadline, job_log(log_path)[-5000:]
        time.sleep(0.2)
    first_attempt = read_metrics(run_dir)  # the requeued job starts after the line: these are the first attempt's
    (record,) = slurm.wait(job, timeout=300)
    log = job_log(log_path)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log[-5000:]
    # (Rank 1, woken by the step's end with SIGCONT, may report a hang of its own before it is killed.)
    (rank0_line,) = [line for line in log.splitlines() if line.startswith("hang: rank 0: no training progress")]
    assert "ranks behind: rank 1 (silent" in rank0_line
    assert "ranks exited with 7; run requeue" in log and "resumed from" in log and "run done" in log, log[-5000:]
    assert "ranks behind: rank 1 (silent" in (run_dir / "hangs" / "rank-0.txt").read_text()

    first, second = sorted((json.loads(p.read_text()) for p in (run_dir / "launches").glob("*.json")),
                           key=lambda r: r["restart"])
    assert (first["exit_code"], first["decision"]) == (7, "requeue")
    assert (second["exit_code"], second["decision"]) == (0, "done")
    assert interval <= first["reached_step"] == second["start_step"] < max(first_attempt)
    assert first["reached_step"] % interval == 0
    resumed = read_metrics(run_dir)
    assert sorted(resumed) == list(range(1, steps + 1))
    redone = [step for step in first_attempt if step > first["reached_step"]]
    assert redone  # the step rank 1 finished before it stopped at least (not a checkpoint step)
    assert {step: resumed[step] for step in redone} == {step: first_attempt[step] for step in redone}  # bitwise


def test_prepare_as_an_array_of_three_parts_then_merge(slurm, job_env, tmp_path, monkeypatch):
    """python -m launch.slurm --prepare --parts 3: array tasks 0-2 each prepare one part of a corpus cut
    into 16 pieces (a JSONL file cut at line starts), the merge job starts after all three; the merged
    dataset holds, split by split, the documents of one prepare of the same corpus."""
    monkeypatch.chdir(tmp_path)
    corpus = dp_helpers.write_jsonl(tmp_path / "docs.jsonl", dp_helpers.make_documents(80))
    options = ["--source", str(corpus), "--tokenizer", "pydocs4k", "--seq-len", "16", "--val-fraction", "0.2",
               "--piece-mb", "0.002", "--entry-kb", "0.27", "--shard-mb", "0.001"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old").touch()
    for argv, refusal in ((["--parts", "17", *options, "--out", "x"], "make 16 pieces .* use at most 16 parts"),
                          (["--parts", "3", *options, "--out", "full"], "--out full is not empty; pass --overwrite"),
                          (["--parts", "3", *options], "prepare does not take these arguments"),  # no --out
                          ([*options, "--out", "x"], "--prepare needs --parts N"),
                          (["--parts", "3", "--format", "task", *options, "--out", "x"], "task files")):
        with pytest.raises(BadInput, match=refusal):
            build_prepare_submission(*parse_args(["--prepare", "--cpus-per-rank", "1", *argv]))
    done = subprocess.run([sys.executable, "-m", "launch.slurm", "--prepare", "--parts", "3", "--cpus-per-rank", "1",
                           "--logs", str(tmp_path / "logs"), *options, "--out", "web"], cwd=tmp_path,
                          capture_output=True, text=True, env={**job_env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    array_job, merge_job = done.stdout.split()
    parts = slurm.wait(array_job, timeout=240)
    logs = [job_log(tmp_path / "logs" / f"prepare-web-{array_job}_{i}.out") for i in range(3)]
    assert sorted(r["ArrayTaskId"] for r in parts) == ["0", "1", "2"], logs
    assert all(r["JobState"] == "COMPLETED" for r in parts), logs
    (merged,) = slurm.wait(merge_job, timeout=120)
    merge_log = job_log(tmp_path / "logs" / f"prepare-web-merge-{merge_job}.out")
    assert merged["JobState"] == "COMPLETED", merge_log
    assert merged["StartTime"] >= max(r["EndTime"] for r in parts)  # afterok: once every part is done
    assert "merged 3 parts:" in merge_log and "part 2 of 3" in logs[2]

    prepare([str(corpus)], "pydocs4k", 16, tmp_path / "one", val_fraction=0.2, piece_bytes=2000, entry_bytes=276,
            shard_bytes=1000, num_workers=1, progress=False)
    one, joined = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "web")
    assert joined["parts"]["dirs"] == [f"part-0000{i}-of-00003" for i in range(3)]
    assert joined["documents"] == one["documents"] and len(joined["splits"]["train"]["shards"]) > 3
    for split in ("train", "val"):
        from_parts, from_one = (dp_helpers.split_documents(tmp_path / name, split) for name in ("web", "one"))
        assert from_parts == from_one
