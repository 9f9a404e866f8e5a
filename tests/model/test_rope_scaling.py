"""model.rope_scaling (model/attention.py): YaRN against the published formula (Peng et al. 2023,
"YaRN: Efficient Context Window Extension of Large Language Models", written out below with the
paper's constants), linear scaling as positions / factor exactly, in the Sessa and `*` blocks,
the Transformer arm and the HF modeling file; configuration errors name the field; a resume may
change the RoPE settings (stages do)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from model import ModelConfig, SessaLM
from model.attention import apply_rope, rope_config, rope_inv_freq
from model.blocks import AttentionBlock
from model.config import RopeScaling
from model.layer import SessaLayer
from model.parallel import ensure_model_parallel, megatron_config

ALPHA, BETA = 1.0, 32.0  # the paper's alpha and beta for the Llama family (beta_slow, beta_fast)


def paper_frequencies(head_size: int, base: float, factor: float, original_length: int) -> list[float]:
    """NTK-by-parts h(theta_d) = (1 - gamma(r)) theta_d / s + gamma(r) theta_d with r = L / lambda_d,
    lambda_d = 2 pi / theta_d, gamma(r) = 0 below alpha, 1 above beta, (r - alpha) / (beta - alpha) between."""
    out = []
    for d in range(head_size // 2):
        theta = base ** (-2 * d / head_size)
        r = original_length / (2 * math.pi / theta)
        gamma = 0.0 if r < ALPHA else 1.0 if r > BETA else (r - ALPHA) / (BETA - ALPHA)
        out.append((1 - gamma) * theta / factor + gamma * theta)
    return out


def paper_q_k_scale(factor: float) -> float:
    """sqrt(1/t) = 0.1 ln(s) + 1, multiplying q and k (so the logits by 1/t)."""
    return 0.1 * math.log(factor) + 1


def yarn(factor, original_length):
    return RopeScaling(rope_type="yarn", factor=factor, original_max_position_embeddings=original_length)


@pytest.mark.parametrize("factor, original_length, head_size, base", [
    (8.0, 4096, 128, 10000.0), (4.0, 2048, 64, 500000.0), (2.5, 512, 32, 10000.0)])
def test_yarn_frequencies_are_the_published_formula(factor, original_length, head_size, base):
    got = rope_inv_freq(head_size, base, yarn(factor, original_length)).double()
    expected = torch.tensor(paper_frequencies(head_size, base, factor, original_length), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    plain = [base ** (-2 * d / head_size) for d in range(head_size // 2)]
    turns = [original_length * theta / (2 * math.pi) for theta in plain]
    # the ramp's two ends are both reached: kept frequencies (r > beta) and fully interpolated ones (r < alpha)
    assert any(r > BETA for r in turns) and any(r < ALPHA for r in turns) and any(ALPHA < r < BETA for r in turns)
    for d, r in enumerate(turns):
        if r > BETA:
            assert got[d].item() == pytest.approx(plain[d], rel=1e-6)
        elif r < ALPHA:
            assert got[d].item() == pytest.approx(plain[d] / factor, rel=1e-6)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_yarn_rotation_scales_q_and_k_by_the_published_temperature(interleaved):
    ensure_model_parallel()
    scaling = yarn(16.0, 64)
    x = torch.randn(2, 3, 40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(100, 140)
    got = apply_rope(x, positions, rope_inv_freq(16, 10000.0, scaling), rope_config(
        megatron_config(ModelConfig(vocab_size=8, hidden_size=32, num_layers=1, num_heads=2)), interleaved, scaling))
    # frequencies are held in fp32 (as megatron's): the formula's, rounded once
    inv_freq = torch.tensor(paper_frequencies(16, 10000.0, 16.0, 64), dtype=torch.float32).double()
    angles = positions.double()[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    first, second = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    rotated = (first * cos - second * sin, first * sin + second * cos)
    expected = (torch.stack(rotated, dim=-1).flatten(-2) if interleaved else torch.cat(rotated, dim=-1))
    torch.testing.assert_close(got, expected * paper_q_k_scale(16.0), rtol=1e-6, atol=1e-6)


def _config(pattern="S*", **fields):
    return ModelConfig(**{**dict(vocab_size=61, hidden_size=32, num_layers=len(pattern), num_heads=2, num_kv_heads=1,
                                 feedback_impl="chunked", feedback_chunk_size=8, layer_pattern=pattern,
                                 rope_base=10000.0, init_scheme="reference"), **fields})  # attention far from uniform


@torch.no_grad()
def _with_paper_yarn(modules, factor, original_length, head_size, base=10000.0):
    """Plain-RoPE modules made into YaRN by hand: the paper's frequencies in their RoPE buffer and q, k
    projections (weights and biases) multiplied by sqrt(1/t) (RoPE is linear, so before or after it)."""
    for module in modules:
        if hasattr(module, "rope_inv_freq"):
            module.rope_inv_freq.copy_(torch.tensor(paper_frequencies(head_size, base, factor, original_length)))
            for projection in (module.q_proj, module.k_proj):
                for param in projection.parameters():
                    param.mul_(paper_q_k_scale(factor))


def test_sessa_and_attention_blocks_apply_yarn_as_published():
    """A model of Sessa and `*` blocks with yarn = the plain model with YaRN made by hand (fp64)."""
    ensure_model_parallel()
    ids = torch.randint(0, 61, (2, 37), generator=torch.Generator().manual_seed(1))
    scaled = SessaLM(_config(rope_scaling=yarn(8.0, 16)), init_seed=3).double()
    by_hand = SessaLM(_config(), init_seed=3).double()
    _with_paper_yarn(by_hand.modules(), 8.0, 16, head_size=16)
    plain = SessaLM(_config(), init_seed=3).double()
    with torch.no_grad():
        got, expected, before = scaled(ids), by_hand(ids), plain(ids)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert (got - before).abs().max() > 1e-5  # the scaling changes the model


@pytest.mark.parametrize("kind", ["S", "*"])
def test_linear_scaling_is_positions_divided_by_the_factor_exactly(kind):
    ensure_model_parallel()
    linear, plain = _config(kind, rope_scaling={"rope_type": "linear", "factor": 3.0}), _config(kind)
    # Sessa's mixer (where its RoPE acts: outside it, 1-ulp angle changes round away) or the `*` block
    blocks = [SessaLayer(c).mixer if kind == "S" else AttentionBlock(c, megatron_config(c)) for c in (linear, plain)]
    x = torch.randn(30, 2, 32, generator=torch.Generator().manual_seed(2))  # [T, B, D]
    positions = torch.randint(0, 5000, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = blocks[0](x, position_ids=positions)[0]
        expected = blocks[1](x, position_ids=positions.float() / 3.0)[0]
    assert torch.equal(got, expected)


@pytest.fixture
def cpu_megatron():
    if not torch.cuda.is_available():
        from model import cpu_compat

        cpu_compat.enable()  # megatron's RoPE moves its frequencies to "the current CUDA device"


def _transformer(seed=0, **fields):
    from model.transformer import TransformerLM, init_model_weights, transformer_megatron_config

    config = ModelConfig(arch="transformer", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, **fields)
    ensure_model_parallel()
    model = TransformerLM(config, transformer_megatron_config(config))
    init_model_weights(model, seed)
    return model.double()


def test_transformer_arm_applies_yarn_as_published(cpu_megatron):
    """TransformerLM with yarn = the plain TransformerLM given the paper's frequencies and q, k times sqrt(1/t)
    (megatron's fused qkv rows: per kv group, its query heads, its key head, its value head)."""
    ids = torch.randint(0, 300, (2, 45), generator=torch.Generator().manual_seed(4))
    scaled = _transformer(rope_scaling=yarn(4.0, 32))
    by_hand = _transformer()
    d, groups, per_group = 16, 2, 2
    with torch.no_grad():
        by_hand.rotary_pos_emb.inv_freq = torch.tensor(paper_frequencies(d, 10000.0, 4.0, 32), dtype=torch.float32)
        for layer in by_hand.decoder.layers:
            rows = layer.self_attention.linear_qkv.weight.view(groups, (per_group + 2) * d, -1)
            rows[:, : (per_group + 1) * d] *= paper_q_k_scale(4.0)  # query heads and key head
        got, expected = scaled(ids), by_hand(ids)
        positions = torch.randint(0, 200, (2, 45), generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(scaled(ids, position_ids=positions), by_hand(ids, position_ids=positions),
                                   rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_transformer_arm_linear_table_is_positions_divided_by_the_factor(cpu_megatron):
    scaled, plain = _transformer(rope_scaling={"rope_type": "linear", "factor": 3.0}), _transformer()
    table = scaled.rotary_pos_emb(50)[:, 0, 0, :8]  # [S, d/2]: the first of each pair's two copies
    expected = (torch.arange(50, dtype=torch.float32) / 3.0)[:, None] * plain.rotary_pos_emb.inv_freq
    assert torch.equal(table, expected)


def test_hf_modeling_file_applies_the_same_scaling():
    """checkpoints/hf (its own RoPE) from the exported config.json fields: the native model's logits."""
    from checkpoints import layout
    from checkpoints.hf.configuration_sessa import ModelConfig as HFConfig
    from checkpoints.hf.modeling_sessa import SessaForCausalLM

    ensure_model_parallel()
    ids = torch.randint(0, 61, (2, 29), generator=torch.Generator().manual_seed(6))
    for scaling in (yarn(8.0, 16), {"rope_type": "linear", "factor": 3.0}):
        cfg = _config("S*", rope_scaling=scaling)
        native = SessaLM(cfg, init_seed=7).double()
        state = {k: v for k, v in native.state_dict().items() if isinstance(v, torch.Tensor)}
        entries = layout.entries(cfg, {k: tuple(v.shape) for k, v in state.items()})
        config_json = json.loads(json.dumps(layout.hf_config_dict(cfg, torch.float32, None)))
        assert config_json["sessa_rope_scaling"]["rope_type"] == cfg.rope_scaling.rope_type
        logits = {}
        for name, fields in (("scaled", config_json), ("plain", config_json | {"sessa_rope_scaling": None})):
            hf = SessaForCausalLM(HFConfig(**fields)).double().eval()
            hf.load_state_dict({e.target: layout.fuse(e, state, cfg) for e in entries}, strict=False)
            hf.lm_head.weight = hf.model.embed_tokens.weight
            with torch.no_grad():
                logits[name] = hf(ids).logits
        with torch.no_grad():
            ours = native(ids)[..., :61]
        # the HF file rotates in fp32 whatever the model dtype (~1e-7 here, with or without scaling)
        torch.testing.assert_close(logits["scaled"], ours, rtol=1e-6, atol=1e-6)
        assert (logits["plain"] - ours).abs().max() > 1e-3
        assert layout.model_fields_from_hf(config_json)["rope_scaling"] == cfg.rope_scaling


@pytest.mark.parametrize("scaling, field", [
    ({"rope_type": "ntk", "factor": 2.0}, "model.rope_scaling.rope_type"),
    ({"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 64}, "model.rope_scaling.factor"),
    ({"rope_type": "yarn", "factor": 4.0}, "model.rope_scaling.original_max_position_embeddings"),
    ({"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 64},
     "model.rope_scaling.original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 0.5}, "beta_slow"),
    ({"factor": 4.0}, "model.rope_scaling needs rope_type"),
    ("yarn", "model.rope_scaling must be none or a mapping"),
])
def test_bad_rope_scaling_is_refused_naming_the_field(scaling, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _config(rope_scaling=scaling)


def test_recipe_rope_scaling_none_or_a_mapping(tmp_path):
    from pretrain.config import ConfigError, load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {vocab_size: 61, hidden_size: 32, num_layers: 1, num_heads: 2}\n"
                      "data: {path: data}\n")
    assert load_config(recipe, ["--model.rope_scaling", "none"]).model.rope_scaling is None
    scaled = load_config(recipe, ["--model.rope_scaling.rope_type", "yarn", "--model.rope_scaling.factor", "8",
                                  "--model.rope_scaling.original_max_position_embeddings", "1024"]).model.rope_scaling
    assert scaled == RopeScaling(rope_type="yarn", factor=8.0, original_max_position_embeddings=1024)
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.factor"):
        load_config(recipe, ["--model.rope_scaling.rope_type", "linear", "--model.rope_scaling.factor", "0.5"])


def test_resume_allows_another_rope_base_and_scaling():
    """Stages change the RoPE base and scaling: the resume check compares shapes and tokenizer only."""
    from pretrain.config import ConfigError
    from pretrain.state import check_checkpoint_compatible

    saved = {"config": {"model": _config().to_dict()}, "tokenizer_id": "tok"}
    extended = _config(rope_base=500000.0, rope_scaling=yarn(4.0, 256))
    check_checkpoint_compatible(saved, "latest", SimpleNamespace(model=extended, data=SimpleNamespace(path="d")), "tok")
    with pytest.raises(ConfigError, match="hidden_size"):  # the check does run
        check_checkpoint_compatible(saved, "latest", SimpleNamespace(model=_config(hidden_size=64),
                                                                     data=SimpleNamespace(path="d")), "tok")
    assert ModelConfig(**extended.to_dict()) == extended  # the saved config reloads with its scaling


def test_exports_without_the_scaling_are_refused():
    """The reference layer and the Llama export of the Transformer arm hold plain RoPE only."""
    from model.reference import reference_layer_kwargs
    from model.transformer import llama_config_dict

    with pytest.raises(ValueError, match="rope_scaling 'yarn'.*export --to hf or --to safetensors"):
        reference_layer_kwargs(_config("SS", rope_scaling=yarn(4.0, 64)))
    transformer = ModelConfig(arch="transformer", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                              rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="model.rope_scaling 'linear'.*export --to safetensors"):
        llama_config_dict(transformer)
