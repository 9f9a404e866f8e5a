"""The Triton feedback-solve kernels, run by the Triton interpreter on CPU, against the PyTorch paths.

How to run (CI does exactly this; the sm_90 compile-only checks in test_feedback_triton_sm90.py run
in their own subprocess, so one command covers both):
    TRITON_INTERPRET=1 python -m pytest tests/kernels -q
This module sets TRITON_INTERPRET=1 itself if it is unset, which works as long as nothing in the
pytest process imported kernels/feedback_solve/triton_kernels.py before it (the variable is read
when `@triton.jit` decorates the kernels).

Known interpreter gaps, and how the kernels are built around them:
  - bf16 `tl.dot` returns garbage in the interpreter: every operand is cast to fp32 (fp64 for fp64
    inputs) before `tl.dot`, so bf16 inputs are tested for real (the bf16 test below).
  - `input_precision` is ignored (numpy computes in the operand dtype): on the GPU the large
    contractions run with "tf32" for bf16/fp16 inputs (HALF_DOT_PRECISION) and everything else, and
    the diagonal solve always, with "ieee"; that choice is not exercised here.
  - `tl.device_assert` never fires and out-of-bounds unmasked loads are silent: the launchers
    validate shapes on the host, every load is masked, and work buffers are NaN-filled here so
    that a read of an unwritten element shows up as NaN in the outputs.
  - programs run one after another, so races are invisible: the sequential solves read back rows
    their own program stored, behind `tl.debug_barrier()`; nothing else is shared between programs.
  - `triton.autotune` with more than one config fails: the kernels use fixed constexpr tiles
    (INTERPRETER_TILES, small, for speed; GPU_TILES on the GPU).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from kernels.feedback_solve import document_starts, feedback_solve, feedback_solve_chunked, feedback_solve_dense
from kernels.feedback_solve import triton_chunk
from kernels.feedback_solve.triton_chunk import Tiles, TritonConfig, feedback_solve_triton, feedback_triton_fwd
from tests.kernels.packed_documents import PACKED_T, packed_doc_ids, packed_vs_alone

if not triton_chunk.is_interpreter() or not type(triton_chunk.feedback_lse_kernel).__name__.startswith("Interpreted"):
    pytest.fail(
        "the Triton kernels were imported without TRITON_INTERPRET=1; run "
        "`TRITON_INTERPRET=1 python -m pytest tests/kernels`",
        pytrace=False,
    )

TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-4)}
GRAD_NAMES = ("q_b", "k_b", "f", "gamma")


@pytest.fixture(autouse=True)
def nan_filled_work_buffers(monkeypatch):
    """Uninitialised work buffers become NaN, so reading an element no kernel wrote poisons the result."""

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_chunk, "_empty", empty)


def make_inputs(batch, T, K, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_b = torch.randn(batch, T, K, generator=gen, dtype=dtype)
    k_b = torch.randn(batch, T, K, generator=gen, dtype=dtype)
    f = torch.randn(batch, T, V, generator=gen, dtype=dtype)
    gamma = 0.999 * torch.tanh(2 * torch.randn(batch, T, generator=gen, dtype=dtype))
    return [x.requires_grad_() for x in (q_b, k_b, f, gamma)]


def outputs_and_grads(fn, inputs, grad_out):
    s = fn(*inputs)
    return s, torch.autograd.grad(s, inputs, grad_out)


def assert_matches(got, want, tolerances, what):
    s_got, grads_got = got
    s_want, grads_want = want
    torch.testing.assert_close(s_got, s_want, **tolerances, msg=lambda m: f"s vs {what}: {m}")
    for name, g_got, g_want in zip(GRAD_NAMES, grads_got, grads_want):
        torch.testing.assert_close(g_got, g_want, **tolerances, msg=lambda m: f"d{name} vs {what}: {m}")


# (T, chunk C, panel L): T = 1; T < C; T = C; several panels with a ragged last chunk and panel;
# one panel; L = C (every chunk its own panel).
CASES = [(1, 16, 32), (5, 16, 32), (16, 16, 32), (37, 16, 32), (130, 16, 32), (100, 32, 128), (70, 16, 16)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("T,chunk_size,panel_size", CASES, ids=[f"T{t}-C{c}-L{p}" for t, c, p in CASES])
def test_matches_chunked_and_dense(T, chunk_size, panel_size, dtype):
    """Output and all four gradients; batch 2, K = 24 and V = 20 (not powers of two, K != V)."""
    inputs = make_inputs(2, T, 24, 20, dtype, seed=T)
    grad_out = torch.randn(2, T, 20, dtype=dtype, generator=torch.Generator().manual_seed(1))
    triton_out = outputs_and_grads(lambda *x: feedback_solve_triton(*x, chunk_size, panel_size), inputs, grad_out)
    assert triton_out[0].dtype == dtype
    chunked_out = outputs_and_grads(lambda *x: feedback_solve_chunked(*x, chunk_size), inputs, grad_out)
    dense_out = outputs_and_grads(feedback_solve_dense, inputs, grad_out)
    assert_matches(triton_out, chunked_out, TOLERANCES[dtype], "chunked")
    assert_matches(triton_out, dense_out, TOLERANCES[dtype], "dense")


@pytest.mark.parametrize("K,V", [(40, 9), (7, 33)])
def test_feature_sizes_and_tiles(K, V, monkeypatch):
    """Other K/V (several K blocks, V smaller/larger than a tile) and rectangular, per-kernel tiles."""
    config = TritonConfig(lse=Tiles(16, 32, 16), probs=Tiles(32, 16, 32), dlogits=Tiles(16, 32, 16),
                          matmul=Tiles(32, 16, 16), solve_block_v=32, solve_block_j=16, max_solve_block=128,
                          solve_num_warps=1, solve_num_stages=1)
    monkeypatch.setattr(triton_chunk, "INTERPRETER_CONFIG", config)
    inputs = make_inputs(2, 45, K, V, torch.float64, seed=K)
    grad_out = torch.randn(2, 45, V, dtype=torch.float64)
    triton_out = outputs_and_grads(lambda *x: feedback_solve_triton(*x, 16, 32), inputs, grad_out)
    assert_matches(triton_out, outputs_and_grads(feedback_solve_dense, inputs, grad_out), TOLERANCES[torch.float64], "dense")


def test_gpu_blocking_on_cpu(monkeypatch):
    """The GPU configuration's structure: chunk_size 64 solved as 16-row diagonal blocks (max_solve_block)
    inside 64-row panels, with the GPU's 64-wide tiles and 32 value columns per solve program."""
    gpu = triton_chunk.GPU_CONFIG
    monkeypatch.setattr(triton_chunk, "INTERPRETER_CONFIG", gpu)
    inputs = make_inputs(2, 150, 24, 40, torch.float32, seed=11)
    grad_out = torch.randn(2, 150, 40)
    triton_out = outputs_and_grads(lambda *x: feedback_solve_triton(*x, 64, 64), inputs, grad_out)
    assert_matches(triton_out, outputs_and_grads(feedback_solve_dense, inputs, grad_out), TOLERANCES[torch.float32], "dense")


