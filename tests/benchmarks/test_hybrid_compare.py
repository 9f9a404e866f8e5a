"""benchmarks/hybrid_compare.py: every arm is matched within the tolerance, counted on the config it trains."""
import dataclasses
import math
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import hybrid_compare  # noqa: E402
from model import ModelConfig, SessaLM  # noqa: E402
from model.flops import count_params  # noqa: E402
from pretrain.config import load_config  # noqa: E402

TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.mark.parametrize("target", [1_435_000, 1_848_074])
def test_every_arm_within_two_percent(target):
    for arm in hybrid_compare.ARMS:
        match = hybrid_compare.match_arm(TINY, arm, target)
        model = load_config(TINY, hybrid_compare.cli(match.overrides)).model
        assert match.params == count_params(model), arm
        assert abs(match.params / target - 1) <= 0.02, (arm, match.params)
        assert model.feedback == (arm != "no-feedback")
        if arm == "transformer":
            assert model.arch == "transformer" and model.num_layers == match.repeats
        else:
            unit = hybrid_compare.ARMS[arm][0]
            assert model.layer_pattern == unit * match.repeats and model.num_layers == len(model.layer_pattern)
        if match.ffn_hidden_size is not None:
            assert model.ffn_hidden_size == match.ffn_hidden_size and match.ffn_hidden_size % 16 == 0


def documented_choice(arm: str, target: int, tolerance: float = 0.02) -> tuple[int, int | None]:
    """match_arm's rule by brute force, without its linear solve for the MLP width: every depth, and
    for arms with MLP blocks every multiple of 16 up to past the target; per depth the width whose
    total is nearest the target; of the depths within tolerance, the width nearest the recipe's own
    (MLP arms) or the smallest deviation. Counted by count_params (checked against the modules in
    tests/model/test_hybrid.py)."""
    recipe = load_config(TINY).model
    has_mlp = "-" in hybrid_compare.ARMS[arm][0]

    def params(repeats, ffn):
        overrides = hybrid_compare.arm_overrides(arm, repeats, ffn)
        typed = {k: v == "true" if v in ("true", "false") else v for k, v in overrides.items()}
        return count_params(dataclasses.replace(recipe, **typed))

    fits = []
    for repeats in range(1, 100):
        totals = {}
        for ffn in range(16, 100 * 16, 16) if has_mlp else [None]:
            totals[ffn] = params(repeats, ffn)
            if totals[ffn] > target:
                break
        ffn = min(totals, key=lambda w: abs(totals[w] - target))
        if abs(totals[ffn] / target - 1) <= tolerance:
            fits.append((repeats, ffn, abs(totals[ffn] / target - 1)))
        if min(totals.values()) > (1 + tolerance) * target:
            break
    if has_mlp:
        best = min(fits, key=lambda m: (abs(math.log(m[1] / recipe.ffn_hidden_size)), m[2]))
    else:
        best = min(fits, key=lambda m: m[2])
    return best[:2]


# docs/hybrid.md's table; configs/tiny.yaml at 10 layers; a tolerance that several depths meet
@pytest.mark.parametrize("target, tolerance", [(1_435_000, 0.02), (1_848_074, 0.02), (1_435_000, 0.1)])
def test_every_arm_is_the_documented_choice(target, tolerance):
    for arm in hybrid_compare.ARMS:
        match = hybrid_compare.match_arm(TINY, arm, target, tolerance)
        assert (match.repeats, match.ffn_hidden_size) == documented_choice(arm, target, tolerance), arm
    assert hybrid_compare.match_arm(TINY, "S-", 1_435_000).label == "S- x 3, ffn 448"  # as the table spells it


def test_arm_that_cannot_be_matched_is_refused():
    def module_params(pattern):  # the parameters of the model built (tied embeddings once)
        fields = load_config(TINY).model.to_dict() | {"num_layers": len(pattern), "layer_pattern": pattern}
        return sum(p.numel() for p in SessaLM(ModelConfig(**fields)).parameters())

    tiny, sss_attention = module_params("SSSS"), module_params("SSS*")  # 4 Sessa layers; SSS* x 1
    assert tiny == count_params(load_config(TINY).model)
    nearest = re.escape(f"SSS* x 1: {sss_attention:,} ({sss_attention / tiny - 1:+.1%})")  # x 2 is 34% over
    with pytest.raises(ValueError, match=rf"arm SSS\*: no model within 2% of {tiny:,} parameters.*{nearest}.*"
                                         r"choose another --target"):
        hybrid_compare.match_arm(TINY, "SSS*", tiny)
    assert abs(hybrid_compare.match_arm(TINY, "sessa", tiny).deviation) == 0
    with pytest.raises(ValueError, match="arm S-: no model within 2% of 100,000 parameters"):
        hybrid_compare.match_arm(TINY, "S-", 100_000)  # below the embedding alone
