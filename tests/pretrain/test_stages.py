"""Campaigns (`stages:`, pretrain/stages.py): the resolver's configs and refusals, and the real trainer
across stage boundaries: bitwise SIGKILL resume at 1 and 2 processes, a data-parallel 2 -> 1 resume
across a boundary, a stage that turns on context parallelism, `stage` in every metrics line."""
import json
from pathlib import Path

import pytest
import yaml
from conftest import TEST_RECIPE

from pretrain.config import ConfigError, load_config
from pretrain.stages import resolve_stages, schedule_config, stage_index_at


def _write(tmp_path: Path, stages, **sections) -> Path:
    tree = json.loads(json.dumps(TEST_RECIPE))
    tree["data"]["path"] = "data/a"
    tree["train"].pop("max_steps")
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    tree["stages"] = stages
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# --- the resolver ---------------------------------------------------------------------------------
def test_stages_resolve_to_configs_steps_and_schedules(tmp_path):
    recipe = _write(tmp_path, [
        {"name": "short", "steps": 6},
        {"name": "long", "steps": 4, "data.sources": [{"name": "docs", "path": "data/b", "weight": 2}],
         "model": {"rope_base": 500000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4,
                                                            "original_max_position_embeddings": 64}},
         "parallel.context": 2, "train.micro_batch_size": 1, "eval.tasks": "passkey"},
        {"name": "decay", "steps": 3, "data.path": "data/c", "schedule.warmup_steps": 0,
         "schedule.style": "wsd", "schedule.wsd_decay_fraction": 1.0},
    ])
    config = load_config(recipe)
    assert config.train.max_steps == 13  # filled in: the sum of the stages' steps
    short, long, decay = resolve_stages(config)
    assert [(s.first_step, s.last_step) for s in (short, long, decay)] == [(0, 6), (6, 10), (10, 13)]
    assert short.config.data.path == "data/a" and short.config.model.rope_base == 10000.0
    assert long.config.data.path == "data/b" and [s.weight for s in long.config.data.sources] == [2.0]
    assert long.config.model.rope_base == 500000.0 and long.config.model.rope_scaling.factor == 4
    assert long.config.parallel.context == 2 and long.config.train.micro_batch_size == 1
    assert long.config.eval.tasks == "passkey" and short.config.eval.tasks == ""
    assert decay.config.data.path == "data/c" and decay.config.data.sources == []  # the mixture gives way
    assert decay.config.model.rope_base == 10000.0  # each stage is the recipe + its own overrides only
    assert all(s.config.train.max_steps == 13 and s.config.stages == [] for s in (short, long, decay))
    assert [s.own_schedule for s in (short, long, decay)] == [False, False, True]
    assert schedule_config(short, config) is config and schedule_config(decay, config).train.max_steps == 3
    assert [stage_index_at([short, long, decay], step) for step in (0, 5, 6, 9, 10, 12, 13)] == [0, 0, 1, 1, 2, 2, 2]


def test_a_recipe_without_stages_is_one_unnamed_stage(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({**TEST_RECIPE, "data": {"path": "data/a"}}))
    (only,) = resolve_stages(load_config(path))
    assert (only.name, only.first_step, only.last_step, only.own_schedule) == ("", 0, 10, False)


@pytest.mark.parametrize("stages, sections, message", [
    ([{"name": "a", "steps": 4}, {"name": "b", "steps": 4, "model.hidden_size": 64}], {},
     "stage 'b' sets model.hidden_size, which cannot change between stages"),
    ([{"name": "a", "steps": 4}, {"name": "b", "steps": 4, "model": {"vocab_size": 8192}}], {},
     "stage 'b' sets model.vocab_size, which cannot change between stages"),
    ([{"name": "a", "steps": 4, "model.layer_pattern": "S-"}], {},
     "stage 'a' sets model.layer_pattern, which cannot change between stages"),
    ([{"name": "a", "steps": 4, "model.arch": "transformer"}], {},
     "stage 'a' sets model.arch, which cannot change between stages"),
    ([{"name": "a", "steps": 4, "optim.lr": 1.0e-3}], {},
     "stage 'a' sets optim.lr, which cannot change between stages; a stage may set data.*"),
    ([{"name": "a", "steps": 4, "train.seed": 3}], {}, "stage 'a' sets train.seed, which cannot change"),
    ([{"name": "a", "steps": 4, "train.max_steps": 4}], {}, "stage 'a' sets train.max_steps: a stage's length"),
    ([{"name": "a", "steps": 4, "run_name": "x"}], {}, "stage 'a' sets run_name, which cannot change"),
    ([{"name": "a", "steps": 4, "modle.rope_base": 1.0}], {}, "stage 'a': unknown field 'modle.rope_base'"),
    ([{"name": "a", "steps": 4, "model.rope_bse": 1.0}], {}, "stage 'a': unknown field(s) model.rope_bse"),
    ([{"name": "a", "steps": 4, "parallel.context": 0}], {}, "stage 'a': parallel.tensor, parallel.pipeline"),
    ([{"name": "a", "steps": 4}, {"name": "a", "steps": 2}], {}, "stage name 'a' is used twice"),
    ([{"steps": 4}], {}, "stages[0] needs a `name`"),
    ([{"name": "a", "steps": 0}], {}, "stage 'a': steps must be an integer >= 1, got 0"),
    ([{"name": "a", "steps": 4}, {"name": "b", "steps": 2, "schedule.warmup_steps": 2}], {},
     "stage 'b' sets its own schedule: schedule.warmup_steps (2) must be smaller than its steps (2)"),
    ([{"name": "a", "steps": 4}, {"name": "b", "steps": 2}], {"train": {"max_steps": 7}},
     "train.max_steps (7) must equal the sum of the stages' steps (6)"),
    ([{"name": "a", "steps": 4}], {"engine": "deepspeed"}, "stages need engine: megatron"),
])
def test_refusals_name_the_field_and_the_stage(tmp_path, stages, sections, message):
    tree = {k: v for k, v in sections.items() if k != "engine"}
    recipe = _write(tmp_path, stages, **tree)
    overrides = ["--engine", sections["engine"]] if "engine" in sections else []
    with pytest.raises(ConfigError) as err:
        resolve_stages(load_config(recipe, overrides))
    assert message in str(err.value), str(err.value)