def test_row_logsumexp():
    """lse[t] = logsumexp_{j<t} q_t . k_j / sqrt(K), and 0 for row 0, as the chunked path saves it."""
    q_b, k_b, f, gamma = (x.detach() for x in make_inputs(2, 50, 24, 20, torch.float64))
    _, lse = feedback_triton_fwd(q_b, k_b, f, gamma, chunk_size=16, panel_size=32)
    logits = (q_b @ k_b.transpose(1, 2)) * 24**-0.5
    logits = logits.masked_fill(~torch.ones(50, 50, dtype=torch.bool).tril(-1), float("-inf"))
    want = torch.logsumexp(logits, -1).nan_to_num(neginf=0.0)
    torch.testing.assert_close(lse, want)


def test_gradcheck_fp64():
    """Finite differences through the custom op's registered autograd (fast mode)."""
    inputs = make_inputs(2, 21, 6, 5, torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda *x: feedback_solve_triton(*x, 16, 16), inputs, fast_mode=True)


def test_bfloat16_inputs_solve_in_float32():
    """bf16 in, bf16 out, gradients in the inputs' dtypes; only the final cast rounds the output."""
    inputs = [x.detach().to(torch.bfloat16).requires_grad_() for x in make_inputs(2, 70, 24, 20, torch.float32)]
    s = feedback_solve_triton(*inputs, 16, 32)
    assert s.dtype == torch.bfloat16
    exact = feedback_solve_dense(*(x.detach().double() for x in inputs))
    torch.testing.assert_close(s.double(), exact, atol=0.0, rtol=2**-8)
    grads = torch.autograd.grad(s, inputs, torch.ones_like(s))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 4
    # The backward uses s as saved (bf16, like the output), so compare with the chunked path loosely.
    chunked = torch.autograd.grad(feedback_solve_chunked(*inputs, 16), inputs, torch.ones_like(s))
    for name, got, want in zip(GRAD_NAMES, grads, chunked):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=2e-2, msg=lambda m: f"d{name}: {m}")


