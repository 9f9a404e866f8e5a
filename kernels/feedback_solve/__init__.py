"""Sessa feedback solve: s = (I - diag(gamma) alpha)^-1 f, alpha a strict-causal softmax.

Implementations (see README.md here for the math):
  dense   -- the public reference's T x T triangular solve; the oracle (quadratic memory).
  chunked -- blocked forward substitution in PyTorch with a hand-written backward (linear memory).
  triton  -- fused Triton kernels (kernels/feedback_solve/triton_chunk.py); the default on CUDA.
"""
import torch

from .chunk import block_rows, feedback_solve_chunked
from .documents import document_starts
from .naive import feedback_solve_dense, feedback_solve_recurrent

FEEDBACK_IMPLS = ("auto", "dense", "chunked", "triton")

__all__ = [
    "FEEDBACK_IMPLS",
    "document_starts",
    "feedback_solve",
    "feedback_solve_chunked",
    "feedback_solve_dense",
    "feedback_solve_recurrent",
    "resolve_feedback_impl",
]


def resolve_feedback_impl(impl: str, device: torch.device) -> str:
    """`auto` means Triton on CUDA tensors and the chunked PyTorch solve elsewhere."""
    if impl not in FEEDBACK_IMPLS:
        raise ValueError(f"feedback_impl must be one of {FEEDBACK_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    return impl


def feedback_solve(q_b, k_b, f, gamma, impl: str = "auto", chunk_size: int = 64, doc_ids=None):
    """Shapes: q_b, k_b [B, T, K]; f [B, T, V]; gamma [B, T] -> s [B, T, V] in f's dtype.

    doc_ids: optional [B, T] integer document index per position (non-decreasing along T; -1
    padding is its own document). Row t then feeds back only from the strict past of its own
    document (a document's first token has s = f). None: one document per sequence (the
    unmasked solve, unchanged).
    chunk_size: rows per diagonal block (Triton: see feedback_solve_triton). The chunked path takes
    it as the least block: it doubles it up to chunk.BLOCK_ROWS rows while a [rows, T] fp32 tile
    stays within 16 MiB (chunk.block_rows), because larger GEMMs run faster on CPUs; the result is
    the same solve up to fp32 rounding.
    """
    impl = resolve_feedback_impl(impl, f.device)
    starts = None if doc_ids is None else document_starts(doc_ids, f.shape[0], f.shape[1], f.device)
    if impl == "dense":
        return feedback_solve_dense(q_b, k_b, f, gamma, starts).to(f.dtype)
    if impl == "chunked":  # larger blocks than chunk_size where T allows (chunk.block_rows)
        return feedback_solve_chunked(q_b, k_b, f, gamma, block_rows(f.shape[1], chunk_size), starts)
    from .triton_chunk import feedback_solve_triton  # imported lazily: Triton is optional on CPU

    return feedback_solve_triton(q_b, k_b, f, gamma, chunk_size, starts=starts)
