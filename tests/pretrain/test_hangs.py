"""train.hang_timeout_s (pretrain/watchdog.py): two data-parallel ranks started as srun starts them (one
process per rank, rank 0 holding the rendezvous store); rank 1 is frozen with SIGSTOP. Rank 0 exits
non-zero within the timeout plus a margin, naming rank 1, with its Python stacks and its flight recorder
in runs/NAME/hangs/ (a stopped rank writes nothing of its own); a restart resumes exactly."""
import contextlib
import os
import pickle
import signal
import subprocess
import time

import pytest
from conftest import REPO, _free_port, pretrain_command, pretrain_env, read_metrics, run_pretrain

from pretrain.config import ConfigError, load_config
from pretrain.watchdog import HANG_EXIT_CODE

HANG_TIMEOUT_S = 4
COLLECTIVE_TIMEOUT_MINUTES = 7  # parallel.timeout_minutes: the recorder lists each collective's timeout
MARGIN_S = 12  # heartbeat reads (2 periods of 1 s), the step in flight, the dumps, a loaded machine
RUN = ("--run_name", "hung", "--data.num_workers", "0", "--checkpoint.interval_steps", "4", "--train.max_steps", "8")
WATCHED = ("--train.hang_timeout_s", str(HANG_TIMEOUT_S), "--parallel.timeout_minutes", str(COLLECTIVE_TIMEOUT_MINUTES))


def _start_ranks(recipe, logs):
    """Both ranks, each with its stdout + stderr in logs/rank-R.log."""
    port, ranks = _free_port(), []
    for rank in range(2):
        env = pretrain_env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(logs / f"rank-{rank}.log", "w") as log:
            ranks.append(subprocess.Popen(pretrain_command(recipe, *RUN, *WATCHED), cwd=REPO, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return ranks


@pytest.mark.slow
def test_a_stopped_rank_is_named_and_the_run_restarts_exactly(recipe, tmp_path):
    run_dir = tmp_path / "runs" / "hung"
    rank0, rank1 = _start_ranks(recipe, tmp_path)
    try:
        deadline = time.time() + 300
        while max(read_metrics(run_dir), default=0) < 6:  # steps 1-6 done; `latest` is step 4
            assert rank0.poll() is None and rank1.poll() is None, "a rank ended before the hang"
            assert time.time() < deadline, "no step 6 within 300 s"
            time.sleep(0.05)
        os.kill(rank1.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        rank0.wait(timeout=HANG_TIMEOUT_S + MARGIN_S)
        waited = time.monotonic() - stopped_at
    finally:
        for rank in (rank1, rank0):  # rank 1: as SLURM ends the job step once a rank has failed
            with contextlib.suppress(ProcessLookupError):  # the group: megatron's save Manager and its
                os.killpg(rank.pid, signal.SIGKILL)       # resource tracker outlive a killed rank
            rank.wait()
    output = (tmp_path / "rank-0.log").read_text()
    assert rank0.returncode == HANG_EXIT_CODE, output[-3000:]
    assert HANG_TIMEOUT_S <= waited <= HANG_TIMEOUT_S + MARGIN_S
    message = output.strip().splitlines()[-1]
    assert message.startswith("hang: rank 0: no training progress") and "ranks behind: rank 1 (silent" in message

    hangs = run_dir / "hangs"
    stacks = (hangs / "rank-0.txt").read_text()
    assert "ranks behind: rank 1" in stacks
    assert f'File "{REPO / "pretrain" / "loop.py"}"' in stacks and "in _train_steps" in stacks  # the main thread
    assert f'File "{REPO / "pretrain" / "watchdog.py"}"' in stacks  # every thread: the watchdog's own too
    assert not (hangs / "rank-1.txt").exists()  # frozen: it cannot write
    # The flight recorder's variables were set before the process group (inert for gloo except the ring
    # itself): its dump went where TORCH_FR_DUMP_TEMP_FILE points, and shows the collective rank 0 waits in.
    assert f"TORCH_NCCL_DUMP_ON_TIMEOUT=1 TORCH_FR_DUMP_TEMP_FILE={hangs / 'flight_recorder_rank_'}" in stacks
    recorder = pickle.loads((hangs / "flight_recorder_rank_0").read_bytes())
    assert any(group["last_enqueued_collective"] > group["last_completed_collective"]
               for group in recorder["pg_status"].values()), recorder["pg_status"]
    assert {entry["timeout_ms"] for entry in recorder["entries"]} == {COLLECTIVE_TIMEOUT_MINUTES * 60_000}

    logged = read_metrics(run_dir)  # the uninterrupted run's losses up to the hang
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "4"
    run_pretrain(recipe, *RUN, nproc=2)
    resumed = read_metrics(run_dir)
    assert sorted(resumed) == list(range(1, 9))
    redone = [step for step in logged if step > 4]
    assert len(redone) >= 2  # steps 5 and 6 at least: weights, data position and optimizer state restored
    for step in redone:
        assert resumed[step] == logged[step], (step, resumed[step], logged[step])


@pytest.mark.parametrize("field, value", [("train.hang_timeout_s", "-1"), ("parallel.timeout_minutes", "0")])
def test_bad_timeouts_are_refused_naming_the_field(recipe, field, value):
    with pytest.raises(ConfigError, match=field):
        load_config(recipe, [f"--{field}", value])
