"""Context-parallel causal attention (issues 19, 28): Llama 3's all-gather scheme, for Sessa's mixer,
the `*` block and the Transformer arm alike.

Each rank of the CP group holds its positions of q, k, v in the contiguous or zigzag layout
(kernels.feedback_solve.context_parallel.context_segments). K and V are all-gathered along the
sequence and put in sequence order (B*T*H_kv*d each; their gradients are reduce-scattered back to
the owners) and the local queries attend causally to every earlier key, tile by tile, so no mask is
larger than [tile, T]. The feedback solve under CP is kernels.feedback_solve.context_parallel,
whose sequence all-gather and reduce-scatter this module uses too.

Memory: autograd keeps the gathered K and V (SDPA saves its inputs) from forward to backward,
B*T*2*H_kv*d per layer on every rank; re-gathering them in backward, as the feedback solve does,
would need the attention recomputed there (or its log-sum-exp kept). Not done.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.feedback_solve.context_parallel import all_gather_sequence, context_segments, reduce_scatter_sequence
from kernels.feedback_solve.documents import document_starts


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim` (rank order) forward; sum the gradients over the group and keep this
    rank's piece backward (one reduce-scatter)."""

    @staticmethod
    def forward(ctx, piece, group, dim, layout):
        ctx.group, ctx.dim, ctx.layout = group, dim, layout
        return all_gather_sequence(piece.movedim(dim, 1), group, layout).movedim(1, dim)

    @staticmethod
    def backward(ctx, grad):
        piece = reduce_scatter_sequence(grad.movedim(ctx.dim, 1), ctx.group, ctx.layout).movedim(1, ctx.dim)
        return piece, None, None, None


def gather_sequence(piece: torch.Tensor, group, dim: int, layout: str = "contiguous") -> torch.Tensor:
    """Differentiable all-gather of sequence pieces along `dim` over the CP `group`, in sequence
    order (`layout` says which positions each rank holds: kernels.feedback_solve.context_parallel)."""
    return _GatherSequence.apply(piece, group, dim, layout)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group,
                               doc_ids: torch.Tensor | None = None, tile: int = 256, layout: str = "contiguous",
                               scale: float | None = None) -> torch.Tensor:
    """This rank's rows of causal attention over a sequence split into pieces over `group`.

    q [B, H, L, d], k/v [B, H_kv, L, d]: the positions `context_positions(CP * L, CP, r, layout)`
    (r = rank in `group`; "contiguous": [r*L, (r+1)*L), "zigzag": two halves, pieces r and
    2 CP - 1 - r of 2 CP); doc_ids: optional FULL-length [B, CP * L] document ids (query t then sees
    keys of its own document only, as in model/documents.py); scale: SDPA's (None: 1 / sqrt(d)).
    Returns [B, H, L, d], equal to the matching rows of single-process causal attention; gradients
    flow to every rank's k and v.
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, length = q.shape[0], q.shape[2]
    total = size * length
    segments = context_segments(total, size, rank, layout)
    keys, values = gather_sequence(k, group, 2, layout), gather_sequence(v, group, 2, layout)  # [B, H_kv, T, d]
    if doc_ids is None:
        starts = torch.zeros(batch, total, dtype=torch.long, device=q.device)
    else:
        if tuple(doc_ids.shape) != (batch, total):
            raise ValueError(f"doc_ids must be the full sequence's [B, T] = [{batch}, {total}] on every "
                             f"context-parallel rank, got {list(doc_ids.shape)}")
        starts = document_starts(doc_ids, batch, total, q.device)  # [B, T], non-decreasing along T
    bounds, row = [], 0  # (first local row, q0, q1) per tile of queries [q0, q1) (sequence positions)
    for a, b in segments:
        bounds += [(row + q0 - a, q0, min(q0 + tile, b)) for q0 in range(a, b, tile)]
        row += b - a
    first_starts = starts[:, [q0 for _, q0, _ in bounds]].amin(0).tolist()  # one host sync
    tiles = [(r0, q0, q1, k0) for (r0, q0, q1), k0 in zip(bounds, first_starts)]
    return _TiledAttention.apply(q, keys, values, starts, tiles, scale)


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
    `tiles`: (r0, q0, q1, k0) per tile: local rows [r0, r0 + q1 - q0), queries [q0, q1) (sequence
    positions), against keys [k0, q1)."""

    @staticmethod
    def forward(ctx, q, keys, values, starts, tiles, scale):
        ctx.save_for_backward(q, keys, values, starts)
        ctx.tiles, ctx.scale = tiles, scale
        return torch.cat([F.scaled_dot_product_attention(q[:, :, r0 : r0 + q1 - q0], keys[:, :, k0:q1],
                                                         values[:, :, k0:q1], attn_mask=_tile_mask(starts, q0, q1, k0),
                                                         enable_gqa=True, scale=scale)
                          for r0, q0, q1, k0 in tiles], dim=2)

    @staticmethod
    def backward(ctx, grad):
        q, keys, values, starts = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(keys), torch.zeros_like(values)
        for r0, q0, q1, k0 in ctx.tiles:
            rows = slice(r0, r0 + q1 - q0)
            with torch.enable_grad():
                tile = [q[:, :, rows].detach().requires_grad_(), keys[:, :, k0:q1].detach().requires_grad_(),
                        values[:, :, k0:q1].detach().requires_grad_()]
                out = F.scaled_dot_product_attention(*tile, attn_mask=_tile_mask(starts, q0, q1, k0), enable_gqa=True,
                                                     scale=ctx.scale)
                gq, gk, gv = torch.autograd.grad(out, tile, grad[:, :, rows])
            dq[:, :, rows] += gq
            dk[:, :, k0:q1] += gk
            dv[:, :, k0:q1] += gv
        return dq, dk, dv, None, None, None
