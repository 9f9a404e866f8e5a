"""The chunked feedback solve against the dense T x T oracle: outputs and every gradient."""
import pytest
import torch

from kernels.feedback_solve import (
    feedback_solve,
    feedback_solve_chunked,
    feedback_solve_dense,
    feedback_solve_recurrent,
)
from kernels.feedback_solve.chunk import ChunkFeedbackSolve

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
