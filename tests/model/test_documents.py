"""Packed documents (model/documents.py): each document of a packed sequence gives exactly what it
gives alone, outputs and gradients, in the layer and in the LM; masks and positions; bad input."""
import warnings

import pytest
import torch

from model import ModelConfig, SessaLayer, SessaLM
from model.documents import (
    _flex_cache,
    block_causal_mask,
    document_attention,
    flex_document_block_mask,
    positions_from_doc_ids,
)
from model.generation import empty_caches

# Chunk size 8: documents straddle chunk boundaries, and one-token documents sit inside a chunk.
LENGTHS = [[5, 1, 11, 1, 9, 3, 2], [17, 1, 1, 13]]  # two packed rows of 32 positions
TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, feedback_chunk_size=8)
    return ModelConfig(**(fields | overrides))


def doc_ids_of(lengths: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])


def spans(row: list[int]):
    start = 0
    for length in row:
        yield start, start + length
        start += length


def test_positions_restart_at_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 2, 2, 3], [-1, -1, 4, 4, 4, 4, 4]])
    want = torch.tensor([[0, 1, 2, 0, 0, 1, 0], [0, 1, 0, 1, 2, 3, 4]])
    assert torch.equal(positions_from_doc_ids(ids), want)


def test_block_causal_mask_sees_own_document_past():
    ids = doc_ids_of(LENGTHS)
    mask = block_causal_mask(ids)
    T = ids.shape[1]
    for b in range(ids.shape[0]):
        want = torch.tensor([[j <= t and ids[b, j] == ids[b, t] for j in range(T)] for t in range(T)])
        assert torch.equal(mask[b, 0], want)


@pytest.mark.parametrize("tile", [5, 8, 256])
def test_tiled_document_attention_equals_the_full_mask(tile):
    ids = doc_ids_of(LENGTHS)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 32, 8, generator=gen, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    weights = _weights((2, 4, 32, 8), torch.float64)
    tiled = document_attention(q, k, v, ids, use_flex=False, tile=tile)
    grads = torch.autograd.grad((tiled * weights).sum(), (q, k, v))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(ids), enable_gqa=True)
    torch.testing.assert_close(tiled, full, atol=1e-12, rtol=1e-12)
    for got, want in zip(grads, torch.autograd.grad((full * weights).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("lengths,block", [(LENGTHS, 4), ([[40, 3, 1, 60, 30]], 8), ([[134]], 16),
                                           ([[1] * 20, [20]], 8), ([[64, 64]], 16)])
def test_flex_block_mask_equals_create_block_mask(lengths, block):
    from torch.nn.attention.flex_attention import create_block_mask

    ids = doc_ids_of(lengths)
    B, T = ids.shape
    starts = torch.arange(T) - positions_from_doc_ids(ids)
    want = create_block_mask(lambda b, h, q, kv: (kv <= q) & (kv >= starts[b, q]), B, None, T, T, device="cpu",
                             BLOCK_SIZE=block)
    got = flex_document_block_mask(ids, block)
    assert torch.equal(got.to_dense(), want.to_dense())
    for count, index in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        assert torch.equal(getattr(got, count), getattr(want, count)), count
        n = getattr(got, count)
        for b, i in zip(*torch.nonzero(n[:, 0] > 0, as_tuple=True)):
            k = int(n[b, 0, i])
            assert torch.equal(getattr(got, index)[b, 0, i, :k].sort().values,
                               getattr(want, index)[b, 0, i, :k].sort().values), (index, b, i)


def test_flex_attention_with_small_blocks_equals_the_full_mask():
    from torch.nn.attention.flex_attention import flex_attention

    ids = doc_ids_of(LENGTHS)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 32, 8, generator=gen) for h in (4, 2, 2))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile", UserWarning)
        flex = flex_attention(q, k, v, block_mask=flex_document_block_mask(ids, 4), enable_gqa=True)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(ids), enable_gqa=True)
    torch.testing.assert_close(flex, full, atol=1e-6, rtol=1e-6)


def test_flex_attention_mask_equals_sdpa_mask(monkeypatch):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    monkeypatch.setitem(_flex_cache, "fns", (flex_attention, create_block_mask))  # eager: no compiler on CPU
    ids = doc_ids_of(LENGTHS)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 32, 8, generator=gen) for h in (4, 2, 2))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile", UserWarning)
        flex = document_attention(q, k, v, ids, use_flex=True)
    torch.testing.assert_close(flex, document_attention(q, k, v, ids, use_flex=False), atol=1e-6, rtol=1e-6)


