"""profile.steps / profile.ranks: a torch.profiler trace of the chosen steps, with the model's parts
and the step's phases as named ranges (pretrain/profiling.py, model/profile_ranges.py)."""
import gzip
import json

import pytest
from conftest import run_pretrain

from model.profile_ranges import (
    DATA_WAIT,
    FEEDBACK_SOLVE,
    FORWARD_ATTENTION,
    GRADIENT_REDUCTION,
    MAMBA_SCAN,
    MLP,
    OPTIMIZER_STEP,
)
from pretrain.config import ConfigError, load_config

# one block of each kind: Sessa (attention + feedback solve), attention, MLP, Mamba
HYBRID = ("--model.num_layers", "4", "--model.layer_pattern", "S*-M", "--model.ffn_hidden_size", "64",
          "--model.mamba_head_size", "16", "--model.mamba_state_size", "16")


@pytest.mark.slow
def test_trace_of_the_configured_steps_holds_every_part(recipe, tmp_path):
    run_pretrain(recipe, "--run_name", "traced", *HYBRID, "--train.max_steps", "4", "--data.num_workers", "0",
                 "--profile.steps", "2-3", "--profile.ranks", "0")
    profile_dir = tmp_path / "runs" / "traced" / "profile"
    assert sorted(p.name for p in profile_dir.iterdir()) == ["rank-0.json.gz"]  # no CUDA: no memory snapshot
    with gzip.open(profile_dir / "rank-0.json.gz", "rt") as trace_file:
        events = [e for e in json.load(trace_file)["traceEvents"] if e.get("ph") == "X"]
    steps = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events if e["name"].startswith("ProfilerStep#")}
    assert sorted(steps) == ["ProfilerStep#2", "ProfilerStep#3"]

    def count(name):  # ranges of that name, each inside a traced step
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == name]
        assert all(any(s <= begin and end <= e for s, e in steps.values()) for begin, end in spans), name
        return len(spans)

    # The recipe's global batch: 256 tokens = 2 micro-batches of 2 x 64 tokens, two steps traced.
    micro_batches = 2 * 2
    assert count(DATA_WAIT) == micro_batches
    assert count(FORWARD_ATTENTION) == 2 * micro_batches  # the S block and the * block
    for name in (FEEDBACK_SOLVE, MLP, MAMBA_SCAN):  # one block of each
        assert count(name) == micro_batches, name
    assert count(OPTIMIZER_STEP) == 2
    assert count(GRADIENT_REDUCTION) == 2  # megatron's finalize_model_grads, once a step (no pipeline schedule)


@pytest.mark.parametrize("steps, why", [("12-10", "first <= last"), ("x", "must look like"), ("0-2", "1 <= first"),
                                        ("21-22", "after train.max_steps")])
def test_bad_profile_steps_are_refused_naming_the_field(recipe, steps, why):
    with pytest.raises(ConfigError, match=f"profile.steps.*{why}"):
        load_config(recipe, ["--train.max_steps", "20", "--profile.steps", steps])


def test_bad_profile_ranks_are_refused_naming_the_field(recipe):
    with pytest.raises(ConfigError, match="profile.ranks"):
        load_config(recipe, ["--profile.ranks", "first"])
