"""Campaigns (`stages:`, pretrain/stages.py): the resolver's configs and refusals, and the real trainer
across stage boundaries: bitwise SIGKILL resume at 1 and 2 processes, a data-parallel 2 -> 1 resume
across a boundary, a stage that turns on context parallelism, `stage` in every metrics line."""
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TEST_RECIPE, kill_launch, pretrain_command, pretrain_env, read_metrics, run_pretrain
from test_trainer import DP_ABS

from pretrain.config import ConfigError, load_config
from pretrain.loop import TEST_DATA_DELAY_ENV
from pretrain.stages import resolve_stages, schedule_config, stage_index_at


def _write(tmp_path: Path, stages, name: str = "campaign", **sections) -> Path:
    """TEST_RECIPE (its train.max_steps left out) with `stages`; a dict in `sections` updates that section."""
    tree = json.loads(json.dumps(TEST_RECIPE))
    tree["data"]["path"] = "data/a"
    tree["train"].pop("max_steps")
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    tree["stages"] = stages
    path = tmp_path / f"{name}.yaml"
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


def test_a_stage_with_one_path_replaces_the_recipes_mixture(tmp_path):
    recipe = _write(tmp_path, [{"name": "mixed", "steps": 2}, {"name": "single", "steps": 2, "data.path": "data/c"}],
                    data={"path": "", "sources": [{"name": "docs", "path": "data/a"}, {"name": "task", "path": "data/b"}]})
    mixed, single = resolve_stages(load_config(recipe))
    assert [s.name for s in mixed.config.data.sources] == ["docs", "task"] and mixed.config.data.path == "data/a"
    assert single.config.data.sources == [] and single.config.data.path == "data/c"


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
    ([{"name": "a", "steps": 4}, {"name": "b", "steps": 4, "model.mup_base_width": 16}], {},
     "stage 'b' sets model.mup_base_width, which cannot change between stages"),
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


def test_shipped_campaigns_resolve_and_memory_reports_each_stage(capsys, monkeypatch):
    """configs/campaign/: tiny's three stages; 1.3b-long's batch divides over each stage's layout at 64 GPUs
    (the trainer's own check) and `python -m pretrain.memory` prints each stage's estimate."""
    from pretrain import memory
    from pretrain.loop import Trainer

    from launch.slurm.job import resolve_run

    tiny = resolve_stages(load_config(REPO / "configs/campaign/tiny.yaml"))
    assert [(s.name, s.steps, s.config.parallel.context, s.own_schedule) for s in tiny] == \
        [("short", 120, 1, False), ("long", 30, 2, False), ("decay", 15, 2, True)]
    # the launchers (launch/local.sh, SLURM) read the run's length without pretrain: the stages' sum too
    assert resolve_run(["--config", str(REPO / "configs/campaign/tiny.yaml")])[1] == 165
    config = load_config(REPO / "configs/campaign/1.3b-long.yaml")
    layouts = memory.stage_layouts(config, [8192, 32768, 131072], 64)
    assert [(s.name, s.config.parallel.context, dp) for s, _, dp in layouts] == [("8k", 1, 64), ("32k", 2, 32),
                                                                                  ("128k", 8, 8)]
    assert [Trainer._num_microbatches(s.config, seq_len, dp) for s, seq_len, dp in layouts] == [2, 1, 1]
    with pytest.raises(ConfigError, match="--seq-len gives 1 lengths for 3 stages: one per stage"):
        memory.stage_layouts(config, [8192], 64)
    with pytest.raises(ConfigError, match="stage '128k': 12 devices are not divisible by .* = 8"):
        memory.stage_layouts(config, [8192, 32768, 131072], 12)
    monkeypatch.setattr("sys.argv", ["memory", "configs/campaign/1.3b-long.yaml", "--seq-len", "8192,32768,131072",
                                     "--world", "64"])
    monkeypatch.chdir(REPO)
    memory.main()
    printed = capsys.readouterr().out
    total = memory.estimate_memory_gb(layouts[2][0].config, 131072, 8)["total"]
    assert (f"stage '128k' (steps 19001-20000): TP 1 PP 1 CP 8 DP 8, seq_len 131072, micro-batch 1, recompute "
            f"selective\n") in printed and f"total: {total:8.2f} GB" in printed.split("stage '128k'")[1]


# --- the trainer across boundaries ----------------------------------------------------------------
LONG = {"model.rope_base": 100000.0, "train.micro_batch_size": 1}
DECAY = {"schedule.style": "wsd", "schedule.warmup_steps": 0, "schedule.wsd_decay_fraction": 1.0}
STAGE_OF_STEP = {**dict.fromkeys(range(1, 5), "short"), **dict.fromkeys(range(5, 9), "long"), 9: "decay", 10: "decay"}