def _layer(cfg, dtype):
    layer = SessaLayer(cfg, init_seed=None).to(dtype)
    with torch.no_grad():  # non-trivial weights everywhere, including gamma
        gen = torch.Generator().manual_seed(0)
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.2)
    return layer


def _weights(shape, dtype):
    return torch.linspace(-1, 1, int(torch.tensor(shape).prod()), dtype=dtype).view(shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("feedback", [True, False], ids=["feedback", "no-feedback"])
def test_layer_packed_documents_equal_each_alone(impl, dtype, feedback):
    cfg = config(feedback_impl=impl, feedback=feedback)
    layer = _layer(cfg, dtype)
    ids = doc_ids_of(LENGTHS)
    x = torch.randn(32, 2, 32, dtype=dtype, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, _ = layer(x, doc_ids=ids, position_ids=positions_from_doc_ids(ids))
    weights = _weights(y.shape, dtype)
    (y * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    alone_grads = {n: torch.zeros_like(p) for n, p in layer.named_parameters()}
    for b, row in enumerate(LENGTHS):
        for start, end in spans(row):
            piece = x.detach()[start:end, b:b + 1].clone().requires_grad_(True)
            y_alone, _ = layer(piece)
            (y_alone * weights[start:end, b:b + 1]).sum().backward()
            torch.testing.assert_close(y[start:end, b:b + 1], y_alone, **TOLERANCES[dtype])
            torch.testing.assert_close(x.grad[start:end, b:b + 1], piece.grad, **TOLERANCES[dtype])
            for n, p in layer.named_parameters():
                alone_grads[n] += p.grad
            layer.zero_grad()
    for n, want in alone_grads.items():
        torch.testing.assert_close(packed_grads[n], want, **TOLERANCES[dtype], msg=n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_lm_packed_documents_equal_each_alone(dtype):
    model = SessaLM(config(feedback_impl="chunked"), init_seed=4).to(dtype)
    ids = doc_ids_of(LENGTHS)
    tokens = torch.randint(0, 61, (2, 33), generator=torch.Generator().manual_seed(2))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    loss = model(inputs, labels, doc_ids=ids, position_ids=positions_from_doc_ids(ids))
    loss.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone_grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b, row in enumerate(LENGTHS):
        for start, end in spans(row):
            loss_alone = model(inputs[b:b + 1, start:end], labels[b:b + 1, start:end])
            loss_alone.sum().backward()
            torch.testing.assert_close(loss[b:b + 1, start:end], loss_alone, **TOLERANCES[dtype])
            for n, p in model.named_parameters():
                alone_grads[n] += p.grad
            model.zero_grad()
    for n, want in alone_grads.items():
        torch.testing.assert_close(packed_grads[n], want, **TOLERANCES[dtype], msg=n)


def test_one_document_reproduces_the_unmasked_model():
    model = SessaLM(config(feedback_impl="chunked"), init_seed=4)
    tokens = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(3))
    ids = torch.zeros_like(tokens)
    torch.testing.assert_close(model(tokens, doc_ids=ids, position_ids=positions_from_doc_ids(ids)), model(tokens),
                               atol=1e-6, rtol=1e-6)  # one document: the same numbers by another kernel path
    position_ids = torch.arange(32).expand(2, 32)
    assert torch.equal(model(tokens, position_ids=position_ids), model(tokens))


def test_bad_document_input_is_refused():
    model = SessaLM(config())
    tokens = torch.randint(0, 61, (2, 16))
    with pytest.raises(ValueError, match=r"doc_ids must have shape \[batch, seq_len\] = \[2, 16\]"):
        model(tokens, doc_ids=torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        model(tokens, position_ids=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="doc_ids with caches"):
        model(tokens, caches=empty_caches(model, 2), doc_ids=torch.zeros(2, 16, dtype=torch.long))


def test_pipeline_stages_each_take_the_documents():
    cfg = config(feedback_impl="chunked")
    whole = SessaLM(cfg, init_seed=4).double()
    first = SessaLM(cfg, post_process=False, layer_numbers=[0], init_seed=4).double()
    last = SessaLM(cfg, pre_process=False, layer_numbers=[1], init_seed=4).double()
    ids = doc_ids_of(LENGTHS)
    documents = {"doc_ids": ids, "position_ids": positions_from_doc_ids(ids)}
    tokens = torch.randint(0, 61, (2, 33), generator=torch.Generator().manual_seed(5))
    last.set_input_tensor(first(tokens[:, :-1], **documents))
    staged = last(None, tokens[:, 1:], **documents)
    torch.testing.assert_close(staged, whole(tokens[:, :-1], tokens[:, 1:], **documents), atol=1e-12, rtol=1e-12)
