"""Triton path for the Sessa feedback solve: launchers, autograd, and the torch.library ops.

Three layers (as in fla/ops):
  1. `feedback_triton_fwd` / `feedback_triton_bwd`: host loops over panels that call the kernels of
     triton_kernels.py (see README.md here for the algorithm).
  2. `torch.ops.sessa.feedback_solve_triton_fwd/_bwd`: `torch.library.custom_op`s with fake (meta)
     implementations and `register_autograd`, so torch.compile traces through them as opaque ops.
  3. `feedback_solve_triton`: validates and documents the shapes; this is what
     `kernels.feedback_solve.feedback_solve(..., impl="triton")` calls.

On CUDA tensors the kernels are compiled for the GPU. On CPU tensors they only run under the Triton
interpreter (`TRITON_INTERPRET=1` set before this module is first imported); that is how the tests
run them. Saved for backward: q_b, k_b, gamma, s (in f's dtype) and the row log-sum-exp; nothing T x T.
"""
import contextlib
from dataclasses import dataclass

import torch
import triton

from .triton_kernels import (
    feedback_dlogits_kernel,
    feedback_lse_kernel,
    feedback_probs_kernel,
    feedback_solve_bwd_kernel,
    feedback_solve_fwd_kernel,
    panel_matmul_kernel,
)

__all__ = [
    "Tiles",
    "TritonConfig",
    "feedback_piece_adjoint",
    "feedback_piece_fwd",
    "feedback_solve_triton",
    "feedback_triton_bwd",
    "feedback_triton_fwd",
    "is_interpreter",
]


@dataclass(frozen=True)
class Tiles:
    """One kernel's tile sizes (constexprs; powers of two >= 16) and launch parameters."""

    block_m: int  # rows of the output tile
    block_n: int  # columns of the output tile
    block_k: int  # reduction step: over K (logits), V (lam . s) or positions (P @ X)
    num_warps: int = 8
    num_stages: int = 2


@dataclass(frozen=True)
class TritonConfig:
    """Per-kernel tiles. Fixed (no autotuning): CPU runs are deterministic and the sm_90 compile
    check covers exactly what ships. The GPU defaults compile without register spills for bf16,
    fp16 and fp32 inputs (tests/kernels/test_feedback_triton_sm90.py)."""

    lse: Tiles
    probs: Tiles
    dlogits: Tiles
    matmul: Tiles
    solve_block_v: int  # value columns per program of the sequential diagonal solve
    solve_block_j: int  # rows per step when a diagonal block sums its panel's solved rows
    max_solve_block: int  # the largest diagonal block C (product-series inverse); larger chunk_size is
    solve_num_warps: int  # solved as C-row sub-blocks (the same computation, see README)
    solve_num_stages: int
    lse_segments: int = 1  # the row log-sum-exp splits the keys into at most this many segments


GPU_CONFIG = TritonConfig(
    lse=Tiles(64, 64, 32),  # BK = 64 spills 16 bytes for fp32 inputs (tf32x3)
    probs=Tiles(64, 64, 64),
    dlogits=Tiles(64, 64, 64),
    matmul=Tiles(64, 64, 64),
    solve_block_v=32,
    solve_block_j=32,
    max_solve_block=16,  # "ieee" (FMA) C x C dots: C = 32 spills for fp32, C = 64 spills 10 KB
    solve_num_warps=4,
    solve_num_stages=3,  # pipelines the loads of the in-panel sum (rows stored before the barrier)
    lse_segments=8,  # T = 8192: 128 row tiles x 8 segments of 1024 keys (was 128 programs, the last 128 tiles long)
)
# The interpreter's cost grows with programs x loop steps x ops, not with FLOPs: few, small tiles.
# Tests may monkeypatch this (e.g. max_solve_block=16 to run the GPU's blocking on CPU).
_SMALL = Tiles(32, 32, 16, num_warps=1, num_stages=1)
INTERPRETER_CONFIG = TritonConfig(
    lse=_SMALL, probs=_SMALL, dlogits=_SMALL, matmul=_SMALL, solve_block_v=16, solve_block_j=32, max_solve_block=128,
    solve_num_warps=1, solve_num_stages=1, lse_segments=3,
)
# Rows (forward) / columns (backward) of P materialised at once: an [L, T] buffer in fp32.
DEFAULT_PANEL_SIZE = 512
# tl.dot input precision on the GPU (the interpreter ignores it and computes in the operand dtype).
# Every operand is fp32 (fp64 for fp64 inputs) when it reaches tl.dot. Large contractions: "tf32"
# when any input is bf16/fp16 (exact for the bf16/fp16-valued q_b/k_b loads; rounds the fp32
# intermediates P, s, lam to 10 mantissa bits, below the bf16 output's 8), "tf32x3" (3 TF32 MMAs,
# about fp32 accuracy) for fp32 inputs. The diagonal solve is exact fp32 FMA ("ieee") on 16 x 16
# blocks. fp64 runs "ieee" everywhere (a test dtype).
HALF_DOT_PRECISION = "tf32"
FP32_DOT_PRECISION = "tf32x3"
SOLVE_DOT_PRECISION = "ieee"


