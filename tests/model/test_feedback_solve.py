"""The chunked feedback solve against the dense T x T oracle: outputs and every gradient."""
import pytest
import torch

from kernels.feedback_solve import (
    document_starts,
    feedback_solve,
    feedback_solve_chunked,
    feedback_solve_dense,
    feedback_solve_recurrent,
)
from kernels.feedback_solve.chunk import ChunkFeedbackSolve
from tests.kernels.packed_documents import PACKED_T, documents_of, packed_doc_ids, packed_vs_alone

TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-4)}


def make_inputs(batch, T, K, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_b = torch.randn(batch, T, K, generator=gen, dtype=dtype)
    k_b = torch.randn(batch, T, K, generator=gen, dtype=dtype)
    f = torch.randn(batch, T, V, generator=gen, dtype=dtype)
    gamma = 0.999 * torch.tanh(2 * torch.randn(batch, T, generator=gen, dtype=dtype))
    return [x.requires_grad_() for x in (q_b, k_b, f, gamma)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 257, 1000])
def test_chunked_matches_dense(T, chunk_size, dtype):
    inputs = make_inputs(2, T, 24, 20, dtype, seed=T)
    dense = feedback_solve_dense(*inputs)
    chunked = feedback_solve_chunked(*inputs, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, dense, **TOLERANCES[dtype])
    grad_out = torch.randn_like(dense)
    dense_grads = torch.autograd.grad(dense, inputs, grad_out)
    chunked_grads = torch.autograd.grad(chunked, inputs, grad_out)
    for name, got, want in zip(("q_b", "k_b", "f", "gamma"), chunked_grads, dense_grads):
        torch.testing.assert_close(got, want, **TOLERANCES[dtype], msg=lambda m: f"d{name}: {m}")


def test_recurrence_matches_dense():
    inputs = make_inputs(3, 40, 8, 5, torch.float64)
    torch.testing.assert_close(feedback_solve_recurrent(*inputs), feedback_solve_dense(*inputs))


@pytest.mark.parametrize("T", [1, 7, 21])
def test_chunked_gradcheck(T):
    inputs = make_inputs(2, T, 6, 5, torch.float64, seed=T)
    assert torch.autograd.gradcheck(lambda *x: ChunkFeedbackSolve.apply(*x, 4), inputs, fast_mode=True)


def test_solve_runs_in_float32_for_bfloat16_inputs():
    inputs = [x.detach().to(torch.bfloat16) for x in make_inputs(1, 100, 16, 8, torch.float32)]
    s = feedback_solve(*inputs, impl="chunked", chunk_size=16)
    assert s.dtype == torch.bfloat16
    exact = feedback_solve_dense(*(x.double() for x in inputs))
    # Only the final cast rounds: the error is bf16's half-ulp, not an accumulated one.
    torch.testing.assert_close(s.double(), exact, atol=0.0, rtol=2**-8)


def test_stability_bound():
    """||s||_inf <= ||f||_inf / (1 - gamma_max) (SESSA.md §2)."""
    q_b, k_b, f, _ = make_inputs(2, 300, 8, 4, torch.float64)
    gamma = torch.full((2, 300), 0.99, dtype=torch.float64)
    s = feedback_solve_chunked(q_b, k_b, f, gamma, chunk_size=32)
    assert s.abs().max() <= f.abs().max() / (1 - 0.99) + 1e-9


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="feedback_impl"):
        feedback_solve(*make_inputs(1, 4, 4, 4, torch.float32), impl="cuda-magic")


# ---------------------------------------------------------------------------------------------
# Document masking (doc_ids): a packed sequence equals each of its documents solved alone.
# ---------------------------------------------------------------------------------------------
PACKED_TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_packed_documents_equal_each_document_alone(impl, dtype):
    packed_vs_alone(
        lambda *x: feedback_solve(*x[:4], impl=impl, chunk_size=16, doc_ids=x[4]),
        lambda *x: feedback_solve(*x, impl=impl, chunk_size=16),
        dtype, PACKED_TOLERANCES[dtype],
    )


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_packed_chunked_matches_packed_dense(chunk_size):
    """Other chunkings (many chunks per document; one chunk for everything) against the masked oracle."""
    doc_ids = packed_doc_ids()
    starts = document_starts(doc_ids, 3, PACKED_T, doc_ids.device)
    inputs = make_inputs(3, PACKED_T, 8, 5, torch.float64, seed=4)
    dense = feedback_solve_dense(*inputs, starts)
    chunked = feedback_solve_chunked(*inputs, chunk_size, starts)
    torch.testing.assert_close(chunked, dense, **PACKED_TOLERANCES[torch.float64])
    grad_out = torch.randn_like(dense)
    for got, want in zip(torch.autograd.grad(chunked, inputs, grad_out), torch.autograd.grad(dense, inputs, grad_out)):
        torch.testing.assert_close(got, want, **PACKED_TOLERANCES[torch.float64])