def test_non_contiguous_inputs():
    """q_b, k_b as column halves of one projection (as the layer splits them), f and gamma strided."""
    gen = torch.Generator().manual_seed(5)
    qk = torch.randn(2, 40, 2 * 24, dtype=torch.float64, generator=gen, requires_grad=True)
    f_t = torch.randn(2, 20, 40, dtype=torch.float64, generator=gen, requires_grad=True)
    g_raw = torch.randn(2, 40, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    args = lambda: (*qk.split(24, dim=-1), f_t.transpose(1, 2), 0.9 * torch.tanh(g_raw[..., 1]))  # noqa: E731
    grad_out = torch.randn(2, 40, 20, dtype=torch.float64)
    got = feedback_solve_triton(*args(), 16, 32)
    want = feedback_solve_dense(*args())
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    grads = torch.autograd.grad(got, (qk, f_t, g_raw), grad_out)
    grads_want = torch.autograd.grad(want, (qk, f_t, g_raw), grad_out)
    for got_g, want_g in zip(grads, grads_want):
        torch.testing.assert_close(got_g, want_g, **TOLERANCES[torch.float64])


def test_dispatcher_selects_triton():
    inputs = make_inputs(1, 33, 24, 20, torch.float32)
    s = feedback_solve(*inputs, impl="triton", chunk_size=16)
    torch.testing.assert_close(s, feedback_solve_dense(*inputs), **TOLERANCES[torch.float32])


def test_torch_compile_traces_the_custom_op():
    """fullgraph torch.compile (aot_eager: no inductor codegen) through forward and backward."""
    inputs = make_inputs(2, 40, 24, 20, torch.float64, seed=7)
    grad_out = torch.randn(2, 40, 20, dtype=torch.float64)
    compiled = torch.compile(lambda *x: feedback_solve_triton(*x, 16, 32), backend="aot_eager", fullgraph=True)
    got = outputs_and_grads(compiled, inputs, grad_out)
    assert_matches(got, outputs_and_grads(feedback_solve_dense, inputs, grad_out), TOLERANCES[torch.float64], "dense")


def test_opcheck():
    """Schema, fake (meta) kernels and autograd registration of the torch.library ops."""
    inputs = make_inputs(2, 20, 6, 5, torch.float64, seed=9)
    torch.library.opcheck(torch.ops.sessa.feedback_solve_triton_fwd.default, (*inputs, 16, 16))
    s, lse = torch.ops.sessa.feedback_solve_triton_fwd(*(x.detach() for x in inputs), 16, 16)
    q_b, k_b, _, gamma = (x.detach() for x in inputs)
    torch.library.opcheck(
        torch.ops.sessa.feedback_solve_triton_bwd.default, (q_b, k_b, gamma, s, lse, torch.randn_like(s), 16, 16)
    )


def test_stability_bound():
    """||s||_inf <= ||f||_inf / (1 - gamma_max) with a constant gain close to 1 (SESSA.md §2)."""
    q_b, k_b, f, _ = (x.detach() for x in make_inputs(2, 130, 8, 4, torch.float64))
    gamma = torch.full((2, 130), 0.99, dtype=torch.float64)
    s = feedback_solve_triton(q_b, k_b, f, gamma, 32, 64)
    assert s.abs().max() <= f.abs().max() / (1 - 0.99) + 1e-9
    torch.testing.assert_close(s, feedback_solve_dense(q_b, k_b, f, gamma))


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(chunk_size=24), "power of two"), (dict(chunk_size=256), "power of two"),
     (dict(chunk_size=16, panel_size=40), "multiple of chunk_size")],
)
def test_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        feedback_solve_triton(*make_inputs(1, 8, 4, 4, torch.float32), **kwargs)


