"""The sweep planner: budgets, rounding, flags, ladders, per-size rules, configs the trainer loads."""
import json
from pathlib import Path

import pytest
import yaml

from pretrain.config import load_config
from pretrain.scaling.cli import main
from pretrain.scaling.plan import HparamRules, Planner, SizeRule, apply_overrides, config_hash

REPO = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
WIDTHS = [32, 48, 64, 96, 128]


def planner(**kwargs):
    return Planner(base=BASE, seq_len=64, size_rule=SizeRule(aspect=32, head_size=16), **kwargs)


def test_isoflop_points_hit_their_budgets_or_are_flagged():
    points = planner().isoflop([3e12, 1e13], WIDTHS, sizes_per_budget=3)
    assert len(points) == 2 * 2 * 3  # archs x budgets x sizes
    for p in points:
        assert p.achieved_flops == pytest.approx(p.steps * p.batch_tokens * p.flops_per_token)
        assert p.off_budget == (abs(p.achieved_flops / p.target_flops - 1) > 0.02)
        assert p.tokens == p.steps * p.batch_tokens and p.batch_tokens % 64 == 0
    # sizes bracket the 20 tokens/param optimum: the smallest model sees more tokens per parameter
    sessa = [p for p in points if p.arch == "sessa" and p.target_flops == 1e13]
    assert sessa[0].tokens / sessa[0].params > 20 > sessa[-1].tokens / sessa[-1].params
    # a fixed batch too large for the budget cannot be rounded onto it: flagged, never hidden
    coarse = planner(rules=HparamRules(overrides={"batch_tokens": 2**20})).isoflop([3e12], WIDTHS)
    assert all(p.off_budget for p in coarse)


