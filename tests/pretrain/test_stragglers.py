"""Straggler metrics at DP 2 (pretrain/stragglers.py): rank 1 waits longer for every micro-batch; each
logging interval names it as the slowest rank, with its step time and data wait."""
import json
import subprocess

import pytest
from conftest import REPO, pretrain_command, pretrain_env

from pretrain.loop import TEST_DATA_DELAY_ENV

DELAY_S = 0.8  # rank 1's extra wait per micro-batch


@pytest.mark.slow
def test_the_slow_rank_is_named_with_its_step_time_and_data_wait(recipe, tmp_path):
    steps = 3
    # the recipe's 256 tokens a step = 2 micro-batches of 2 x 64 tokens: one per rank and step
    command = pretrain_command(recipe, "--run_name", "straggler", "--train.max_steps", str(steps),
                               "--data.num_workers", "0", nproc=2)
    done = subprocess.run(command, cwd=REPO, env=pretrain_env() | {TEST_DATA_DELAY_ENV: f"1:{DELAY_S}"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in (tmp_path / "runs" / "straggler" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "perf/step_s_max" in line]
    assert [line["step"] for line in logged] == list(range(1, steps + 1))
    for line in logged:
        assert line["perf/slowest_rank"] == 1, line
        assert line["perf/data_wait_s_max"] >= DELAY_S, line
        assert line["perf/step_s_max"] >= DELAY_S, line
        # two ranks: the median is their mean, so rank 0's own step time is 2 x median - max; it waited
        # for rank 1 only at the gradient reduction, which its own time leaves out
        assert 2 * line["perf/step_s_median"] - line["perf/step_s_max"] < DELAY_S / 2, line
