"""The FLOP ledger against torch.utils.flop_counter on the real models (CPU, fp32)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import ModelConfig
from model.flops import chunked_solve_flops, flop_counter_formulas, ledger

SHAPES = {  # id: (model fields, batch, seq_len)
    "sessa-gqa": (dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, feedback_chunk_size=16), 2, 64),
    "sessa-ragged-chunks": (dict(hidden_size=48, num_layers=1, num_heads=3, feedback_chunk_size=16), 1, 50),
    "sessa-one-head-untied": (dict(hidden_size=32, num_layers=3, num_heads=1, tie_embeddings=False,
                                   feedback_chunk_size=32), 2, 96),
    "sessa-no-feedback": (dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, feedback=False), 2, 64),
    "transformer-gqa": (dict(arch="transformer", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2), 2, 64),
    "transformer-mha-untied": (dict(arch="transformer", hidden_size=96, num_layers=3, num_heads=6,
                                    ffn_hidden_size=160, tie_embeddings=False), 1, 40),
}


def _build(fields):
    from model import cpu_compat

    if not torch.cuda.is_available():
        cpu_compat.enable()  # megatron's RoPE and RNG tracker assume CUDA otherwise
    from model.transformer import build_model, init_model_weights, megatron_config_for
    from model.parallel import ensure_model_parallel

    ensure_model_parallel()
    config = ModelConfig(vocab_size=300, feedback_impl="chunked", **fields)
    model = build_model(config, megatron_config_for(config))
    init_model_weights(model, seed=0)
    return config, model


def _count(model, tokens, backward: bool) -> int:
    with FlopCounterMode(display=False, custom_mapping=flop_counter_formulas()) as counter:
        loss = model(tokens, tokens)
        if backward:
            loss.mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", SHAPES)
def test_ledger_matches_flop_counter(name):
    fields, batch, T = SHAPES[name]
    config, model = _build(fields)
    tokens = torch.randint(0, config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(0))
    book = ledger(config, T)
    # The ledger counts every matmul FlopCounterMode counts, so the totals agree exactly; the
    # tolerance only absorbs float rounding of the ledger's per-token division (~1e-16).
    assert _count(model, tokens, backward=False) == pytest.approx(
        batch * T * book.per_token("hardware", training=False), rel=1e-12)
    assert _count(model, tokens, backward=True) == pytest.approx(batch * T * book.per_token("hardware"), rel=1e-12)
    # the model convention is the mathematics: never more than what is executed
    assert book.per_token("model") <= book.per_token("hardware") * 1.0001


def test_chunked_solve_is_counted_exactly():
    from kernels.feedback_solve import feedback_solve_chunked

    B, T, K, V, C = 2, 37, 8, 6, 16
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, T, K, generator=gen, requires_grad=True), torch.randn(B, T, K, generator=gen)
    f, gamma = torch.randn(B, T, V, generator=gen, requires_grad=True), torch.rand(B, T, generator=gen) * 0.9
    k.requires_grad_(True)
    gamma.requires_grad_(True)
    with FlopCounterMode(display=False, custom_mapping=flop_counter_formulas()) as counter:
        s = feedback_solve_chunked(q, k, f, gamma, C)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping=flop_counter_formulas()) as counter:
        s.sum().backward()
    expected = chunked_solve_flops(T, K, V, C)
    assert forward == B * sum(expected["forward"].values())
    assert counter.get_total_flops() == B * sum(expected["backward"].values())


def test_registered_formulas_agree_with_counts_made_here():
    """The formulas flop_counter_formulas() registers, against counts that do not use them: SDPA
    against torch's own (full-square) formulas scaled to the pairs a causal mask keeps, the
    unit-triangular solve against forward substitution run as matmuls, in-place baddbmm_ against
    torch's out-of-place baddbmm."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten, formulas = torch.ops.aten, flop_counter_formulas()
    b, h, d_qk, d_v = 2, 3, 8, 4  # d_qk != d_v: the backward weighs them differently
    for s_q, s_k in ((7, 7), (5, 9)):  # training; queries after a cached past (aligned to the last keys)
        q, k, v, out = (b, h, s_q, d_qk), (b, h, s_k, d_qk), (b, h, s_k, d_v), (b, h, s_q, d_v)
        kept = int(torch.ones(s_q, s_k).tril(diagonal=s_k - s_q).sum())
        for causal, pairs in ((False, s_q * s_k), (True, kept)):
            forward = formulas[aten._scaled_dot_product_flash_attention_for_cpu](q, k, v, 0.0, causal, out_shape=out)
            backward = formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward](
                out, q, k, v, out, (b, h, s_q), 0.0, causal, out_shape=(q, k, v))
            assert forward * s_q * s_k == sdpa_flop_count(q, k, v) * pairs
            assert backward * s_q * s_k == sdpa_backward_flop_count(out, q, k, v) * pairs

    gen = torch.Generator().manual_seed(2)
    lower = torch.randn(4, 6, 6, generator=gen).tril(-1) + torch.eye(6)
    rhs = torch.randn(4, 6, 3, generator=gen)
    with FlopCounterMode(display=False, custom_mapping=formulas) as solve:
        solved = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    with FlopCounterMode(display=False) as substitution:
        rows = [rhs[:, :1]]
        for i in range(1, 6):  # x_i = b_i - L[i, :i] x[:i]
            rows.append(rhs[:, i:i + 1] - lower[:, i:i + 1, :i] @ torch.cat(rows, dim=1))
    torch.testing.assert_close(torch.cat(rows, dim=1), solved)
    assert solve.get_total_flops() == substitution.get_total_flops()

    acc, x, y = torch.zeros(3, 4, 6), torch.randn(3, 4, 5, generator=gen), torch.randn(3, 5, 6, generator=gen)
    with FlopCounterMode(display=False, custom_mapping=formulas) as in_place:
        acc.baddbmm_(x, y)
    with FlopCounterMode(display=False) as out_of_place:
        torch.baddbmm(acc, x, y)
    assert in_place.get_total_flops() == out_of_place.get_total_flops()


def test_conventions_and_components():
    config = ModelConfig(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
    book = ledger(config, 256)
    assert set(book.forward) == {"projections", "mlp", "attention", "feedback_logits", "feedback_sum",
                                 "feedback_solve", "lm_head"}
    assert book.per_token("6N") == 6 * book.params > book.per_token("6N_non_embedding")
    # causal flash attention: the model convention and the executed forward agree exactly
    assert book.forward["attention"] == pytest.approx(book.hardware_forward["attention"])
    recomputed = ledger(config, 256, recompute="full")
    assert recomputed.per_token("hardware") - book.per_token("hardware") == pytest.approx(
        sum(book.hardware_forward.values()) - book.hardware_forward["lm_head"])
    tp2 = ledger(config, 256, tensor_parallel=2)
    assert tp2.hardware_forward["feedback_logits"] == pytest.approx(2 * book.hardware_forward["feedback_logits"])
    assert tp2.per_token("model") == book.per_token("model")
    transformer = ledger(ModelConfig(arch="transformer", vocab_size=4096, hidden_size=128, num_layers=4,
                                     num_heads=4), 256)
    assert "feedback_logits" not in transformer.forward and transformer.forward["mlp"] > 0
    with pytest.raises(ValueError, match="convention"):
        book.per_token("flops")