def test_rejects_bad_shapes():
    q_b, k_b, f, gamma = make_inputs(1, 8, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="gamma"):
        feedback_solve_triton(q_b, k_b, f, gamma[:, :4])


def test_sessa_layer_with_triton_feedback():
    """feedback_impl="triton" in a SessaLayer (on CPU: the interpreter) equals the chunked solve,
    output and every parameter gradient; the layer hands the kernels [T, B, D]-transposed views."""
    from model import ModelConfig, SessaLayer

    results = {}
    for impl in ("chunked", "triton"):
        config = ModelConfig(vocab_size=61, hidden_size=24, num_layers=1, num_heads=2, feedback_impl=impl,
                             feedback_chunk_size=16)
        layer = SessaLayer(config).double()
        torch.manual_seed(0)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.2)
        x = torch.randn(37, 2, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y, _ = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results[impl] = {"output": y.detach(), **{n: p.grad for n, p in layer.named_parameters()}}
    for name, want in results["chunked"].items():
        torch.testing.assert_close(results["triton"][name], want, **TOLERANCES[torch.float64], msg=name)


# ---------------------------------------------------------------------------------------------
# Document masking (doc_ids)
# ---------------------------------------------------------------------------------------------
def test_packed_documents_equal_each_document_alone():
    """fp32: a packed sequence (documents straddling chunks and panels, one-token documents,
    padding) equals each document solved alone by the kernels: output and all four gradients."""
    packed_vs_alone(
        lambda *x: feedback_solve(*x[:4], impl="triton", chunk_size=16, doc_ids=x[4]),
        lambda *x: feedback_solve_triton(*x, 16, 32),
        torch.float32, dict(atol=1e-5, rtol=1e-5),
    )


@pytest.mark.parametrize("chunk_size,panel_size", [(16, 32), (32, 64)])
def test_packed_matches_chunked_and_dense_fp64(chunk_size, panel_size):
    doc_ids = packed_doc_ids()
    batch = doc_ids.shape[0]
    starts = document_starts(doc_ids, batch, PACKED_T, doc_ids.device)
    inputs = make_inputs(batch, PACKED_T, 24, 20, torch.float64, seed=8)
    grad_out = torch.randn(batch, PACKED_T, 20, dtype=torch.float64)
    triton = lambda *x: feedback_solve_triton(*x, chunk_size, panel_size, starts=starts)  # noqa: E731
    got = outputs_and_grads(triton, inputs, grad_out)
    chunked = outputs_and_grads(lambda *x: feedback_solve_chunked(*x, chunk_size, starts), inputs, grad_out)
    dense = outputs_and_grads(lambda *x: feedback_solve_dense(*x, starts), inputs, grad_out)
    assert_matches(got, chunked, TOLERANCES[torch.float64], "chunked")
    assert_matches(got, dense, TOLERANCES[torch.float64], "dense")


def test_packed_gpu_blocking_on_cpu(monkeypatch):
    """The GPU's tiles (64-wide, whole tiles skipped before a document) and 16-row diagonal blocks."""
    monkeypatch.setattr(triton_chunk, "INTERPRETER_CONFIG", triton_chunk.GPU_CONFIG)
    doc_ids = packed_doc_ids([[1, 63, 66, 20], [150]])
    starts = document_starts(doc_ids, 2, 150, doc_ids.device)
    inputs = make_inputs(2, 150, 24, 40, torch.float32, seed=12)
    grad_out = torch.randn(2, 150, 40)
    got = outputs_and_grads(lambda *x: feedback_solve_triton(*x, 64, 64, starts=starts), inputs, grad_out)
    want = outputs_and_grads(lambda *x: feedback_solve_dense(*x, starts), inputs, grad_out)
    assert_matches(got, want, TOLERANCES[torch.float32], "dense")


def test_one_document_is_bitwise_the_unmasked_solve():
    inputs = make_inputs(2, 40, 24, 20, torch.float32, seed=13)
    grad_out = torch.randn(2, 40, 20)
    plain = outputs_and_grads(lambda *x: feedback_solve(*x, impl="triton", chunk_size=16), inputs, grad_out)
    one_doc = outputs_and_grads(
        lambda *x: feedback_solve(*x, impl="triton", chunk_size=16, doc_ids=torch.zeros(2, 40, dtype=torch.int32)),
        inputs, grad_out,
    )
    assert torch.equal(plain[0], one_doc[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], one_doc[1]))


