"""benchmarks/hybrid_compare.py: every arm is matched within the tolerance, counted on the config it trains."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import hybrid_compare  # noqa: E402
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


def test_models_of_the_readme_table():
    """The README table's models (target 1,435,000); MLP widths nearest the recipe's 384."""
    labels = {arm: hybrid_compare.match_arm(TINY, arm, 1_435_000).label for arm in hybrid_compare.ARMS}
    assert labels == {"sessa": "S x 7", "S-": "S- x 3, ffn 448", "SSS*": "SSS* x 2",
                      "transformer": "5 layers, ffn 352", "no-feedback": "S x 9, no feedback",
                      "M-": "M- x 3, ffn 432"}


def test_arm_that_cannot_be_matched_is_refused():
    tiny = count_params(load_config(TINY).model)  # 4 Sessa layers: SSS* x 1 is 7.9% short, x 2 is 34% over
    with pytest.raises(ValueError, match=r"arm SSS\*: no model within 2% of 1,053,956 parameters.*SSS\* x 1: "
                                         r"970,883 \(-7\.9%\).*choose another --target"):
        hybrid_compare.match_arm(TINY, "SSS*", tiny)
    assert abs(hybrid_compare.match_arm(TINY, "sessa", tiny).deviation) == 0
    with pytest.raises(ValueError, match="arm S-: no model within 2% of 100,000 parameters"):
        hybrid_compare.match_arm(TINY, "S-", 100_000)  # below the embedding alone
