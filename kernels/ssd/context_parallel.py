"""The SSD scan (kernels/ssd/__init__.py) over a sequence split across context-parallel ranks.

Each rank scans its pieces from a zero state (the chunked scan: y0 and the piece's final state S),
then the state crosses ranks by an all-gather of per-piece summaries and a local combine (as LASP-2
and Megatron's state-passing proposal do for linear recurrences), not a chain of point-to-point
hand-offs: per piece the summary is (S [b, h, N, P], carry [b, h]), carry being the decay of a
state entering the piece to its end (0 when a document starts in it or at its first position). The
state entering piece i is I_i = carry_{i-1} I_{i-1} + S_{i-1} (I_0 = 0): at most 2 CP - 1 products
of [b, h, N, P] computed on every rank, and position t of piece i adds C_t (decay from the piece
start to t, 0 past a document start) I_i to y0. The recurrence is linear, so y0 plus that term is
the scan started from I_i, equal to one process's up to rounding.

Cost per layer: one all-gather of b h (N P + 1) values per piece (independent of T; the chain
would move 1 / CP of it per rank but serialise CP hops of latency behind every rank's scan, and
the combine is O(CP b h N P), negligible next to the scan's O(T Q h P)); backward reduce-scatters
the summaries' gradients the same way (gather_sequence). Nothing is recomputed: the scans of all
ranks run at once.
"""
import torch
import torch.distributed as dist

from kernels.attention.context_parallel import gather_sequence
from kernels.feedback_solve.context_parallel import context_segments

from .chunk import ssd_chunked
from .naive import per_head


def ssd_context_parallel(x, dt, A, B, C, group, chunk_size: int = 64, doc_ids=None, layout: str = "contiguous"):
    """y [b, L, h, P] of the scan for this rank's positions of the whole sequence (no final state).

    x [b, L, h, P], dt [b, L, h], B / C [b, L, g, N]: the positions `context_positions(CP * L, CP, r,
    layout)` (r = rank in `group`, CP its size; kernels/feedback_solve/context_parallel.py); A [h];
    doc_ids: optional FULL-length [b, CP * L] document ids (the same on every rank): the state
    resets at each document start, across pieces as within one. Every rank of `group` calls this;
    gradients flow to every rank's inputs.
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    b, length, h = x.shape[:3]
    segments = context_segments(size * length, size, rank, layout)
    piece = segments[0][1] - segments[0][0]
    if doc_ids is not None and tuple(doc_ids.shape) != (b, size * length):
        raise ValueError(f"doc_ids must be the full sequence's [B, T] = [{b}, {size * length}] on every "
                         f"context-parallel rank, got {list(doc_ids.shape)}")
    zero_start, through, states, carries = [], [], [], []
    for j, (start, end) in enumerate(segments):
        rows = slice(j * piece, (j + 1) * piece)
        ids = None if doc_ids is None else doc_ids[:, start:end]
        y0, state = ssd_chunked(x[:, rows], dt[:, rows], A, B[:, rows], C[:, rows], chunk_size, None, ids)
        decay = torch.exp((dt[:, rows] * A).cumsum(dim=1))  # [b, piece, h]: from the piece start to t
        if ids is not None:  # an entering state reaches t only within the document of position start - 1
            decay = decay * (ids == doc_ids[:, max(start - 1, 0), None]).to(decay.dtype)[..., None]
        zero_start.append(y0)
        through.append(decay)
        states.append(state)
        carries.append(decay[:, -1])
    # every piece's summary in sequence order, one collective: [b, pieces, h, N P + 1] (state, carry)
    n_state, p = states[0].shape[-2:]
    summaries = torch.stack([torch.cat((state.flatten(-2), carry[..., None]), dim=-1)
                             for state, carry in zip(states, carries)], dim=1)
    summaries = gather_sequence(summaries, group, 1, layout)
    all_states = summaries[..., :-1].unflatten(-1, (n_state, p))
    all_carries = summaries[..., -1]
    # zeros entering the first piece, taken from the gathered summaries so that every rank's gather
    # is in its graph: the backward reduce-scatter is a collective every rank must call
    entering = [all_states[:, 0] * 0]
    for i in range(1, segments[-1][0] // piece + 1):
        entering.append(all_carries[:, i - 1, :, None, None] * entering[-1] + all_states[:, i - 1])
    Ch = per_head(C, h)  # [b, L, h, N]
    ys = []
    for j, (start, _) in enumerate(segments):
        rows = slice(j * piece, (j + 1) * piece)
        state_in = entering[start // piece]
        ys.append(zero_start[j] + torch.einsum("bthn,bhnp->bthp", Ch[:, rows] * through[j][..., None], state_in))
    return torch.cat(ys, dim=1)