def test_row_logsumexp_within_documents():
    """lse[t] covers keys starts[t] <= j < t; 0 at each document's first token."""
    doc_ids = packed_doc_ids([[1, 20, 1, 28], [50]])
    starts = document_starts(doc_ids, 2, 50, doc_ids.device)
    q_b, k_b, f, gamma = (x.detach() for x in make_inputs(2, 50, 24, 20, torch.float64))
    _, lse = feedback_triton_fwd(q_b, k_b, f, gamma, 16, 32, starts=starts.to(torch.int32))
    logits = (q_b @ k_b.transpose(1, 2)) * 24**-0.5
    keys = torch.arange(50)
    visible = (keys[None, None, :] < keys[None, :, None]) & (keys[None, None, :] >= starts[:, :, None])
    want = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), -1).nan_to_num(neginf=0.0)
    torch.testing.assert_close(lse, want)


def test_opcheck_with_documents():
    inputs = [x.detach() for x in make_inputs(2, 20, 6, 5, torch.float64, seed=9)]
    starts = document_starts(packed_doc_ids([[7, 1, 12], [20]]), 2, 20, torch.device("cpu")).to(torch.int32)
    torch.library.opcheck(torch.ops.sessa.feedback_solve_triton_fwd.default, (*inputs, 16, 16, starts))
    s, lse = torch.ops.sessa.feedback_solve_triton_fwd(*inputs, 16, 16, starts)
    q_b, k_b, _, gamma = inputs
    bwd_args = (q_b, k_b, gamma, s, lse, torch.randn_like(s), 16, 16, starts)
    torch.library.opcheck(torch.ops.sessa.feedback_solve_triton_bwd.default, bwd_args)


def test_document_ends():
    starts = document_starts(packed_doc_ids([[1, 20, 1, 3], [25]]), 2, 25, torch.device("cpu")).to(torch.int32)
    ends = triton_chunk._document_ends(starts)
    assert ends[0].tolist() == [1] + [21] * 20 + [22] + [25] * 3
    assert ends[1].tolist() == [25] * 25


def test_torch_compile_with_documents():
    """fullgraph torch.compile through the dispatcher with doc_ids (document_starts is traced too)."""
    doc_ids = packed_doc_ids([[9, 1, 30], [40]])
    inputs = make_inputs(2, 40, 24, 20, torch.float64, seed=14)
    grad_out = torch.randn(2, 40, 20, dtype=torch.float64)
    solve = lambda *x: feedback_solve(*x, impl="triton", chunk_size=16, doc_ids=doc_ids)  # noqa: E731
    got = outputs_and_grads(torch.compile(solve, backend="aot_eager", fullgraph=True), inputs, grad_out)
    starts = document_starts(doc_ids, 2, 40, doc_ids.device)
    assert_matches(got, outputs_and_grads(lambda *x: feedback_solve_dense(*x, starts), inputs, grad_out),
                   TOLERANCES[torch.float64], "dense")