# Read once: `@triton.jit` decided interpreter-or-compiled when triton_kernels.py was imported.
_INTERPRET = bool(triton.knobs.runtime.interpret)


def is_interpreter() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    return _INTERPRET


def check_triton_device(device: torch.device) -> None:
    """Raises unless the kernels can run on `device`: CUDA, or anything under the interpreter."""
    if device.type != "cuda" and not is_interpreter():
        raise RuntimeError(
            f"feedback_impl='triton' on {device.type} tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before importing triton (slow; tests only), or use impl='chunked'"
        )


def _config(device: torch.device) -> TritonConfig:
    return GPU_CONFIG if device.type == "cuda" and not is_interpreter() else INTERPRETER_CONFIG


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_precisions(acc: torch.dtype, *tensors: torch.Tensor) -> tuple[str, str]:
    """(large contractions, diagonal solve) input precisions for tl.dot."""
    if acc == torch.float64:
        return "ieee", "ieee"
    if all(t.dtype in (torch.float32, torch.float64) for t in tensors):
        return FP32_DOT_PRECISION, SOLVE_DOT_PRECISION
    return HALF_DOT_PRECISION, SOLVE_DOT_PRECISION


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _empty(shape, dtype, device) -> torch.Tensor:
    """Work buffers are left uninitialised; tests patch this to fill them with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def _document_ends(starts: torch.Tensor) -> torch.Tensor:
    """[B, T] int32: the first position after t's document, from contiguous document starts."""
    T = starts.shape[1]
    positions = torch.arange(T, device=starts.device, dtype=starts.dtype)
    next_start = torch.where(starts == positions, positions, T)  # T where t does not start a document
    ends = torch.full_like(starts, T)
    ends[:, :-1] = next_start[:, 1:].flip(1).cummin(1).values.flip(1)
    return ends


def _panel_rows(T: int, chunk_size: int, panel_size: int) -> int:
    padded_T = triton.cdiv(T, chunk_size) * chunk_size
    return min(panel_size, padded_T)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _qk_native(q_b: torch.Tensor, k_b: torch.Tensor) -> bool:
    """bf16/fp16 q, k enter the logits' tl.dot as loaded (compiled kernels only; see triton_kernels)."""
    return not is_interpreter() and q_b.dtype == k_b.dtype and q_b.dtype in (torch.bfloat16, torch.float16)


def _lse_segment(T: int, tiles: Tiles, segments: int) -> int:
    """Keys per segment of the row log-sum-exp: T split into at most `segments`, whole key tiles."""
    return triton.cdiv(triton.cdiv(T, segments), tiles.block_n) * tiles.block_n


