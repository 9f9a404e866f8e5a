"""Readable references for the Sessa feedback solve (SESSA.md §2, §4).

Shapes: q_b, k_b [B, T, K]; f [B, T, V]; gamma [B, T]; returns s [B, T, V] in f's dtype.
Optional `starts` [B, T] (documents.document_starts): row t sees only keys starts[t] <= j < t.
Both forms compute in float32 (float64 stays float64) and are differentiated by autograd.
"""
import torch


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def feedback_alpha(q_b: torch.Tensor, k_b: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
    """Strict-causal single-head softmax [B, T, T]; a row with no visible past (row 0, and each
    document's first row when `starts` is given) is all zeros."""
    T, K = q_b.shape[1], q_b.shape[-1]
    logits = q_b @ k_b.transpose(1, 2) * K**-0.5  # [B, T, T]
    visible = torch.ones(T, T, dtype=torch.bool, device=q_b.device).tril(-1)
    if starts is not None:
        keys = torch.arange(T, device=q_b.device)
        visible = visible & (keys[None, None, :] >= starts[:, :, None])  # [B, T, T]
    logits = logits.masked_fill(~visible, float("-inf"))
    alpha = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(alpha, nan=0.0)  # rows with no past are a softmax over nothing


def feedback_solve_dense(q_b, k_b, f, gamma, starts=None):
    """The public reference's algorithm: form B = diag(gamma) alpha (T x T), solve (I - B) s = f."""
    dtype = _solve_dtype(f.dtype)
    q_b, k_b, f, gamma = (x.to(dtype) for x in (q_b, k_b, f, gamma))
    T = f.shape[1]
    feedback = gamma.unsqueeze(-1) * feedback_alpha(q_b, k_b, starts)  # [B, T, T], strictly lower
    system = torch.eye(T, dtype=dtype, device=f.device) - feedback
    s = torch.linalg.solve_triangular(system, f, upper=False, unitriangular=True)
    return s


def feedback_solve_recurrent(q_b, k_b, f, gamma, starts=None):
    """Token-by-token recurrence s[t] = f[t] + gamma[t] * alpha[t, :t] @ s[:t] (the decode form);
    with `starts`, alpha[t] covers only keys starts[t] <= j < t (none: s[t] = f[t])."""
    dtype = _solve_dtype(f.dtype)
    q_b, k_b, f, gamma = (x.to(dtype) for x in (q_b, k_b, f, gamma))
    K = q_b.shape[-1]
    outputs = [f[:, 0]]
    for t in range(1, f.shape[1]):
        past_s = torch.stack(outputs, dim=1)  # [B, t, V]
        logits = torch.einsum("bk,bjk->bj", q_b[:, t], k_b[:, :t]) * K**-0.5
        if starts is None:
            alpha = torch.softmax(logits, dim=-1)
        else:
            other_doc = torch.arange(t, device=f.device)[None, :] < starts[:, t, None]
            alpha = torch.softmax(logits.masked_fill(other_doc, float("-inf")), dim=-1).nan_to_num(nan=0.0)
        context = torch.einsum("bj,bjv->bv", alpha, past_s)
        outputs.append(f[:, t] + gamma[:, t, None] * context)
    return torch.stack(outputs, dim=1)