def test_packed_recurrence_matches_dense():
    doc_ids = packed_doc_ids()
    starts = document_starts(doc_ids, 3, PACKED_T, doc_ids.device)
    inputs = make_inputs(3, PACKED_T, 8, 5, torch.float64)
    got = feedback_solve_recurrent(*inputs, starts)
    torch.testing.assert_close(got, feedback_solve_dense(*inputs, starts), **PACKED_TOLERANCES[torch.float64])
    # A document's first token has no past: s = f there.
    for b, a, _ in documents_of(doc_ids):
        torch.testing.assert_close(got[b, a], inputs[2][b, a], rtol=0, atol=0)


def test_packed_chunked_gradcheck():
    doc_ids = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 2, -1, -1]])
    starts = document_starts(doc_ids, 1, 11, doc_ids.device)
    inputs = make_inputs(1, 11, 6, 5, torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda *x: ChunkFeedbackSolve.apply(*x, 4, starts), inputs, fast_mode=True)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_one_document_is_bitwise_the_unmasked_solve(impl):
    """doc_ids with a single document takes the unmasked arithmetic: identical bits, output and gradients."""
    inputs = make_inputs(2, 50, 8, 6, torch.float32, seed=6)
    grad_out = torch.randn(2, 50, 6)
    plain = feedback_solve(*inputs, impl=impl, chunk_size=16)
    one_doc = feedback_solve(*inputs, impl=impl, chunk_size=16, doc_ids=torch.zeros(2, 50, dtype=torch.int64))
    assert torch.equal(plain, one_doc)
    for got, want in zip(torch.autograd.grad(one_doc, inputs, grad_out), torch.autograd.grad(plain, inputs, grad_out)):
        assert torch.equal(got, want)


def test_document_starts():
    doc_ids = torch.tensor([[0, 0, 1, 2, 2, 2, -1, -1], [-1, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    want = [[0, 0, 2, 3, 3, 3, 6, 6], [0, 1, 1, 1, 1, 5, 5, 5]]
    assert document_starts(doc_ids, 2, 8, doc_ids.device).tolist() == want


@pytest.mark.parametrize(
    "doc_ids,match",
    [(torch.zeros(1, 7, dtype=torch.int64), r"doc_ids must be \[B, T\]"), (torch.zeros(1, 8), "integer")],
)
def test_bad_doc_ids_are_rejected(doc_ids, match):
    with pytest.raises(ValueError, match=match):
        feedback_solve(*make_inputs(1, 8, 4, 4, torch.float32), impl="chunked", doc_ids=doc_ids)


def test_chunked_dispatch_uses_larger_blocks_with_the_same_result():
    """feedback_solve(impl="chunked") raises chunk_size toward chunk.BLOCK_ROWS rows while a [rows, T]
    tile fits chunk.TILE_ELEMENTS; outputs and gradients stay those of the chunk_size solve."""
    from kernels.feedback_solve import chunk

    assert chunk.block_rows(8192, 64) == 256 and chunk.block_rows(32768, 64) == 128
    assert chunk.block_rows(65536, 16) == 64 and chunk.block_rows(100, 512) == 512
    inputs = make_inputs(2, 300, 24, 20, torch.float64, seed=5)
    grad_out = torch.randn(2, 300, 20, dtype=torch.float64)

    def run(fn):
        leaves = [x.detach().requires_grad_() for x in inputs]
        out = fn(*leaves)
        out.backward(grad_out)
        return [out.detach()] + [x.grad for x in leaves]

    dispatched = run(lambda *x: feedback_solve(*x, impl="chunked", chunk_size=16))
    small_blocks = run(lambda *x: feedback_solve_chunked(*x, chunk_size=16))
    for got, want in zip(dispatched, small_blocks):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
