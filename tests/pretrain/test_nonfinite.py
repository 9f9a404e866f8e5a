"""Non-finite steps (train.nonfinite): a NaN injected into the real model's output drops that step's
update and is counted (skip), or stops the run (stop / too many in a row) with `latest` left at the
last good checkpoint."""
import subprocess
import sys

import pytest
from conftest import REPO, pretrain_env, read_metrics

pytestmark = pytest.mark.slow


def _run(recipe, steps: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tests/pretrain/nonfinite_run.py"), steps, "--config", str(recipe),
               "--data.num_workers", "0", "--train.max_steps", "6", "--checkpoint.interval_steps", "2", *overrides]
    return subprocess.run(command, cwd=REPO, env=pretrain_env(), capture_output=True, text=True, timeout=600)


def test_skip_drops_the_update_and_training_goes_on(recipe, tmp_path):
    done = _run(recipe, "3", "--run_name", "skip")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "skip"
    losses, lrs = read_metrics(run_dir), read_metrics(run_dir, "train/lr")
    assert sorted(losses) == list(range(1, 7))
    assert losses[3] != losses[3]  # NaN logged as it happened
    assert all(losses[s] == losses[s] for s in (1, 2, 4, 5, 6))
    assert read_metrics(run_dir, "train/skipped_steps")[6] == 1
    assert lrs[3] == lrs[2]  # the schedule does not advance on a dropped update (as in Megatron-LM)
    assert "update dropped" in done.stdout

    clean = _run(recipe, "99", "--run_name", "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    reference = read_metrics(tmp_path / "runs" / "clean")
    assert [losses[s] for s in (1, 2)] == [reference[s] for s in (1, 2)]
    assert losses[4] != reference[4]  # step 4 trains from step 2's weights on step 4's data


def test_too_many_in_a_row_stop_and_keep_the_last_good_checkpoint(recipe, tmp_path):
    done = _run(recipe, "3,4,5", "--run_name", "streak", "--train.nonfinite_limit", "2")
    assert done.returncode == 5, done.stderr[-3000:]
    assert "2 non-finite steps in a row" in done.stderr and "last good checkpoint (step 2)" in done.stderr
    checkpoints = tmp_path / "runs" / "streak" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "2"
    assert not (checkpoints / "iter_0000004").exists()


def test_stop_policy_stops_at_the_first(recipe, tmp_path):
    done = _run(recipe, "3", "--run_name", "stop", "--train.nonfinite", "stop")
    assert done.returncode == 5 and "train.nonfinite is 'stop'" in done.stderr
    assert max(read_metrics(tmp_path / "runs" / "stop")) == 2  # step 3 raised before it was logged
    assert (tmp_path / "runs" / "stop" / "checkpoints" / "latest").read_text().strip() == "2"
