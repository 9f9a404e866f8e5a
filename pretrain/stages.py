"""Training campaigns: a recipe's `stages:` resolved into one RunConfig per stage, trained in order by
the one loop of pretrain/loop.py.

    stages:
      - {name: short, steps: 200}
      - {name: long, steps: 60, data.path: data/builtin1024, model.rope_base: 500000, parallel.context: 2}
      - {name: decay, steps: 20, schedule.style: wsd, schedule.warmup_steps: 0, schedule.wsd_decay_fraction: 1.0}

Contract of resolve_stages(config) -> list[Stage]:
- A stage's keys besides `name` and `steps` are dotted overrides of the recipe (after the command
  line's), `section: {field: value}` meaning the same as `section.field: value`; its config is the
  recipe with them applied, validated as any recipe. A stage setting data.sources drops the recipe's
  data.path and the other way round.
- Stage i trains steps first_step + 1 .. last_step; the run's train.max_steps is the sum of the
  stages' steps (load_config fills it in; a different value is refused).
- A stage may change STAGE_FIELDS (data, the batch shape, the parallel layout, RoPE and other
  non-shape model fields, schedule, eval); anything else (the model's shape, dtype, optimizer,
  seeds, run, checkpoint and logging settings) is refused, naming the field and the stage.
- A stage that sets any schedule.* field has its own schedule over its own steps (warmup, then decay
  to optim.min_lr by its last step); the others follow the recipe's schedule over the whole run.
- The loop reads each stage's data with a new loader seeded data.seed + the stage's index, and
  rebuilds the engine at a boundary only where model, layout or batch shape change (pretrain/loop.py).
- A recipe without stages is one unnamed stage over train.max_steps.
"""
import copy
import dataclasses
from dataclasses import dataclass

from .config import ConfigError, RunConfig, _build, apply_override

SECTIONS = {f.name for f in dataclasses.fields(RunConfig)} - {"stages"}
# What a stage may set: whole sections, or single fields of a section
STAGE_FIELDS = {"data": None, "parallel": None, "schedule": None, "eval": None, "model": None,
                "train": ("global_batch_tokens", "micro_batch_size", "recompute")}
# model fields the weights carried from stage to stage depend on (pretrain/state.py SHAPE_FIELDS), dtype and μP
FIXED_MODEL_FIELDS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                      "ffn_hidden_size", "tie_embeddings", "vocab_pad_multiple", "feedback", "layer_pattern",
                      "mamba_state_size", "mamba_head_size", "mamba_expand", "mamba_conv_kernel", "dtype",
                      "mup", "mup_base_width", "mup_base_head_size")


@dataclass
class Stage:
    name: str  # "" for a recipe without stages
    first_step: int  # steps trained before it
    steps: int
    config: RunConfig  # the recipe with this stage's overrides (its own `stages` empty)
    own_schedule: bool  # sets schedule.*: a schedule over its own steps instead of the run's

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps


def resolve_stages(config: RunConfig) -> list[Stage]:
    """The recipe's stages, each with its validated config (see the module docstring)."""
    if not config.stages:
        return [Stage("", 0, config.train.max_steps, config, own_schedule=False)]
    if config.engine != "megatron":
        raise ConfigError(f"stages need engine: megatron (a stage rebuilds the engine in place, which is "
                          f"implemented and tested for megatron-core); got engine: {config.engine}")
    base = config.to_dict()
    base["stages"] = []
    stages, names = [], set()
    for index, entry in enumerate(config.stages):
        where = f"stages[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"] \
                or "/" in entry["name"]:
            raise ConfigError(f"{where} needs a `name` (non-empty, without '/'), e.g. "
                              f"{{name: long, steps: 100, data.path: ...}}")
        name = entry["name"]
        if name in names:
            raise ConfigError(f"stage name {name!r} is used twice: stage names must be distinct")
        names.add(name)
        steps = entry.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"stage {name!r}: steps must be an integer >= 1, got {steps!r}")
        overrides = _flatten({k: v for k, v in entry.items() if k not in ("name", "steps")}, name)
        for key in overrides:
            _check_may_change(key, name)
        tree = _apply(base, overrides)
        try:
            stage_config = _build(RunConfig, tree, "")
        except ConfigError as err:
            raise ConfigError(f"stage {name!r}: {err}") from None
        own = any(key.startswith("schedule.") for key in overrides)
        if own and stage_config.schedule.warmup_steps >= steps:
            raise ConfigError(f"stage {name!r} sets its own schedule: schedule.warmup_steps "
                              f"({stage_config.schedule.warmup_steps}) must be smaller than its steps ({steps})")
        first = stages[-1].last_step if stages else 0
        stages.append(Stage(name, first, steps, stage_config, own))
    total = stages[-1].last_step
    if config.train.max_steps != total:
        raise ConfigError(f"train.max_steps ({config.train.max_steps}) must equal the sum of the stages' steps "
                          f"({total}); remove train.max_steps from the recipe (a campaign's length is its stages')")
    return stages


def stage_index_at(stages: list[Stage], step: int) -> int:
    """The stage that trains the step after `step` (the last stage once all are done)."""
    return next((i for i, stage in enumerate(stages) if step < stage.last_step), len(stages) - 1)


def schedule_config(stage: Stage, recipe: RunConfig) -> RunConfig:
    """The config pretrain/state.build_scheduler reads for the stage's schedule: its own over its steps,
    or the recipe's over the whole run."""
    if not stage.own_schedule:
        return recipe
    return dataclasses.replace(stage.config, train=dataclasses.replace(stage.config.train, max_steps=stage.steps))


def _flatten(overrides: dict, stage: str) -> dict:
    """`section: {field: value}` -> `section.field: value`; dotted keys stay as they are."""
    flat = {}
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"stage {stage!r}: override keys are dotted field names, got {key!r}")
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{field}": v for field, v in value.items()})
        else:
            flat[key] = value
    return flat


def _check_may_change(key: str, stage: str) -> None:
    section, _, field = key.partition(".")
    allowed = "; a stage may set data.*, train.global_batch_tokens / micro_batch_size / recompute, " \
              "parallel.*, model.* other than its shape, schedule.* and eval.*"
    if section not in SECTIONS:
        raise ConfigError(f"stage {stage!r}: unknown field {key!r}{allowed}")
    fields = STAGE_FIELDS.get(section, ())
    if section == "model" and field.split(".")[0] in FIXED_MODEL_FIELDS:
        raise ConfigError(f"stage {stage!r} sets {key}, which cannot change between stages (the weights carried "
                          f"from stage to stage have one shape, dtype and parametrisation); set it in the recipe's "
                          f"model section")
    if section == "train" and field == "max_steps":
        raise ConfigError(f"stage {stage!r} sets train.max_steps: a stage's length is its `steps`")
    if not field or (fields is not None and field.split(".")[0] not in fields):
        raise ConfigError(f"stage {stage!r} sets {key}, which cannot change between stages{allowed}")


def _apply(base: dict, overrides: dict) -> dict:
    tree = copy.deepcopy(base)
    for key, value in overrides.items():
        apply_override(tree, key, value)
    data = tree["data"]
    if "data.sources" in overrides and "data.path" not in overrides:
        data["path"] = ""  # the recipe's one-source shorthand gives way to the stage's mixture
    if "data.path" in overrides and "data.sources" not in overrides:
        data["sources"] = []
    return tree
