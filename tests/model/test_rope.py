"""RoPE runs through megatron-core's rotary helper (model/attention.py) and gives bit for bit what the
hand-written rotation gave before it: the rotation itself, and the outputs of the Sessa layer
(interleaved pairs, as the public reference) and of the `*` block (rotate-half, as Llama), with the
formula below swapped in for megatron's. Both sides compute the angles and the rotation in at
least fp32 and round once at the end; x cos - y sin and x sin + y cos are the same IEEE operations
in either form, so equality is exact in fp64, fp32 and bf16."""
import pytest
import torch
from reference_layer import ReferenceMixer

from model import ModelConfig, SessaLayer
from model import blocks as model_blocks
from model import layer as model_layer
from model.attention import apply_rope, rope_config, rope_inv_freq
from model.blocks import AttentionBlock
from model.parallel import ensure_model_parallel, megatron_config


def rotate_by_formula(x, positions, inv_freq, interleaved: bool):
    """Pairs (2i, 2i+1) or (i, i + d/2) of x [B, H, T, d] rotated by positions[t] * inv_freq[i]."""
    compute = torch.promote_types(x.dtype, torch.float32)
    angles = positions.to(compute)[..., None] * inv_freq.to(compute)
    if angles.dim() == 3:  # positions [B, T]
        angles = angles[:, None]
    cos, sin = angles.cos(), angles.sin()
    x = x.to(compute)
    first, second = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    out = torch.empty_like(x)
    pairs = (out[..., 0::2], out[..., 1::2]) if interleaved else out.chunk(2, dim=-1)
    pairs[0].copy_(first * cos - second * sin)
    pairs[1].copy_(first * sin + second * cos)
    return out


def config(**fields):
    return ModelConfig(**{**dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 feedback_chunk_size=8, rope_base=500.0), **fields})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("packed", [False, True], ids=["positions", "packed-positions"])
def test_megatron_rope_equals_the_formula_bitwise(dtype, interleaved, packed):
    ensure_model_parallel()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 40, 16, generator=gen, dtype=torch.float64) * 3).to(dtype)
    positions = (torch.randint(0, 5000, (2, 40), generator=gen) if packed else torch.arange(7, 47))
    inv_freq = rope_inv_freq(16, 10000.0)
    got = apply_rope(x, positions, inv_freq, rope_config(megatron_config(config()), interleaved))
    assert got.dtype == dtype
    assert torch.equal(got, rotate_by_formula(x, positions, inv_freq, interleaved).to(dtype))


def test_interleaved_rope_equals_the_reference_transcription_bitwise():
    """fp64: the reference's rope (tests/model/reference_layer.py) takes the angles in fp64 too."""
    ensure_model_parallel()
    x = torch.randn(2, 4, 50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = ReferenceMixer(32, 4, 4, 0.9)
    got = apply_rope(x, torch.arange(50), reference.rope_inv_freq, rope_config(megatron_config(config()), True))
    assert torch.equal(got, reference.rope(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["S", "*"])
def test_block_outputs_equal_the_formula_bitwise(monkeypatch, dtype, kind):
    ensure_model_parallel()
    cfg = config(layer_pattern=kind * 2)
    block = SessaLayer(cfg) if kind == "S" else AttentionBlock(cfg, megatron_config(cfg))
    block = block.to(dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(24, 2, 32, generator=gen, dtype=dtype)  # [T, B, D]
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    position_ids = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    module = model_layer if kind == "S" else model_blocks
    with torch.no_grad():
        outputs = [block(x)[0], block(x, doc_ids=doc_ids, position_ids=position_ids)[0]]
        monkeypatch.setattr(module, "apply_rope", lambda x, positions, inv_freq, _rope: rotate_by_formula(
            x, positions, inv_freq, interleaved=kind == "S").to(x.dtype))
        by_formula = [block(x)[0], block(x, doc_ids=doc_ids, position_ids=position_ids)[0]]
    assert all(torch.equal(a, b) for a, b in zip(outputs, by_formula))
