"""The μP coordinate check (pretrain/scaling/coord_check.py) through its command line: flat in width under
μP for every block type, growing without it.

Bound: the change of a block's output after t Adam steps grows like width^1 under the standard
parametrisation (Adam moves every weight entry by ~lr, and n aligned entries add up), like width^0
under μP. At these widths (32..256) μP's curves still carry finite-width corrections: the part of
Adam's first updates not aligned with the activations adds ~n^-1/2 relative terms, and the ratio
of distinct tokens to width matters (hence a 16-token vocabulary). Measured, they give |slopes| up
to 0.17 (docs/mup.md); 0.3 leaves room for them while staying under a third of the standard
parametrisation's slope of 1.

Adam's eps is 1e-20 here: at init the `S` block's query/key gradients are 1e-7..1e-9 at these sizes and
shrink with width under μP (1/m through the logits), so the default 1e-8 damps them more the wider the
model, and the S block's logits then fall with width (docs/mup.md, "Adam's eps").
"""
import json

import pytest
import yaml

from pretrain.scaling.cli import main
from pretrain.scaling.coord_check import slope

FLAT = 0.3  # |slope| of log mean |change| against log width under μP (see above)
RECIPE = {
    "model": {"vocab_size": 16, "vocab_pad_multiple": 16, "hidden_size": 32, "num_layers": 4, "num_heads": 4,
              "num_kv_heads": 2, "layer_pattern": "S*-M", "feedback_impl": "chunked", "feedback_chunk_size": 16,
              "mamba_state_size": 16, "mamba_head_size": 16, "mamba_chunk_size": 16},
    "optim": {"lr": 3.0e-3, "eps": 1.0e-20},
}
STEPS = 4


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("coord")
    (out / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    assert main(["coord-check", "--config", str(out / "recipe.yaml"), "--widths", "32,64,128,256", "--steps",
                 str(STEPS), "--seq-len", "16", "--batch", "2", "--out", str(out)]) == 0
    assert (out / "coord_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "coord_check.json").read_text())


def slopes(result, parametrisation, quantity) -> list[float]:
    """The slope of each step's mean |change| against width, steps 1..STEPS."""
    series = result["records"][parametrisation][quantity]["change"]
    return [slope(result["widths"], [per_width[t] for per_width in series]) for t in range(1, STEPS + 1)]


def test_every_block_type_is_flat_in_width_under_mup(result):
    """Every block's residual contribution, the embedding, the logits, the `S` block's feedback logits and the
    `*` block's attention logits. The `S` block's forward-branch attention logits are recorded but not
    asserted: at these widths they fall with width under μP, slope about -0.3 (docs/mup.md)."""
    quantities = list(result["records"]["mup"])
    assert quantities == ["embedding", "0:S", "1:*", "2:-", "3:M", "logits", "0:S attention logits",
                          "0:S feedback logits", "1:* attention logits"]
    assert result["base_width"] == 32 and result["widths"] == [32, 64, 128, 256]
    for quantity in quantities[:6] + ["0:S feedback logits", "1:* attention logits"]:
        assert max(abs(s) for s in slopes(result, "mup", quantity)) < FLAT, quantity
    assert result["slopes"]["mup"]["3:M"]["change"] == pytest.approx(slopes(result, "mup", "3:M")[-1])


def test_the_standard_parametrisation_grows_with_width(result):
    for quantity in ("1:*", "2:-"):  # hidden-matrix updates: slope ~1 and above
        assert slopes(result, "standard", quantity)[-1] > 1.0, quantity
    assert slopes(result, "standard", "logits")[-1] > 2 * FLAT
    for quantity in ("0:S attention logits", "0:S feedback logits", "1:* attention logits"):  # 1/sqrt(d)
        assert slopes(result, "standard", quantity)[-1] > 1.0, quantity


def test_bad_input_is_refused_with_a_clear_error(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    assert main(["coord-check", "--config", str(tmp_path / "recipe.yaml"), "--widths", "32,90", "--out",
                 str(tmp_path)]) == 2
    assert ("--widths 32,90: model.layer_pattern 'S*-M' has Mamba-2 blocks ('M') but their inner width mamba_expand "
            "* hidden_size = 180 is not a multiple of model.mamba_head_size (16)") in capsys.readouterr().err
    assert main(["coord-check", "--config", str(tmp_path / "missing.yaml"), "--widths", "32", "--out",
                 str(tmp_path)]) == 2
    assert "recipe " + str(tmp_path / "missing.yaml") + " does not exist" in capsys.readouterr().err
    assert not (tmp_path / "coord_check.json").exists()
