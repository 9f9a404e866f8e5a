"""Crash-safe, exact resume of the real trainer (megatron-core DDP, distributed optimizer, gloo)."""
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import kill_launch, read_metrics, run_pretrain, start_pretrain

pytestmark = pytest.mark.slow


def _kill_after_step(process, run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while max(read_metrics(run_dir), default=0) < step:
        if process.poll() is not None:
            raise AssertionError(f"training exited with {process.returncode} before step {step}")
        if time.time() > deadline:
            raise AssertionError(f"no step {step} within {timeout} s")
        time.sleep(0.05)
    kill_launch(process)


HYBRID = ("--model.num_layers", "4", "--model.layer_pattern", "SM*-", "--model.ffn_hidden_size", "64",
          "--model.mamba_head_size", "16", "--model.mamba_state_size", "16")


@pytest.mark.parametrize("nproc, model", [(1, ()), (2, HYBRID),
                                          (2, (*HYBRID, "--parallel.context", "2", "--parallel.context_layout", "zigzag"))],
                         ids=["dp1", "dp2_hybrid_SM*-", "cp2_zigzag_hybrid_SM*-"])
def test_sigkill_then_restart_gives_bitwise_identical_losses(recipe, tmp_path, nproc, model):
    run_pretrain(recipe, "--run_name", "straight", *model, nproc=nproc)
    reference = read_metrics(tmp_path / "runs" / "straight")
    assert sorted(reference) == list(range(1, 11))

    run_dir = tmp_path / "runs" / "crashed"
    process = start_pretrain(recipe, "--run_name", "crashed", "--checkpoint.interval_steps", "4", *model, nproc=nproc)
    _kill_after_step(process, run_dir, 6)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "4"
    run_pretrain(recipe, "--run_name", "crashed", "--checkpoint.interval_steps", "4", *model, nproc=nproc)
    resumed = read_metrics(run_dir)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(5, 11):  # steps re-done after the restart
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def test_kill_during_save_keeps_previous_checkpoint(recipe, tmp_path):
    run_dir = tmp_path / "runs" / "torn"
    checkpoints = run_dir / "checkpoints"
    process = start_pretrain(recipe, "--run_name", "torn", "--checkpoint.interval_steps", "3")
    deadline = time.time() + 600
    while not (checkpoints / ".tmp_iter_0000006").exists():  # the second save has begun writing
        assert process.poll() is None and time.time() < deadline, "training ended before the second save"
        time.sleep(0.002)
    kill_launch(process)
    assert (checkpoints / "latest").read_text().strip() == "3"
    assert not (checkpoints / "iter_0000006").exists()

    run_pretrain(recipe, "--run_name", "torn", "--checkpoint.interval_steps", "3")
    run_pretrain(recipe, "--run_name", "straight")
    resumed, reference = read_metrics(run_dir), read_metrics(tmp_path / "runs" / "straight")
    assert [resumed[s] for s in range(4, 11)] == [reference[s] for s in range(4, 11)]
    assert not list(checkpoints.glob(".tmp_iter_*"))
    assert (checkpoints / "latest").read_text().strip() == "10"


def test_sigterm_to_the_process_group_saves_and_exits_cleanly(recipe, tmp_path):
    """As SLURM preemption and `timeout` do: every process of the group, data workers included,
    gets SIGTERM; the trainer still finishes its step, saves and exits 0."""
    run_dir = tmp_path / "runs" / "preempted"
    process = start_pretrain(recipe, "--run_name", "preempted", "--train.max_steps", "200")  # own session
    deadline = time.time() + 600
    while max(read_metrics(run_dir), default=0) < 3:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=300) == 0
    saved = int((run_dir / "checkpoints" / "latest").read_text())
    assert 3 <= saved < 200 and saved == max(read_metrics(run_dir))



def test_log_says_once_when_a_sigterm_would_not_be_saved_in_time():
    """After the first periodic save the loop compares one step + one save with launch.term_grace_s."""
    from types import SimpleNamespace

    from pretrain.loop import Trainer

    messages = []
    loop = SimpleNamespace(_grace_checked=False, logger=SimpleNamespace(print=messages.append),
                           config=SimpleNamespace(launch=SimpleNamespace(term_grace_s=20)))
    Trainer._check_term_grace(loop, save_s=15.0, step_s=9.0)
    Trainer._check_term_grace(loop, save_s=15.0, step_s=9.0)
    assert len(messages) == 1 and "one step (9.0 s) + one save (15.0 s) > launch.term_grace_s (20 s)" in messages[0]
    quiet = SimpleNamespace(_grace_checked=False, logger=SimpleNamespace(print=messages.append),
                            config=SimpleNamespace(launch=SimpleNamespace(term_grace_s=20)))
    Trainer._check_term_grace(quiet, save_s=5.0, step_s=9.0)
    assert len(messages) == 1
