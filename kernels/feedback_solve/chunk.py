"""Blocked forward substitution for the Sessa feedback solve, in plain PyTorch (SESSA.md §5).

Never materialises anything T x T: each step works on one row chunk of C queries against the keys
of its past, a [C, t] tile, and its C x C diagonal block is solved directly. Forward saves only
q_b, k_b, gamma, s and the row log-sum-exp; backward recomputes the probabilities tile by tile.

With document boundaries (`starts` [B, T], documents.document_starts) row t sees keys
starts[t] <= j < t: a chunk's tile starts at the earliest document start of its rows (over the
batch) instead of 0, and keys before a row's own document start are masked like the future.
"""
import torch

from .naive import _solve_dtype


# feedback_solve(impl="chunked") raises chunk_size toward this many rows per block: the CPU's fp32
# GEMMs with 64 rows run at ~0.6 of its matmul peak, with 256 at ~0.9 (README, "The chunked path").
BLOCK_ROWS = 256
TILE_ELEMENTS = 1 << 22  # ... while one [rows, T] fp32 tile stays within 16 MiB


def block_rows(T: int, chunk_size: int) -> int:
    """Rows per block that feedback_solve(impl="chunked") uses: chunk_size, doubled while below
    BLOCK_ROWS and a [rows, T] tile stays within TILE_ELEMENTS. The same solve up to rounding."""
    rows = chunk_size
    while rows < BLOCK_ROWS and 2 * rows * T <= TILE_ELEMENTS:
        rows *= 2
    return rows


def _key_ranges(starts, T, chunk_size):
    """Per chunk (c0, lo, masked): its tile covers keys [lo, c1); `masked` when some row's document
    starts after lo (else the causal mask alone is exact). One host sync for all chunks."""
    chunk_starts = list(range(0, T, chunk_size))
    if starts is None:
        return [(c0, 0, False) for c0 in chunk_starts]
    padded = torch.nn.functional.pad(starts, (0, len(chunk_starts) * chunk_size - T), value=-1)
    latest = padded.view(starts.shape[0], len(chunk_starts), chunk_size).amax(2).amax(0)
    lo = starts[:, ::chunk_size].amin(0)  # starts are non-decreasing: a chunk's first row has the earliest
    masked = (latest > lo).tolist()
    return list(zip(chunk_starts, lo.tolist(), masked))


def _chunk_probs(q_scaled, k_b, lse, c0, c1, lo=0, row_starts=None):
    """Strict-causal probabilities of rows [c0, c1) against keys [lo, c1): [B, n, c1 - lo].

    `q_scaled` = q_b / sqrt(K). Keys before `row_starts` [B, n] (each row's document start) get
    probability 0; so does every key of a row with no visible past. With `lse=None` the rows'
    log-sum-exp is computed (forward) and returned too. One fresh [B, n, c1 - lo] tile, masked and
    exponentiated in place.
    """
    n = c1 - c0
    logits = q_scaled[:, c0:c1] @ k_b[:, lo:c1].transpose(1, 2)  # [B, n, K] @ [B, K, c1 - lo]
    future = torch.ones(n, n, dtype=torch.bool, device=q_scaled.device).triu()
    logits[:, :, c0 - lo :].masked_fill_(future, float("-inf"))
    if row_starts is not None:
        keys = torch.arange(lo, c1, device=q_scaled.device)
        logits.masked_fill_(keys[None, None, :] < row_starts[:, :, None], float("-inf"))
    if lse is not None:
        return logits.sub_(lse[:, c0:c1].unsqueeze(-1)).exp_(), lse[:, c0:c1]
    return softmax_with_lse_(logits)