def _launch_lse(q_b, k_b, starts, acc, scale, config, precision):
    """Row log-sum-exp [B, T] (0 for rows with no visible key): partials per key segment, merged."""
    batch, T, K = q_b.shape
    tiles = config.lse
    segment = _lse_segment(T, tiles, config.lse_segments)
    part = _empty((batch, triton.cdiv(T, segment), T), acc, q_b.device)
    grid = (triton.cdiv(T, tiles.block_m), part.shape[1], batch)
    feedback_lse_kernel[grid](
        q_b, k_b, part if starts is None else starts, part, T, K, scale,
        BT=tiles.block_m, BS=tiles.block_n, BK=tiles.block_k, SEG=segment, DOT_PRECISION=precision,
        QK_NATIVE=_qk_native(q_b, k_b), HAS_DOCS=starts is not None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    lse = part.logsumexp(1)
    return lse.masked_fill_(lse == float("-inf"), 0.0)


def _launch_probs(q_b, k_b, lse, starts, panel, scale, rows, cols, tiles, precision, column_gamma=None):
    """P[t, j] for t in rows, j in cols into the row panel `panel` [B, L, T] at [t - rows[0], j]; or,
    given `column_gamma`, B[t, j] = gamma_t P[t, j] into a column panel at [j - cols[0], t].
    `starts` [B, T] int32 (or None): document starts, keys j < starts[t] get 0."""
    transposed = column_gamma is not None
    batch, T, K = q_b.shape
    (t0, t1), (j0, j1) = rows, cols
    if transposed:
        p_t0, p_j0, s_pt, s_pj = 0, j0, 1, panel.stride(1)
    else:
        p_t0, p_j0, s_pt, s_pj = t0, 0, panel.stride(1), 1
    grid = (triton.cdiv(t1 - t0, tiles.block_m), triton.cdiv(j1 - j0, tiles.block_n), batch)
    feedback_probs_kernel[grid](
        q_b, k_b, lse, column_gamma if transposed else lse, lse if starts is None else starts, panel, T, K, scale,
        t0, t1, j0, j1, p_t0, p_j0, panel.stride(0), s_pt, s_pj,
        BM=tiles.block_m, BN=tiles.block_n, BK=tiles.block_k, DOT_PRECISION=precision, TIMES_GAMMA=transposed,
        QK_NATIVE=_qk_native(q_b, k_b), HAS_DOCS=starts is not None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def _launch_matmul(a, a_strides, x, out, M, N, J, tiles, precision, accumulate=False, docs=None):
    """out[b, :M, :N] (+)= a[b, :M, :J] @ x[b, :J, :N].

    `a` is any strided [B, M, J] view given by (its tensor, (s_b, s_m, s_j)); x and out are row-major
    views ([B, J, N], [B, M, N]) with unit stride along N. `docs` = (mode, bounds [B, T], row0, red0)
    skips reduction blocks that are zero outside documents (see panel_matmul_kernel's DOCS).
    """
    assert x.stride(-1) == 1 and out.stride(-1) == 1
    batch = out.shape[0]
    mode, bounds, row0, red0 = docs if docs is not None else (0, out, 0, 0)
    grid = (triton.cdiv(M, tiles.block_m), triton.cdiv(N, tiles.block_n), batch)
    panel_matmul_kernel[grid](
        a, x, out, bounds, M, N, J, row0, red0,
        *a_strides, x.stride(0), x.stride(1), out.stride(0), out.stride(1), bounds.stride(0),
        BM=tiles.block_m, BN=tiles.block_n, BJ=tiles.block_k, ACCUMULATE=accumulate, DOT_PRECISION=precision,
        DOCS=mode,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def _launch_solve(kernel, panel, context, rhs, out, rows, has_context, solve_block, config, precisions, gamma=None):
    """One program per (value block, sequence) walks the panel's diagonal blocks of `solve_block` rows."""
    batch, T, V = out.shape
    grid = (triton.cdiv(V, config.solve_block_v), batch)
    extra = (gamma,) if gamma is not None else ()  # the forward reads gamma; the backward panel holds B
    kernel[grid](
        panel, context, rhs, *extra, out, T, V, *rows, panel.stride(0), context.stride(0),
        BC=solve_block, BJ=config.solve_block_j, BV=config.solve_block_v, LOG2_BC=solve_block.bit_length() - 1,
        HAS_CONTEXT=has_context, DOT_PRECISION=precisions[0], SOLVE_PRECISION=precisions[1],
        num_warps=config.solve_num_warps, num_stages=config.solve_num_stages,
    )


def feedback_triton_fwd(q_b, k_b, f, gamma, chunk_size, panel_size=DEFAULT_PANEL_SIZE, config=None, starts=None):
    """s = (I - diag(gamma) alpha)^-1 f. Contiguous inputs; returns s [B, T, V] and lse [B, T] in the
    compute dtype (fp32, or fp64 for fp64 f). `starts`: optional contiguous int32 [B, T] document
    starts (documents.document_starts); row t then sees keys starts[t] <= j < t only."""
    batch, T, K = q_b.shape
    V = f.shape[-1]
    config = config or _config(f.device)
    acc = _compute_dtype(f.dtype)
    precision, solve_precision = _dot_precisions(acc, q_b, k_b, f)
    scale = K**-0.5
    s = _empty((batch, T, V), acc, f.device)
    lse = _launch_lse(q_b, k_b, starts, acc, scale, config, precision)

    L = _panel_rows(T, chunk_size, panel_size)
    solve_block = min(chunk_size, config.max_solve_block)
    panel = _empty((batch, L, T), acc, f.device)  # P of L rows against all keys
    context = _empty((batch, L, V), acc, f.device)  # the panel rows' context from earlier panels
    for r0 in range(0, T, L):
        r1 = min(r0 + L, T)
        _launch_probs(q_b, k_b, lse, starts, panel, scale, (r0, r1), (0, r1), config.probs, precision)
        if r0 > 0:  # context[t] = sum_{j < r0} P[t, j] s[j]: a [L, r0] @ [r0, V] GEMM
            _launch_matmul(panel, panel.stride(), s, context, r1 - r0, V, r0, config.matmul, precision,
                           docs=(1, starts, r0, 0) if starts is not None else None)
        _launch_solve(feedback_solve_fwd_kernel, panel, context, f, s, (r0, r1), r0 > 0, solve_block, config,
                      (precision, solve_precision), gamma=gamma)
    return s, lse


def feedback_triton_bwd(
    q_b, k_b, gamma, s, lse, grad_s, chunk_size, panel_size=DEFAULT_PANEL_SIZE, config=None, starts=None
):
    """Returns (dq_b, dk_b, df = lam, dgamma = delta) in the compute dtype (lse's dtype); `starts` as
    in feedback_triton_fwd."""
    batch, T, K = q_b.shape
    V = s.shape[-1]
    config = config or _config(s.device)
    acc = lse.dtype
    precision, solve_precision = _dot_precisions(acc, q_b, k_b, s, grad_s)
    scale = K**-0.5
    L = _panel_rows(T, chunk_size, panel_size)
    solve_block = min(chunk_size, config.max_solve_block)
    panel = _empty((batch, L, T), acc, s.device)
    context = _empty((batch, L, V), acc, s.device)

    ends = None if starts is None else _document_ends(starts)
    # 1. lam = (I - B)^-T grad_s over column panels of B, last to first.
    lam = _empty((batch, T, V), acc, s.device)
    for c0 in range((T - 1) // L * L, -1, -L):
        c1 = min(c0 + L, T)
        _launch_probs(q_b, k_b, lse, starts, panel, scale, (c0, T), (c0, c1), config.probs, precision,
                      column_gamma=gamma)
        if c1 < T:  # context[j] = sum_{t >= c1} B[t, j] lam_t: [L, T - c1] @ [T - c1, V]
            _launch_matmul(panel[:, :, c1:], panel.stride(), lam[:, c1:], context, c1 - c0, V, T - c1,
                           config.matmul, precision, docs=(2, ends, c0, c1) if ends is not None else None)
        _launch_solve(feedback_solve_bwd_kernel, panel, context, grad_s, lam, (c0, c1), c1 < T, solve_block, config,
                      (precision, solve_precision))

    # 2. delta, dq, dk over row panels: the flash-attention backward with values s and dO = lam,
    #    as GEMMs over a materialised [L, T] panel of P and then of dL/dlogits.
    dq = _empty((batch, T, K), acc, s.device)
    dk = torch.zeros((batch, T, K), dtype=acc, device=s.device)  # accumulated over row panels
    delta = _empty((batch, T), acc, s.device)
    for r0 in range(0, T, L):
        r1 = min(r0 + L, T)
        n = r1 - r0
        _launch_probs(q_b, k_b, lse, starts, panel, scale, (r0, r1), (0, r1), config.probs, precision)
        # u[t] = sum_{j<t} P[t, j] s[j]; delta[t] = lam[t] . u[t] = dL/dgamma[t]
        row_docs = (1, starts, r0, 0) if starts is not None else None
        _launch_matmul(panel, panel.stride(), s, context, n, V, r1, config.matmul, precision, docs=row_docs)
        delta[:, r0:r1] = (lam[:, r0:r1] * context[:, :n]).sum(-1)
        tiles = config.dlogits
        grid = (triton.cdiv(n, tiles.block_m), triton.cdiv(r1, tiles.block_n), batch)
        feedback_dlogits_kernel[grid](
            panel, lam, s, gamma, delta, delta if starts is None else starts, T, V, scale, r0, r1, r1, panel.stride(0),
            BM=tiles.block_m, BN=tiles.block_n, BV=tiles.block_k, DOT_PRECISION=precision, HAS_DOCS=starts is not None,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
        # dq[t] = sum_j dlogits[t, j] k[j]: [n, r1] @ [r1, K]
        _launch_matmul(panel, panel.stride(), k_b, dq[:, r0:r1], n, K, r1, config.matmul, precision, docs=row_docs)
        # dk[j] += sum_t dlogits[t, j] q[t]: [r1, n] @ [n, K] (the panel read transposed)
        s_b, s_t, s_j = panel.stride()
        _launch_matmul(panel, (s_b, s_j, s_t), q_b[:, r0:r1], dk, r1, K, n, config.matmul, precision,
                       accumulate=True, docs=(2, ends, 0, r0) if ends is not None else None)
    return dq, dk, lam, delta


def _piece_solve_block(T: int, config: TritonConfig) -> int:
    """Diagonal block of a piece's solve: a power of two >= 16 (tl.dot's least), at most the config's."""
    return max(16, min(config.max_solve_block, triton.next_power_of_2(T)))


def feedback_piece_fwd(q_b, k_b, f, gamma, lse, context, scale, starts=None, panel_size=DEFAULT_PANEL_SIZE):
    """One piece of a longer sequence (context parallelism): s = (I - diag(gamma) P)^-1 (f + gamma context).

    P[t, j] = exp(q_t . k_j * scale - lse_t) for keys j < t of the piece (0 elsewhere); lse [B, T] is
    each row's log-sum-exp over its whole visible past (given: it spans earlier pieces too) and
    context [B, T, V] = sum_j P[t, j] s_j over the earlier pieces' keys. starts: optional int32
    [B, T] document starts relative to the piece (0 for a document begun before it). Inputs
    contiguous, f, lse and context in the compute dtype; returns s [B, T, V] in it.
    """
    batch, T, _ = q_b.shape
    V = f.shape[-1]
    config = _config(f.device)
    precision, solve_precision = _dot_precisions(lse.dtype, q_b, k_b, f)
    solve_block = _piece_solve_block(T, config)
    L = _panel_rows(T, solve_block, panel_size)
    s = _empty((batch, T, V), lse.dtype, f.device)
    panel = _empty((batch, L, T), lse.dtype, f.device)
    panel_context = _empty((batch, L, V), lse.dtype, f.device)
    for r0 in range(0, T, L):
        r1 = min(r0 + L, T)
        _launch_probs(q_b, k_b, lse, starts, panel, scale, (r0, r1), (0, r1), config.probs, precision)
        panel_context[:, : r1 - r0] = context[:, r0:r1]
        if r0 > 0:  # plus the earlier panels of this piece
            _launch_matmul(panel, panel.stride(), s, panel_context, r1 - r0, V, r0, config.matmul, precision,
                           accumulate=True, docs=(1, starts, r0, 0) if starts is not None else None)
        _launch_solve(feedback_solve_fwd_kernel, panel, panel_context, f, s, (r0, r1), True, solve_block, config,
                      (precision, solve_precision), gamma=gamma)
    return s


def feedback_piece_adjoint(q_b, k_b, gamma, lse, grad_s, later_terms, scale, starts=None,
                           panel_size=DEFAULT_PANEL_SIZE):
    """The transpose of feedback_piece_fwd: lam = (I - diag(gamma) P)^-T (grad_s + later_terms) for one
    piece, later_terms [B, T, V] = sum_t B[t, j] lam_t over the later pieces' rows t (B = diag(gamma) P).
    Same conventions as feedback_piece_fwd; returns lam [B, T, V] in the compute dtype."""
    batch, T, _ = q_b.shape
    V = grad_s.shape[-1]
    config = _config(grad_s.device)
    precision, solve_precision = _dot_precisions(lse.dtype, q_b, k_b, grad_s)
    solve_block = _piece_solve_block(T, config)
    L = _panel_rows(T, solve_block, panel_size)
    ends = None if starts is None else _document_ends(starts)
    lam = _empty((batch, T, V), lse.dtype, grad_s.device)
    panel = _empty((batch, L, T), lse.dtype, grad_s.device)
    panel_context = _empty((batch, L, V), lse.dtype, grad_s.device)
    for c0 in range((T - 1) // L * L, -1, -L):
        c1 = min(c0 + L, T)
        _launch_probs(q_b, k_b, lse, starts, panel, scale, (c0, T), (c0, c1), config.probs, precision,
                      column_gamma=gamma)
        panel_context[:, : c1 - c0] = later_terms[:, c0:c1]
        if c1 < T:  # plus the later panels of this piece
            _launch_matmul(panel[:, :, c1:], panel.stride(), lam[:, c1:], panel_context, c1 - c0, V, T - c1,
                           config.matmul, precision, accumulate=True,
                           docs=(2, ends, c0, c1) if ends is not None else None)
        _launch_solve(feedback_solve_bwd_kernel, panel, panel_context, grad_s, lam, (c0, c1), True, solve_block,
                      config, (precision, solve_precision))
    return lam


def _int32_starts(starts: torch.Tensor | None) -> torch.Tensor | None:
    return None if starts is None else starts.to(torch.int32).contiguous()


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile) and their autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sessa::feedback_solve_triton_fwd", mutates_args=())
def _fwd_op(
    q_b: torch.Tensor,
    k_b: torch.Tensor,
    f: torch.Tensor,
    gamma: torch.Tensor,
    chunk_size: int,
    panel_size: int,
    starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    with _on_device(f.device):
        s, lse = feedback_triton_fwd(
            q_b.contiguous(), k_b.contiguous(), f.contiguous(), gamma.contiguous(), chunk_size, panel_size,
            starts=_int32_starts(starts),
        )
    return s.to(f.dtype), lse


@_fwd_op.register_fake
def _(q_b, k_b, f, gamma, chunk_size, panel_size, starts=None):
    batch, T, V = f.shape
    return f.new_empty(batch, T, V), f.new_empty(batch, T, dtype=_compute_dtype(f.dtype))


@torch.library.custom_op("sessa::feedback_solve_triton_bwd", mutates_args=())
def _bwd_op(
    q_b: torch.Tensor,
    k_b: torch.Tensor,
    gamma: torch.Tensor,
    s: torch.Tensor,
    lse: torch.Tensor,
    grad_s: torch.Tensor,
    chunk_size: int,
    panel_size: int,
    starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _on_device(s.device):
        dq, dk, df, dgamma = feedback_triton_bwd(
            q_b.contiguous(), k_b.contiguous(), gamma.contiguous(), s.contiguous(), lse.contiguous(),
            grad_s.contiguous(), chunk_size, panel_size, starts=_int32_starts(starts),
        )
    # Fresh tensors even when no cast is needed: a custom op's outputs may not alias each other.
    return dq.to(q_b.dtype), dk.to(k_b.dtype), df.to(s.dtype), dgamma.to(gamma.dtype)


@_bwd_op.register_fake
def _(q_b, k_b, gamma, s, lse, grad_s, chunk_size, panel_size, starts=None):
    return torch.empty_like(q_b), torch.empty_like(k_b), torch.empty_like(s), torch.empty_like(gamma)


def _setup_context(ctx, inputs, output):
    q_b, k_b, _, gamma, chunk_size, panel_size, starts = inputs
    s, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q_b, k_b, gamma, s, lse, starts)
    ctx.chunk_size, ctx.panel_size = chunk_size, panel_size


def _backward(ctx, grad_s, _grad_lse):
    q_b, k_b, gamma, s, lse, starts = ctx.saved_tensors
    if grad_s is None:
        grad_s = torch.zeros_like(s)
    dq, dk, df, dgamma = _bwd_op(q_b, k_b, gamma, s, lse, grad_s, ctx.chunk_size, ctx.panel_size, starts)
    return dq, dk, df, dgamma, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def feedback_solve_triton(q_b, k_b, f, gamma, chunk_size: int = 64, panel_size: int | None = None, starts=None):
    """s = (I - diag(gamma) alpha)^-1 f with fused Triton kernels; memory linear in T.

    Args:
        q_b, k_b: [B, T, K] feedback queries/keys (logits q_b . k_b / sqrt(K), strict-causal softmax).
        f: [B, T, V] forward-branch output (V may be a tensor-parallel slice; K != V is fine).
        gamma: [B, T] feedback gains.
        chunk_size: C, rows of a diagonal block (inverted by a product series of C x C dots): a power
            of two in [16, 128].
        panel_size: L, rows (columns in backward) of P materialised at once in an [B, L, T] fp32
            buffer; a multiple of chunk_size. Default DEFAULT_PANEL_SIZE (capped at T).
        starts: optional [B, T] integer first position of each row's document
            (documents.document_starts); row t then sees only keys starts[t] <= j < t.
    Returns:
        s: [B, T, V] in f's dtype. Inputs may be fp32, bf16, fp16 or fp64; the solve runs in fp32
        (fp64 for fp64 f). Differentiable in q_b, k_b, f and gamma.
    """
    if q_b.dim() != 3 or k_b.shape != q_b.shape:
        raise ValueError(f"q_b and k_b must both be [B, T, K], got {tuple(q_b.shape)} and {tuple(k_b.shape)}")
    batch, T, _ = q_b.shape
    if f.dim() != 3 or f.shape[:2] != (batch, T) or gamma.shape != (batch, T):
        raise ValueError(f"expected f [B, T, V] and gamma [B, T] with B, T = {batch}, {T}; "
                         f"got {tuple(f.shape)} and {tuple(gamma.shape)}")
    if T == 0:
        raise ValueError("T must be >= 1")
    if chunk_size < 16 or chunk_size > 128 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two in [16, 128] for the Triton path, got {chunk_size}")
    panel_size = DEFAULT_PANEL_SIZE if panel_size is None else panel_size
    if panel_size < chunk_size or panel_size % chunk_size:
        raise ValueError(f"panel_size ({panel_size}) must be a positive multiple of chunk_size ({chunk_size})")
    K, V = q_b.shape[-1], f.shape[-1]
    if T * max(K, V, _panel_rows(T, chunk_size, panel_size)) >= 2**31:
        raise ValueError(f"T * max(K, V, panel_size) must be < 2**31 (int32 offsets inside a sequence); got T={T}, "
                         f"K={K}, V={V}, panel_size={panel_size}")
    if len({t.device for t in (q_b, k_b, f, gamma)}) != 1:
        raise ValueError("q_b, k_b, f and gamma must be on one device")
    check_triton_device(f.device)
    if starts is not None and (starts.shape != (batch, T) or starts.device != f.device):
        raise ValueError(f"starts must be [B, T] = [{batch}, {T}] on {f.device}, got {tuple(starts.shape)} "
                         f"on {starts.device}")
    s, _ = _fwd_op(q_b, k_b, f, gamma, chunk_size, panel_size, _int32_starts(starts))
    return s
