"""Context-parallel causal attention (issue 19): Llama 3's all-gather scheme.

Rank r of the CP group holds positions [r*L, (r+1)*L) of q, k, v. K and V are all-gathered along
the sequence (B*T*H_kv*d each; their gradients are reduce-scattered back to the owners) and the
local queries attend causally to every earlier key, tile by tile, so no mask is larger than
[tile, T]. The feedback solve under CP is kernels.feedback_solve.context_parallel, whose sequence
all-gather and reduce-scatter this module uses too.

Memory: autograd keeps the gathered K and V (SDPA saves its inputs) from forward to backward,
B*T*2*H_kv*d per layer on every rank; re-gathering them in backward, as the feedback solve does,
would need the attention recomputed there (or its log-sum-exp kept). Not done.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.feedback_solve.context_parallel import all_gather_sequence, reduce_scatter_sequence
from kernels.feedback_solve.documents import document_starts


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim` (rank order) forward; sum the gradients over the group and keep this
    rank's piece backward (one reduce-scatter)."""

    @staticmethod
    def forward(ctx, piece, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather_sequence(piece.movedim(dim, 1), group).movedim(1, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_sequence(grad.movedim(ctx.dim, 1), ctx.group).movedim(1, ctx.dim), None, None


def gather_sequence(piece: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Differentiable all-gather of sequence pieces along `dim` over the CP `group`."""
    return _GatherSequence.apply(piece, group, dim)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group,
                               doc_ids: torch.Tensor | None = None, tile: int = 256) -> torch.Tensor:
    """This rank's rows of causal attention over a sequence split into pieces over `group`.

    q [B, H, L, d], k/v [B, H_kv, L, d]: positions [r*L, (r+1)*L) (r = rank in `group`);
    doc_ids: optional FULL-length [B, CP * L] document ids (query t then sees keys of its own
    document only, as in model/documents.py). Returns [B, H, L, d], equal to the matching rows of
    single-process causal attention; gradients flow to every rank's k and v.
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, length = q.shape[0], q.shape[2]
    offset = rank * length
    keys, values = gather_sequence(k, group, 2), gather_sequence(v, group, 2)  # [B, H_kv, T, d]
    if doc_ids is None:
        starts = torch.zeros(batch, size * length, dtype=torch.long, device=q.device)
    else:
        if tuple(doc_ids.shape) != (batch, size * length):
            raise ValueError(f"doc_ids must be the full sequence's [B, T] = [{batch}, {size * length}] on every "
                             f"context-parallel rank, got {list(doc_ids.shape)}")
        starts = document_starts(doc_ids, batch, size * length, q.device)  # [B, T], non-decreasing along T
    first_starts = starts[:, offset::tile][:, : -(-length // tile)].amin(0).tolist()  # one host sync
    tiles = [(q0, min(q0 + tile, offset + length), k0)
             for q0, k0 in zip(range(offset, offset + length, tile), first_starts)]
    return _TiledAttention.apply(q, keys, values, starts, offset, tiles)


def _tile_mask(starts, q0: int, q1: int, k0: int) -> torch.Tensor:
    """[B, 1, n, keys]: query q0 + i sees key k0 + j when it is not later and of its document."""
    index = torch.arange(k0, q1, device=starts.device)
    return ((index[None, None, :] <= index[None, q0 - k0:, None])
            & (index[None, None, :] >= starts[:, q0:q1, None]))[:, None]


class _TiledAttention(torch.autograd.Function):
    """Tile-by-tile attention that keeps no tile's mask or scores for the backward: SDPA on CPU
    turns a boolean mask into a float one and saves it, which over all tiles is L x T / 2 values
    per row block, as much as the layer's other activations at long T. The backward recomputes
    each tile (flash attention's trade: one more forward) and keeps only q and the gathered K/V.
    `tiles`: (q0, q1, k0) per tile of queries [q0, q1) (global positions) against keys [k0, q1)."""

    @staticmethod
    def forward(ctx, q, keys, values, starts, offset, tiles):
        ctx.save_for_backward(q, keys, values, starts)
        ctx.offset, ctx.tiles = offset, tiles
        return torch.cat([F.scaled_dot_product_attention(q[:, :, q0 - offset : q1 - offset], keys[:, :, k0:q1],
                                                         values[:, :, k0:q1], attn_mask=_tile_mask(starts, q0, q1, k0),
                                                         enable_gqa=True)
                          for q0, q1, k0 in tiles], dim=2)

    @staticmethod
    def backward(ctx, grad):
        q, keys, values, starts = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(keys), torch.zeros_like(values)
        for q0, q1, k0 in ctx.tiles:
            rows = slice(q0 - ctx.offset, q1 - ctx.offset)
            with torch.enable_grad():
                tile = [q[:, :, rows].detach().requires_grad_(), keys[:, :, k0:q1].detach().requires_grad_(),
                        values[:, :, k0:q1].detach().requires_grad_()]
                out = F.scaled_dot_product_attention(*tile, attn_mask=_tile_mask(starts, q0, q1, k0), enable_gqa=True)
                gq, gk, gv = torch.autograd.grad(out, tile, grad[:, :, rows])
            dq[:, :, rows] += gq
            dk[:, :, k0:q1] += gk
            dv[:, :, k0:q1] += gv
        return dq, dk, dv, None, None, None