def test_layer_pattern_arms_repeat_their_unit_to_each_depth(capsys):
    points = planner(archs=("sessa", "S-", "SSS*")).isoflop([1e13], WIDTHS, sizes_per_budget=2)
    for p in points:
        config = planner().model_config(p.arch, p.width)
        if p.arch == "sessa":
            assert config.layer_pattern == "" and p.name.startswith("sessa-")
        else:
            unit = p.arch
            assert config.layer_pattern == unit * (config.num_layers // len(unit)) and config.num_layers >= len(unit)
            assert p.name.startswith({"S-": "psf-", "SSS*": "psssa-"}[unit])
            assert p.overrides["model.layer_pattern"] == config.layer_pattern
    load_config(REPO / "configs" / "tiny.yaml", [f"--{k}={v}" for k, v in points[-1].overrides.items()])
    with pytest.raises(SystemExit) as refused:
        main(["plan", "--base", str(REPO / "configs" / "tiny.yaml"), "--seq-len", "64", "--widths", "32",
              "--budgets", "1e12", "--arms", "sessa", "SX", "--dry-run"])
    assert refused.value.code == 2 and "arm 'SX' is neither an architecture" in capsys.readouterr().err


def test_ladder_branches_fork_from_the_constant_phase():
    points = planner(archs=("sessa",)).ladder([32, 64], ratios=(10, 20, 40, 80))
    for width in (32, 64):
        rungs = [p for p in points if p.width == width]
        main = next(p for p in rungs if not p.fork_of)
        assert main.tokens / main.params == pytest.approx(80, rel=0.02)
        main_stable = round(main.steps * (1 - main.decay_fraction))
        for p in rungs:
            assert p.batch_tokens == main.batch_tokens and p.lr == main.lr
            if p.fork_of:
                assert p.fork_of == main.name and 0 < p.fork_step < main_stable
                assert round(p.steps * (1 - p.decay_fraction)) == p.fork_step  # decay starts at the fork
                assert p.overrides["schedule.wsd_decay_fraction"] == pytest.approx(p.decay_fraction, abs=1e-6)


def test_rules_and_overrides():
    """lr and batch follow DeepSeek LLM (Bi et al. 2024), eq. 1, C in FLOPs: lr = 0.3118 C^-0.1250,
    B = 0.2920 C^0.3271 tokens (here rounded to the nearest whole micro-batch of sequences)."""
    rules = HparamRules()
    for budget in (1e18, 1e21):  # lr 1.753e-3 and 7.394e-4; B 225,519 and 2,160,145 tokens
        assert rules.lr(budget) == pytest.approx(0.3118 * budget ** -0.1250, rel=1e-12)
        for seq_len, micro_batch in ((2048, 1), (1024, 4)):
            unit = seq_len * micro_batch
            batch = rules.batch_tokens(budget, seq_len, micro_batch)
            assert batch % unit == 0 and abs(batch - 0.2920 * budget ** 0.3271) <= unit / 2
    # the planner hands each point's budget C to the rules (seq_len 64: B within 32 tokens of the law)
    for point in planner(archs=("sessa",)).isoflop([3e12, 1e13], WIDTHS, sizes_per_budget=1):
        assert point.lr == pytest.approx(0.3118 * point.target_flops ** -0.1250, rel=1e-12)
        assert abs(point.batch_tokens - 0.2920 * point.target_flops ** 0.3271) <= 32
    assert rules.beta2(16 * 2048, 2048) == 0.99 and rules.beta2(512 * 2048, 2048) == 0.95
    fixed = HparamRules(overrides={"lr": 1e-3, "beta2": 0.9, "warmup_steps": 5})
    assert (fixed.lr(1e20), fixed.beta2(10, 1), fixed.warmup_steps(10**9, 10, 100)) == (1e-3, 0.9, 5)


def test_config_hash_keys_what_changes_the_result():
    a = planner().isoflop([3e12], WIDTHS, sizes_per_budget=2)
    hashes = [p.config_hash for p in a]
    assert len(set(hashes)) == len(hashes)
    again = planner().isoflop([3e12], WIDTHS, sizes_per_budget=2)
    assert [p.config_hash for p in again] == hashes
    tree = apply_overrides(BASE, a[0].overrides)
    assert config_hash(tree | {"run_name": "renamed", "logging": {"interval": 99}}) == a[0].config_hash
    assert config_hash(apply_overrides(tree, {"train.seed": 1})) != a[0].config_hash
    reseeded = planner(seed=7).isoflop([3e12], WIDTHS, sizes_per_budget=2)  # a repeat for the noise floor
    assert [p.name for p in reseeded] == [f"{p.name}-s7" for p in a]
    assert not {p.config_hash for p in reseeded} & set(hashes)


def test_plan_cli_dry_run_and_written_configs_load(tmp_path, monkeypatch, capsys):
    """The CLI in-process (tests/scaling/test_fit.py runs `python -m pretrain.scaling` itself)."""
    monkeypatch.chdir(tmp_path)  # a dry run writes nothing, not even the default sweeps/ directory
    base = ["--base", str(REPO / "configs" / "tiny.yaml"), "--budgets", "3e12", "1e13", "--widths", *map(str, WIDTHS),
            "--seq-len", "64", "--head-size", "16", "--aspect", "32"]
    assert main(["plan", *base, "--dry-run", "--tflops-per-gpu", "400"]) == 0
    table = capsys.readouterr().out
    assert "achieved" in table and "GPU-hours" in table
    assert not any(tmp_path.iterdir())
    assert main(["plan", *base, "--out", str(tmp_path / "sweep")]) == 0
    plan = json.loads((tmp_path / "sweep" / "plan.json").read_text())
    assert len(plan["points"]) == 12
    for point in plan["points"]:
        config = load_config(tmp_path / "sweep" / "configs" / f"{point['name']}.yaml")  # the trainer's own validation
        assert config.model.arch == point["arch"] and config.train.max_steps == point["steps"]


def test_mup_plan_takes_the_width_out_of_the_lr_rule(tmp_path, capsys):
    """plan --mup: every point is a μP model of the base width 32 (head size 16 there), and the LR rule is
    evaluated at the base's compute on the point's tokens: same tokens, same LR at every width; the base
    width's LR is the standard rule's."""
    from model.flops import ledger

    mup, standard = planner(archs=("sessa",), mup_base_width=32), planner(archs=("sessa",))

    def points(width, tokens=2e6):  # a run of `tokens` at `width`, as ladder() asks for one
        flops = tokens * ledger(standard.model_config("sessa", width), 64).per_token("model")
        return mup._point("p", "sessa", width, flops, tokens=tokens), standard._point("p", "sessa", width, flops,
                                                                                      tokens=tokens)

    at = {w: points(w) for w in (32, 64, 128)}
    assert at[32][0].lr == at[32][1].lr
    assert at[64][0].lr == at[128][0].lr == at[32][0].lr
    assert at[128][1].lr < at[64][1].lr < at[32][1].lr  # without μP the rule lowers it with the model's compute
    config = mup.model_config("sessa", 128)
    assert (config.mup, config.mup_base_width, config.mup_base_head_size, config.head_size) == (True, 32, 16, 16)
    assert main(["plan", "--base", str(REPO / "configs" / "tiny.yaml"), "--seq-len", "64", "--widths", "32", "64",
                 "--budgets", "1e13", "--mup", "--dry-run"]) == 2  # the Transformer arm has no μP
    assert "plan: model.mup is for model.arch 'sessa'" in capsys.readouterr().err
    out = tmp_path / "sweep"
    assert main(["plan", "--base", str(REPO / "configs" / "tiny.yaml"), "--seq-len", "64", "--widths", "32", "64",
                 "--head-size", "16", "--aspect", "32", "--budgets", "1e13", "--arms", "sessa", "--mup",
                 "--out", str(out)]) == 0
    for path in (out / "configs").glob("*.yaml"):
        trained = load_config(path)  # the trainer's own validation
        assert (trained.model.mup, trained.model.mup_base_width) == (True, 32)
