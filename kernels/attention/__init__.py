"""Causal attention of the forward branches (Sessa's mixer, the `*` block), laid out like
kernels/feedback_solve/: the single-process form here (torch's SDPA), the context-parallel form in
context_parallel.py (tested against it; the packed-document form is model.documents'
document_attention)."""
import torch
import torch.nn.functional as F

from .context_parallel import context_parallel_attention

__all__ = ["causal_attention", "context_parallel_attention"]


def causal_attention(q, k, v, past: int = 0):
    """q [B, H, T, d], k/v [B, H_kv, past + T, d] -> [B, H, T, d]: query i (position past + i) sees
    keys j <= past + i (`past`: the cached positions before q's)."""
    T = q.shape[2]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    visible = q.new_ones(T, past + T, dtype=torch.bool).tril(past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