@pytest.fixture(scope="module")
def lengths_data(tmp_path_factory) -> Path:
    """The bundled corpus at 64 and 128 tokens (one prepare): DIR/seq64, DIR/seq128."""
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("lengths") / "data"
    prepare("builtin", "pydocs4k", [64, 128], out, num_workers=1, progress=False)
    return out


def test_every_stage_is_checked_against_its_data_and_the_world_before_training(lengths_data, tmp_path):
    """The trainer's check of all stages at start: another tokenizer, a layout that does not divide the
    world, a batch that does not divide over a stage's layout, each refused naming the stage."""
    import functools
    from types import SimpleNamespace

    from pretrain.loop import Trainer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(lengths_data / "seq128", other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_id": "chars-0"}))

    def check(long: dict, world: int):
        recipe = _write(tmp_path, [{"name": "short", "steps": 2},
                                   {"name": "long", "steps": 2, "data.path": str(lengths_data / "seq128"), **long}],
                        data={"path": str(lengths_data / "seq64")})
        stages = resolve_stages(load_config(recipe))
        trainer = SimpleNamespace(stages=stages, stage=stages[0], env=SimpleNamespace(world_size=world),
                                  _check_model_matches_data=Trainer._check_model_matches_data,
                                  _num_microbatches=Trainer._num_microbatches)
        trainer._stage_data = functools.partial(Trainer._stage_data, trainer)
        Trainer._check_stages_data(trainer)

    check({"parallel.context": 2}, world=2)  # fits: 256 tokens = 2 sequences of 128 over CP 2 x DP 1
    with pytest.raises(ConfigError, match=f"stage 'long' reads {other}, tokenised with 'chars-0', but stage "
                                          f"'short' reads .*seq64, tokenised with 'pydocs4k-.*': every stage needs"):
        check({"data.path": str(other)}, world=1)
    with pytest.raises(ConfigError, match="stage 'long': world size 3 is not divisible by parallel.tensor x "
                                          "parallel.pipeline x parallel.context = 2"):
        check({"parallel.context": 2}, world=3)
    with pytest.raises(ConfigError, match=r"stage 'long': train.global_batch_tokens \(384\) must be a multiple of "
                                          r"micro_batch_size x seq_len x data-parallel size = 2 x 128 x 1"):
        check({"train.global_batch_tokens": 384}, world=1)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, lengths_data) -> dict:
    """Two campaigns of 4 + 4 + 2 steps on the bundled corpus at 64 then 128 tokens: `plain` (one layout
    throughout) and `cp` (stages long and decay at parallel.context 2), and their uninterrupted runs:
    `plain` at 1 process, `cp` at 2 (DP 2, then CP 2 x DP 1)."""
    tmp = tmp_path_factory.mktemp("campaign")
    recipes = {}
    for name, layout in (("plain", {}), ("cp", {"parallel.context": 2})):
        long = {**LONG, "data.path": str(lengths_data / "seq128"), **layout}
        recipes[name] = _write(tmp, [{"name": "short", "steps": 4}, {"name": "long", "steps": 4, **long},
                                     {"name": "decay", "steps": 2, **long, **DECAY}],
                               name, data={"path": str(lengths_data / "seq64")}, runs_dir=str(tmp / "runs"))
    straight = {"plain": run_pretrain(recipes["plain"], "--run_name", "plain"),
                "cp": run_pretrain(recipes["cp"], "--run_name", "cp", nproc=2)}
    return {"recipes": recipes, "runs": tmp / "runs", "stdout": {k: v.stdout for k, v in straight.items()}}


def _start_slowed(recipe: Path, *overrides: str, nproc: int = 1) -> subprocess.Popen:
    """start_pretrain with rank 0 waiting 0.1 s per micro-batch: a kill after step s lands before the
    next save (>= 1 step later) on a busy machine too."""
    env = pretrain_env() | {TEST_DATA_DELAY_ENV: "0:0.1"}
    return subprocess.Popen(pretrain_command(recipe, *overrides, nproc=nproc), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_after_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 600) -> None:
    """SIGKILL the process group once this launch (not an earlier one) has logged `step`."""
    metrics = run_dir / "metrics.jsonl"
    start = metrics.stat().st_size if metrics.exists() else 0
    deadline = time.time() + timeout
    while not metrics.exists() or not any(json.loads(line).get("step", 0) >= step and "train/loss" in line
                                          for line in metrics.read_text()[start:].splitlines()):
        assert process.poll() is None, f"training exited with {process.returncode} before step {step}"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)
    kill_launch(process)


def _latest(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text())