def softmax_with_lse_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim in place (one exp pass) and its log-sum-exp [..., rows]. Rows with
    no visible key (t = 0, a document's first token) have max -inf and sum 0: probabilities 0, not
    NaN, and lse 0."""
    row_max = logits.amax(-1, keepdim=True)
    row_max.masked_fill_(torch.isinf(row_max), 0.0)
    probs = logits.sub_(row_max).exp_()
    row_sum = probs.sum(-1, keepdim=True)
    empty = row_sum == 0
    probs.div_(row_sum.masked_fill_(empty, 1.0))
    row_lse = row_sum.log_().add_(row_max).masked_fill_(empty, 0.0)
    return probs, row_lse.squeeze(-1)


def _unit_lower_system(probs_diag, gamma_rows):
    """I - diag(gamma) * strictly_lower(P) for one diagonal block: [B, n, n]."""
    n = probs_diag.shape[-1]
    eye = torch.eye(n, dtype=probs_diag.dtype, device=probs_diag.device)
    return eye - gamma_rows.unsqueeze(-1) * probs_diag


def chunk_feedback_fwd(q_b, k_b, f, gamma, chunk_size, starts=None):
    """Returns s [B, T, V] and lse [B, T], both in the solve dtype."""
    batch, T, V = f.shape
    q_scaled = q_b * q_b.shape[-1] ** -0.5
    s = torch.empty(batch, T, V, dtype=f.dtype, device=f.device)
    lse = torch.empty(batch, T, dtype=f.dtype, device=f.device)
    for c0, lo, masked in _key_ranges(starts, T, chunk_size):
        c1 = min(c0 + chunk_size, T)
        row_starts = starts[:, c0:c1] if masked else None
        probs, lse[:, c0:c1] = _chunk_probs(q_scaled, k_b, None, c0, c1, lo, row_starts)
        gamma_rows = gamma[:, c0:c1]
        past_context = probs[:, :, : c0 - lo] @ s[:, lo:c0]  # [B, n, c0 - lo] @ [B, c0 - lo, V]
        rhs = past_context.mul_(gamma_rows.unsqueeze(-1)).add_(f[:, c0:c1])
        system = _unit_lower_system(probs[:, :, c0 - lo :], gamma_rows)
        s[:, c0:c1] = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    return s, lse


def chunk_feedback_bwd(q_b, k_b, gamma, s, lse, grad_s, chunk_size, starts=None):
    """Reverse-time chunked solve for lambda = (I - B)^-T grad_s, then the logits' gradients.

    Returns (dq_b, dk_b, df, dgamma) in the solve dtype.
    """
    T = s.shape[1]
    scale = q_b.shape[-1] ** -0.5
    q_scaled, k_scaled = q_b * scale, k_b * scale
    dq_b = torch.empty_like(q_b)
    dk_b = torch.zeros_like(k_b)
    dgamma = torch.empty_like(gamma)
    lam = torch.empty_like(s)
    # later_terms[t] accumulates sum_{i in later chunks} gamma[i] P[i, t] lambda[i].
    later_terms = torch.zeros_like(s)
    for c0, lo, masked in reversed(_key_ranges(starts, T, chunk_size)):
        c1 = min(c0 + chunk_size, T)
        probs, _ = _chunk_probs(q_scaled, k_b, lse, c0, c1, lo, starts[:, c0:c1] if masked else None)
        gamma_rows = gamma[:, c0:c1].unsqueeze(-1)  # [B, n, 1]
        system = _unit_lower_system(probs[:, :, c0 - lo :], gamma[:, c0:c1])
        rhs = grad_s[:, c0:c1] + later_terms[:, c0:c1]
        lam_rows = torch.linalg.solve_triangular(system.transpose(1, 2), rhs, upper=True, unitriangular=True)
        lam[:, c0:c1] = lam_rows
        gamma_lam = gamma_rows * lam_rows
        # [B, c0 - lo, n] @ [B, n, V], accumulated in place
        later_terms[:, lo:c0].baddbmm_(probs[:, :, : c0 - lo].transpose(1, 2), gamma_lam)

        past_s = s[:, lo:c1]
        context = probs @ past_s  # u[t] = sum_{j<t} alpha[t, j] s[j]: [B, n, c1 - lo] @ [B, c1 - lo, V]
        delta = (lam_rows * context).sum(-1)  # [B, n]
        dgamma[:, c0:c1] = delta
        # dL/dlogits (of the scaled logits) = P (gamma lam . s - gamma delta), in place over the GEMM's output
        dlogits = (gamma_lam @ past_s.transpose(1, 2)).sub_(gamma_rows * delta.unsqueeze(-1)).mul_(probs)
        # dq = dlogits @ (k / sqrt(K)); dk += dlogits^T @ (q / sqrt(K))
        dq_b[:, c0:c1] = dlogits @ k_scaled[:, lo:c1]  # [B, n, c1 - lo] @ [B, c1 - lo, K]
        dk_b[:, lo:c1].baddbmm_(dlogits.transpose(1, 2), q_scaled[:, c0:c1])  # [B, c1 - lo, n] @ [B, n, K]
    return dq_b, dk_b, lam, dgamma


class ChunkFeedbackSolve(torch.autograd.Function):
    """Autograd wrapper: solves in float32 (float64 stays float64), returns s in f's dtype."""

    @staticmethod
    def forward(ctx, q_b, k_b, f, gamma, chunk_size, starts=None):
        dtype = _solve_dtype(f.dtype)
        q32, k32, gamma32 = q_b.to(dtype), k_b.to(dtype), gamma.to(dtype)
        s, lse = chunk_feedback_fwd(q32, k32, f.to(dtype), gamma32, chunk_size, starts)
        ctx.save_for_backward(q_b, k_b, gamma, s, lse, starts)
        ctx.chunk_size = chunk_size
        ctx.f_dtype = f.dtype
        return s.to(f.dtype)

    @staticmethod
    def backward(ctx, grad_s):
        q_b, k_b, gamma, s, lse, starts = ctx.saved_tensors
        dtype = s.dtype
        dq, dk, df, dgamma = chunk_feedback_bwd(
            q_b.to(dtype), k_b.to(dtype), gamma.to(dtype), s, lse, grad_s.to(dtype), ctx.chunk_size, starts
        )
        return dq.to(q_b.dtype), dk.to(k_b.dtype), df.to(ctx.f_dtype), dgamma.to(gamma.dtype), None, None


def feedback_solve_chunked(q_b, k_b, f, gamma, chunk_size: int = 64, starts=None):
    """s = (I - diag(gamma) alpha)^-1 f with memory linear in T.

    Args:
        q_b, k_b: [B, T, K] feedback queries/keys (the logits are q_b . k_b / sqrt(K)).
        f: [B, T, V] forward-branch output (V may be a tensor-parallel slice of the features).
        gamma: [B, T] feedback gains.
        chunk_size: rows per block; tiles are at most [chunk_size, T].
        starts: optional [B, T] integer first position of each row's document
            (documents.document_starts); row t then sees only keys starts[t] <= j < t.
    """
    return ChunkFeedbackSolve.apply(q_b, k_b, f, gamma, chunk_size, starts)