@pytest.mark.slow
def test_sigkill_just_after_a_boundary_resumes_bitwise_one_process(campaign):
    """Killed after step 6, the last checkpoint step 5 (just after the boundary; the boundary, step 4, is saved
    too): the finished run's losses are the uninterrupted run's, bit for bit. (A resume on a boundary at one
    process: test_data_parallel_2_to_1_resume_across_a_boundary.)"""
    recipe, run_dir = campaign["recipes"]["plain"], campaign["runs"] / "crashed1"
    _kill_after_step(_start_slowed(recipe, "--run_name", run_dir.name, "--checkpoint.interval_steps", "5"), run_dir, 6)
    assert _latest(run_dir) == 5 and (run_dir / "checkpoints" / "iter_0000004").is_dir()
    run_pretrain(recipe, "--run_name", run_dir.name)
    assert read_metrics(run_dir) == read_metrics(campaign["runs"] / "plain")


@pytest.mark.slow
def test_sigkill_on_a_boundary_and_mid_stage_resumes_bitwise_two_processes(campaign):
    """Two ranks: killed after step 5 (resumed on the boundary, where context parallelism turns on),
    then after step 7 (resumed mid-stage from step 6): the uninterrupted run's losses, bit for bit."""
    recipe, run_dir = campaign["recipes"]["cp"], campaign["runs"] / "crashed2"
    _kill_after_step(_start_slowed(recipe, "--run_name", run_dir.name, nproc=2), run_dir, 5)
    assert _latest(run_dir) == 4
    _kill_after_step(_start_slowed(recipe, "--run_name", run_dir.name, "--checkpoint.interval_steps", "3", nproc=2),
                     run_dir, 7)
    assert _latest(run_dir) == 6
    run_pretrain(recipe, "--run_name", run_dir.name, nproc=2)
    assert read_metrics(run_dir) == read_metrics(campaign["runs"] / "cp")


@pytest.mark.slow
def test_metrics_carry_the_stage_one_schedule_spans_the_run_and_decay_has_its_own(campaign):
    lr_max, lr_min = TEST_RECIPE["optim"]["lr"], TEST_RECIPE["optim"]["min_lr"]
    for name in ("plain", "cp"):
        run_dir = campaign["runs"] / name
        assert read_metrics(run_dir, "stage") == STAGE_OF_STEP
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert {r["step"]: r["stage"] for r in records if "val/loss" in r} == {4: "short", 8: "long", 10: "decay"}
        lr = read_metrics(run_dir, "train/lr")
        # the run's cosine (warmup 2, 10 steps) goes on through stage long: step 8 is 6/8 of its decay
        assert lr[8] == pytest.approx(lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(0.75 * math.pi)), rel=1e-9)
        # decay: its own linear WSD decay over its 2 steps, from optim.lr: half-way after step 9, min_lr after 10
        assert lr[9] == pytest.approx((lr_max + lr_min) / 2, rel=1e-9) and lr[10] == pytest.approx(lr_min, rel=1e-9)
    stdout = campaign["stdout"]["cp"]
    assert "stage 'short' (steps 1-4) of run cp" in stdout and "seq_len 64, world 2 (TP 1 x PP 1 x DP 2)" in stdout
    assert "stage 'long' (steps 5-8) of run cp" in stdout and "seq_len 128, world 2 (TP 1 x PP 1 x CP 2 x DP 1)" in stdout
    assert "stage 'decay' (steps 9-10, its own schedule) of run cp" in stdout


@pytest.mark.slow
def test_a_stage_that_turns_on_context_parallelism_trains_as_one_process_does(campaign):
    """cp (DP 2, then CP 2 x DP 1) against plain (one process throughout): the same losses up to the
    reduction order, through the boundary where the model is rebuilt at the new layout."""
    plain, cp = read_metrics(campaign["runs"] / "plain"), read_metrics(campaign["runs"] / "cp")
    assert sorted(cp) == list(range(1, 11))
    for step in range(1, 11):
        assert cp[step] == pytest.approx(plain[step], abs=DP_ABS), step


@pytest.mark.slow
def test_data_parallel_2_to_1_resume_across_a_boundary(campaign):
    """The cp run's boundary checkpoint (step 4, DP 2; stage short is the same in both recipes) resumed by
    one process with the plain recipe: stage long at DP 1 gives the uninterrupted one-process run's
    losses up to the reduction order."""
    run_dir = campaign["runs"] / "reshaped"
    shutil.copytree(campaign["runs"] / "cp" / "checkpoints" / "iter_0000004", run_dir / "checkpoints" / "iter_0000004")
    (run_dir / "checkpoints" / "latest").write_text("4")
    done = run_pretrain(campaign["recipes"]["plain"], "--run_name", run_dir.name)
    assert "stage 'long' (steps 5-8) of run reshaped" in done.stdout and "world 1 (TP 1 x PP 1 x DP 1)" in done.stdout
    resumed, plain = read_metrics(run_dir), read_metrics(campaign["runs"] / "plain")
    assert sorted(resumed) == list(range(5, 11))
    for step in range(5, 11):
        assert resumed[step] == pytest.approx(plain[step], abs=DP_ABS), step
