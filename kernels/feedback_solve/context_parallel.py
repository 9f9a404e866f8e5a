"""Context-parallel Sessa feedback solve: one sequence split over the CP ranks (issues 19, 28).

The layouts (`context_segments`, the one definition every block and the batch split use):
"contiguous", rank r holds positions [r*L, (r+1)*L), L = T / CP; "zigzag", the sequence is cut into
2 CP pieces and rank r holds pieces r and 2 CP - 1 - r (its rows then see as much past as any
other rank's: causal work balanced). A rank's q_b, k_b [B, L, K], f [B, L, V] and gamma [B, L] are
its pieces one after another; `doc_ids`, when given, is the FULL [B, T] on every rank (as
everywhere in the model: it is B*T integers, and every rank needs the document starts of every
position to know which earlier pieces its rows can see). Nothing T x T is formed or sent: tiles are
[C, <= T] as in chunk.py, and messages are single pieces. Below, "rank r" and "piece r" are the
contiguous layout's; under zigzag the same steps run per piece, in sequence order, on the rank
holding it (messages tagged by piece; a rank's own earlier piece needs none).

Forward (s = (I - B)^-1 f, README.md here):
  1. all-gather k_b (B*T*K); each rank computes its rows' log-sum-exp over their visible past,
     one [C, <= T] tile per chunk of C rows, while it waits for earlier pieces;
  2. wavefront: rank r posts receives for s_q of every earlier piece q its rows can see, adds
     P[r, q] @ s_q to its context as each arrives (the tiles recomputed with the global lse), then
     solves its diagonal piece chunk by chunk with the context pre-added
     (s_c = (I - N_c)^-1 (f_c + gamma_c (context_c + P[c, in-piece past] s))) and sends s_r to every
     later rank that can see it (point to point: the earlier ranks never wait for the later ones).
Backward (lambda = (I - B)^-T G, then the logits' gradients):
  1. last rank first: rank r sums the contributions B[p, r]^T lambda_p that later ranks p send it,
     solves its diagonal piece in reverse, then computes B[r, q]^T lambda_r for each earlier piece q
     it sees (q = r - 1 first: the critical path) and sends it to q;
  2. all-gather s and k_b again (nothing gathered is saved between forward and backward: a layer
     keeps only its local pieces), then dq_b, dgamma = delta, df = lambda locally, and dk_b for
     every key this rank's rows see, summed to the keys' owners by one reduce-scatter.

Which code runs the tiles (`impl`, the model's feedback_impl; "auto" = "triton" on CUDA): with
"triton" each diagonal piece -- its in-piece probabilities, forward solve with the earlier pieces'
context pre-added, and the reverse solve of backward step 1 with the later pieces' terms pre-added --
runs the Triton kernels (triton_chunk.feedback_piece_fwd / feedback_piece_adjoint: the piece as a
sequence of its own, given the global lse; on CPU only under TRITON_INTERPRET=1). The lse pass,
the off-diagonal tiles P[r, q] @ s_q and B[r, q]^T lambda_r, and the gradient pass stay PyTorch
tiles (the Triton lse, probs and gradient kernels index queries and keys from one position 0 and
have no row offset for a piece's rows against the gathered keys). "chunked"/"dense": PyTorch only.

Cost per layer and sequence (2 FLOPs per multiply-add, L = T / CP; K = V = D below; the
single device's chunked solve does 2 D T^2 forward and 6 D T^2 backward, recomputing the logits).
Communication, elements received per rank: the all-gathers of k_b (forward, backward) and of s
(backward) (CP - 1) L D each, the reduce-scatter of dk (CP - 1) L D; the wavefronts send
CP (CP - 1) / 2 pieces of L*D each way, at most (CP - 1) L D = (1 - 1/CP) T D received by one rank
per direction. In all <= 6 (1 - 1/CP) T D per layer, against 2 (1 - 1/CP) T D_kv forward and the
same backward for the attention's K and V (all-gather, then their gradients' reduce-scatter; a
ring moves as much); never T x T.
Work on the last rank (its rows see all T keys; the first rank's see only L):
  forward  (4K + 2V) T L = 6 D T^2 / CP: the lse pass (logits of the whole past), the context pass
           (logits again, P @ s) and the diagonal piece -- 3 / CP of one device;
  backward (8K + 6V) T L = 14 D T^2 / CP: B^T lambda for the earlier pieces (logits again) and the
           gradient pass (logits, u = P s, lambda s^T, dq, dk over the whole past) -- 2.3 / CP.
Critical path: the wavefront is a chain of CP stages, each one off-diagonal tile pass of the
previous piece (logits + P[r, r-1] s_{r-1}, resp. B[r, r-1]^T lambda_r sent first: 4 D L^2), one
diagonal piece (2 D L^2) and one L*D message: 6 D T^2 / CP per direction. A rank's lse pass and
the contributions of pieces older than r - 1 fill its waits (the last rank has about 2 D L^2 of
slack per stage, as much as its lse pass needs). So forward takes ~ 6 D T^2 / CP against 2 D T^2
on one device (faster only for CP > 3); backward ~ 6 D T^2 / CP for the chain plus the gradient
pass (10 D T^2 / CP at the last rank, no communication) against 6 D T^2. What CP buys first is
memory: per rank O(L D) saved per layer and O(T D + C T) transient, instead of O(T D) saved.
The work is unbalanced (rank r has r + 1/2 pieces of past) and the chain is per piece; sending s
chunk by chunk would shorten the chain to about the last rank's work. Neither is done.
"""
import torch
import torch.distributed as dist

from . import resolve_feedback_impl
from .chunk import _unit_lower_system, softmax_with_lse_
from .documents import document_starts
from .naive import _solve_dtype

CONTEXT_LAYOUTS = ("contiguous", "zigzag")


def _pieces_per_rank(layout: str) -> int:
    if layout not in CONTEXT_LAYOUTS:
        raise ValueError(f"context layout must be one of {CONTEXT_LAYOUTS}, got {layout!r}")
    return 1 if layout == "contiguous" else 2


def piece_owners(size: int, layout: str) -> list[int]:
    """The rank holding each of the sequence's equal pieces, in sequence order: CP pieces, piece r on
    rank r (contiguous), or 2 CP pieces, pieces r and 2 CP - 1 - r on rank r (zigzag)."""
    if _pieces_per_rank(layout) == 1:
        return list(range(size))
    return list(range(size)) + list(range(size - 1, -1, -1))


def context_segments(total: int, size: int, rank: int, layout: str = "contiguous") -> list[tuple[int, int]]:
    """The [start, end) position ranges `rank` holds of a sequence of `total` positions split over
    `size` ranks, in sequence order; a rank's piece is their concatenation."""
    owners = piece_owners(size, layout)
    if total % len(owners):
        raise ValueError(f"sequence length {total} is not divisible by {len(owners)}: the {layout} context layout "
                         f"over {size} ranks cuts it into {len(owners)} equal pieces")
    piece = total // len(owners)
    return [(i * piece, (i + 1) * piece) for i, owner in enumerate(owners) if owner == rank]


def context_positions(total: int, size: int, rank: int, layout: str = "contiguous", device=None) -> torch.Tensor:
    """[total / size] int64: the sequence positions of `rank`'s piece (see `context_segments`)."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in context_segments(total, size, rank, layout)])


def _reorder(x: torch.Tensor, size: int, layout: str, to_sequence: bool, dim: int = 1) -> torch.Tensor:
    """The ranks' pieces concatenated in rank order <-> in sequence order (zigzag interleaves them)."""
    if layout == "contiguous":
        return x
    owners = piece_owners(size, layout)
    rank_order = sorted(range(len(owners)), key=lambda i: (owners[i], i))  # sequence piece at each rank-order slot
    parts = x.chunk(len(owners), dim=dim)
    if to_sequence:
        slot = {piece: j for j, piece in enumerate(rank_order)}
        return torch.cat([parts[slot[i]] for i in range(len(owners))], dim=dim)
    return torch.cat([parts[i] for i in rank_order], dim=dim)


def all_gather_sequence(piece: torch.Tensor, group, layout: str = "contiguous") -> torch.Tensor:
    """All-gather [B, L, ...] pieces along dim 1: the whole [B, CP * L, ...] in sequence order."""
    piece = piece.contiguous()  # gloo sends and receives dense buffers only
    pieces = [torch.empty_like(piece) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, piece, group=group)
    return _reorder(torch.cat(pieces, dim=1), len(pieces), layout, to_sequence=True)


def reduce_scatter_sequence(full: torch.Tensor, group, layout: str = "contiguous") -> torch.Tensor:
    """Sum [B, T, ...] (sequence order) over the group and keep this rank's piece [B, T / CP, ...]."""
    size = dist.get_world_size(group)
    pieces = [p.contiguous() for p in _reorder(full, size, layout, to_sequence=False).chunk(size, dim=1)]
    out = torch.empty_like(pieces[0])
    dist.reduce_scatter(out, pieces, group=group)
    return out


def _tile_probs(q_rows, k_all, g0, k0, k1, lse_rows=None, row_starts=None):
    """Probabilities of rows [g0, g0 + n) (global positions; `q_rows` already scaled by 1/sqrt(K))
    against keys [k0, k1): [B, n, k1 - k0], keys j >= t and j < row_starts[t] zero.

    With `lse_rows` [B, n] they are exp(logit - lse) (a piece of the row's softmax); without, the
    tile must hold the row's whole visible past and (probs, lse) are returned (chunk.py's rule: a
    row with no visible key has probabilities 0 and lse 0).
    """
    n = q_rows.shape[1]
    logits = q_rows @ k_all[:, k0:k1].transpose(1, 2)
    keys = torch.arange(k0, k1, device=q_rows.device)
    if k1 > g0:  # some key is not strictly before some row
        rows = torch.arange(g0, g0 + n, device=q_rows.device)
        logits.masked_fill_(keys[None, None, :] >= rows[None, :, None], float("-inf"))
    if row_starts is not None:
        logits.masked_fill_(keys[None, None, :] < row_starts[:, :, None], float("-inf"))
    if lse_rows is not None:
        return logits.sub_(lse_rows.unsqueeze(-1)).exp_()
    return softmax_with_lse_(logits)


class _Layout:
    """Who holds and sees what: the sequence's pieces (`piece_owners`), this rank's pieces with their
    chunks, and for every pair of pieces whether rows of the later one see keys of the earlier one
    (every rank derives the same answers from the full starts, so senders and receivers agree
    without talking). Rows and keys are named by sequence position; this rank's tensors hold its
    pieces one after another (`local(i)` is piece i's first row there)."""

    def __init__(self, starts, T, rank, size, chunk_size, layout="contiguous"):
        self.rank, self.owners = rank, piece_owners(size, layout)
        self.count = len(self.owners)
        self.piece = T // self.count  # positions per piece
        self.own = [i for i, owner in enumerate(self.owners) if owner == rank]
        chunk_starts = list(range(0, self.piece, chunk_size))
        self.chunks = {}
        if starts is None:
            self.piece_lo = [0] * self.count
            for i in self.own:
                self.chunks[i] = [(c0, min(c0 + chunk_size, self.piece), 0, False) for c0 in chunk_starts]
            return
        # Starts are non-decreasing along T: a block's first row has the earliest start (over rows).
        self.piece_lo = starts[:, :: self.piece].amin(0).tolist()
        for i in self.own:
            local = starts[:, i * self.piece : (i + 1) * self.piece]
            padded = torch.nn.functional.pad(local, (0, len(chunk_starts) * chunk_size - self.piece), value=-1)
            latest = padded.view(local.shape[0], len(chunk_starts), chunk_size).amax(2).amax(0)
            firsts = local[:, ::chunk_size].amin(0)
            firsts, masked = firsts.tolist(), (latest > firsts).tolist()  # host syncs here, before any tile
            self.chunks[i] = [(c0, min(c0 + chunk_size, self.piece), lo, m)
                              for c0, lo, m in zip(chunk_starts, firsts, masked)]

    def local(self, i: int) -> int:
        return self.own.index(i) * self.piece

    def sees(self, later: int, earlier: int) -> bool:
        """Rows of piece `later` see some key of piece `earlier`."""
        return earlier < later and self.piece_lo[later] < (earlier + 1) * self.piece

    def rows(self, starts, i, c0, c1, masked):
        return starts[:, i * self.piece + c0 : i * self.piece + c1] if masked else None

    def peer(self, group, i: int) -> int:
        """The global rank holding piece i (point-to-point calls name global ranks)."""
        return dist.get_global_rank(group, self.owners[i])


def _piece_starts(starts, i: int, h: int):
    """int32 [B, h] document starts of piece i relative to it (0: begun in an earlier piece), or None."""
    if starts is None:
        return None
    return (starts[:, i * h : (i + 1) * h] - i * h).clamp_(min=0).to(torch.int32).contiguous()


def _cp_forward(q_scaled, k_all, f, gamma, layout: _Layout, starts, group, triton=False):
    """s [B, L, V] and lse [B, L] for this rank's rows (solve dtype); `triton`: the diagonal pieces by
    triton_chunk.feedback_piece_fwd."""
    h, n = layout.piece, layout.count
    lse = torch.empty_like(gamma)
    piece_shape = (f.shape[0], h, f.shape[2])
    receives = {}
    for q in range(n):
        if layout.owners[q] != layout.rank and any(layout.sees(p, q) for p in layout.own):
            buffer = f.new_empty(piece_shape)
            receives[q] = (buffer, dist.irecv(buffer, layout.peer(group, q), group=group, tag=q))
    # While earlier pieces are being solved: each row's normaliser over its whole visible past.
    for i in layout.own:
        o, g = layout.local(i), i * h
        for c0, c1, lo, masked in layout.chunks[i]:
            _, lse[:, o + c0 : o + c1] = _tile_probs(q_scaled[:, o + c0 : o + c1], k_all, g + c0, lo, g + c1, None,
                                                     layout.rows(starts, i, c0, c1, masked))
    solved, sends = {}, []
    for i in layout.own:  # in sequence order: a piece needs only earlier ones
        o, g = layout.local(i), i * h
        context = f.new_zeros(piece_shape)
        for q in range(i):
            if not layout.sees(i, q):
                continue
            if q not in solved:
                buffer, request = receives[q]
                request.wait()
                solved[q] = buffer
            for c0, c1, lo, masked in layout.chunks[i]:
                k0 = max(lo, q * h)
                if k0 < (q + 1) * h:
                    probs = _tile_probs(q_scaled[:, o + c0 : o + c1], k_all, g + c0, k0, (q + 1) * h,
                                        lse[:, o + c0 : o + c1], layout.rows(starts, i, c0, c1, masked))
                    context[:, c0:c1].baddbmm_(probs, solved[q][:, k0 - q * h :])
        if triton:
            from .triton_chunk import feedback_piece_fwd

            rows = slice(o, o + h)
            solved[i] = feedback_piece_fwd(q_scaled[:, rows].contiguous(), k_all[:, g : g + h].contiguous(),
                                           f[:, rows].contiguous(), gamma[:, rows].contiguous(),
                                           lse[:, rows].contiguous(), context, 1.0, _piece_starts(starts, i, h))
        else:
            solved[i] = _diagonal_piece(q_scaled, k_all, f, gamma, lse, context, layout, starts, i)
        readers = {layout.owners[p] for p in range(i + 1, n) if layout.owners[p] != layout.rank and layout.sees(p, i)}
        sends += [dist.isend(solved[i], dist.get_global_rank(group, reader), group=group, tag=i)
                  for reader in sorted(readers)]
    for request in sends:
        request.wait()
    return torch.cat([solved[i] for i in layout.own], dim=1), lse


def _diagonal_piece(q_scaled, k_all, f, gamma, lse, context, layout: _Layout, starts, i: int):
    """s of piece i, chunk by chunk, its rows' context from earlier pieces pre-added (PyTorch tiles)."""
    h = layout.piece
    o, g = layout.local(i), i * h
    s = f.new_empty(context.shape)
    for c0, c1, lo, masked in layout.chunks[i]:
        k0 = max(lo, g)  # keys of this piece; earlier ones are in `context`
        probs = _tile_probs(q_scaled[:, o + c0 : o + c1], k_all, g + c0, k0, g + c1, lse[:, o + c0 : o + c1],
                            layout.rows(starts, i, c0, c1, masked))
        gamma_rows = gamma[:, o + c0 : o + c1]
        past = context[:, c0:c1].baddbmm_(probs[:, :, : g + c0 - k0], s[:, k0 - g : c0])
        rhs = past.mul_(gamma_rows.unsqueeze(-1)).add_(f[:, o + c0 : o + c1])
        system = _unit_lower_system(probs[:, :, g + c0 - k0 :], gamma_rows)
        s[:, c0:c1] = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    return s


def _cp_adjoint(q_scaled, k_all, gamma, lse, grad_s, layout: _Layout, starts, group, triton=False):
    """lambda = (I - B)^-T G for this rank's rows (the backward wavefront, last piece first); `triton`:
    the diagonal pieces by triton_chunk.feedback_piece_adjoint."""
    h, n = layout.piece, layout.count
    piece_shape = (grad_s.shape[0], h, grad_s.shape[2])
    receives = {}  # (later piece p, earlier piece q): B[p, q]^T lambda_p, tagged p * n + q
    for q in layout.own:
        for p in range(n - 1, q, -1):
            if layout.owners[p] != layout.rank and layout.sees(p, q):
                buffer = grad_s.new_empty(piece_shape)
                receives[p, q] = (buffer, dist.irecv(buffer, layout.peer(group, p), group=group, tag=p * n + q))
    later_terms = {i: grad_s.new_zeros(piece_shape) for i in layout.own}  # sum over later rows of gamma P^T lambda
    lams, sends = {}, []
    for i in reversed(layout.own):
        o, g = layout.local(i), i * h
        terms = later_terms[i]
        for p in range(n - 1, i, -1):  # the order later pieces finish in
            if (p, i) in receives:
                buffer, request = receives[p, i]
                request.wait()
                terms += buffer
        if triton:
            from .triton_chunk import feedback_piece_adjoint

            rows = slice(o, o + h)
            lam = feedback_piece_adjoint(q_scaled[:, rows].contiguous(), k_all[:, g : g + h].contiguous(),
                                         gamma[:, rows].contiguous(), lse[:, rows].contiguous(),
                                         grad_s[:, rows].contiguous(), terms, 1.0, _piece_starts(starts, i, h))
        else:
            lam = _diagonal_adjoint(q_scaled, k_all, gamma, lse, grad_s, terms, layout, starts, i)
        lams[i] = lam
        for q in range(i - 1, -1, -1):  # the previous piece first: it is on the critical path
            if not layout.sees(i, q):
                continue
            mine = layout.owners[q] == layout.rank
            contribution = later_terms[q] if mine else grad_s.new_zeros(piece_shape)
            for c0, c1, lo, masked in layout.chunks[i]:
                k0 = max(lo, q * h)
                if k0 < (q + 1) * h:
                    probs = _tile_probs(q_scaled[:, o + c0 : o + c1], k_all, g + c0, k0, (q + 1) * h,
                                        lse[:, o + c0 : o + c1], layout.rows(starts, i, c0, c1, masked))
                    gamma_lam = gamma[:, o + c0 : o + c1].unsqueeze(-1) * lam[:, c0:c1]
                    contribution[:, k0 - q * h :].baddbmm_(probs.transpose(1, 2), gamma_lam)
            if not mine:
                sends.append(dist.isend(contribution, layout.peer(group, q), group=group, tag=i * n + q))
    for request in sends:
        request.wait()
    return torch.cat([lams[i] for i in layout.own], dim=1)


def _diagonal_adjoint(q_scaled, k_all, gamma, lse, grad_s, terms, layout: _Layout, starts, i: int):
    """lambda of piece i in reverse chunk order, `terms` (the later pieces' B^T lambda) pre-added and
    accumulated into (PyTorch tiles)."""
    o, g = layout.local(i), i * layout.piece
    lam = torch.empty_like(terms)
    for c0, c1, lo, masked in reversed(layout.chunks[i]):
        k0 = max(lo, g)
        probs = _tile_probs(q_scaled[:, o + c0 : o + c1], k_all, g + c0, k0, g + c1, lse[:, o + c0 : o + c1],
                            layout.rows(starts, i, c0, c1, masked))
        system = _unit_lower_system(probs[:, :, g + c0 - k0 :], gamma[:, o + c0 : o + c1])
        rhs = grad_s[:, o + c0 : o + c1] + terms[:, c0:c1]
        lam[:, c0:c1] = torch.linalg.solve_triangular(system.transpose(1, 2), rhs, upper=True, unitriangular=True)
        gamma_lam = gamma[:, o + c0 : o + c1].unsqueeze(-1) * lam[:, c0:c1]
        terms[:, k0 - g : c0].baddbmm_(probs[:, :, : g + c0 - k0].transpose(1, 2), gamma_lam)
    return lam


def _cp_gradients(q_scaled, k_all, gamma, lse, lam, s_all, layout: _Layout, starts):
    """dq [B, L, K], dgamma [B, L] and this rank's rows' share of dk [B, T, K] (sequence order)."""
    scale = k_all.shape[-1] ** -0.5
    dq = torch.empty_like(q_scaled)
    dk_all = torch.zeros_like(k_all)
    dgamma = torch.empty_like(gamma)
    for i in layout.own:
        o, g = layout.local(i), i * layout.piece
        for c0, c1, lo, masked in layout.chunks[i]:
            rows = slice(o + c0, o + c1)
            probs = _tile_probs(q_scaled[:, rows], k_all, g + c0, lo, g + c1, lse[:, rows],
                                layout.rows(starts, i, c0, c1, masked))
            lam_rows, gamma_rows = lam[:, rows], gamma[:, rows].unsqueeze(-1)
            past_s = s_all[:, lo : g + c1]
            delta = (lam_rows * (probs @ past_s)).sum(-1)  # lambda . u, u = P s (the feedback context)
            dgamma[:, rows] = delta
            # dL/dlogits = gamma P (lambda . s - delta), the logits being q . k / sqrt(K)
            dlogits = ((gamma_rows * lam_rows) @ past_s.transpose(1, 2)).sub_(gamma_rows * delta.unsqueeze(-1)).mul_(probs)
            dq[:, rows] = (dlogits @ k_all[:, lo : g + c1]).mul_(scale)
            dk_all[:, lo : g + c1].baddbmm_(dlogits.transpose(1, 2), q_scaled[:, rows])  # q_scaled carries 1/sqrt(K)
    return dq, dk_all, dgamma


def _layout_like(grad: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`grad` in `ref`'s dtype and strides. Callers may reduce gradients in place assuming the
    input's layout: megatron's copy_to_tensor_model_parallel_region all-reduces a gradient only
    when it is contiguous there (an input [B, T, K] made by transposing [T, B, K])."""
    if grad.dtype == ref.dtype and grad.stride() == ref.stride():
        return grad
    return torch.empty_strided(ref.shape, ref.stride(), dtype=ref.dtype, device=grad.device).copy_(grad)


class ContextParallelFeedbackSolve(torch.autograd.Function):
    """Autograd wrapper: solves in float32 (float64 stays float64), returns s in f's dtype.

    Saves only local pieces (q_b, k_b, gamma, s, lse) and the full starts; k_b and s are gathered
    again in backward.
    """

    @staticmethod
    def forward(ctx, q_b, k_b, f, gamma, group, chunk_size, starts, layout_name, triton):
        dtype = _solve_dtype(f.dtype)
        size = dist.get_world_size(group)
        layout = _Layout(starts, f.shape[1] * size, dist.get_rank(group), size, chunk_size, layout_name)
        q32, k32, gamma32 = q_b.to(dtype), k_b.to(dtype), gamma.to(dtype)
        k_all = all_gather_sequence(k32, group, layout_name)
        # f (and so s and the message buffers shaped like it) dense: point-to-point needs contiguous tensors
        s, lse = _cp_forward(q32 * q32.shape[-1] ** -0.5, k_all, f.to(dtype).contiguous(), gamma32, layout,
                             starts, group, triton)
        ctx.save_for_backward(q_b, k_b, gamma, s, lse, starts)
        ctx.group, ctx.layout, ctx.layout_name, ctx.triton = group, layout, layout_name, triton
        ctx.f_layout = f.detach().to("meta")  # shape, strides, dtype
        return s.to(f.dtype)

    @staticmethod
    def backward(ctx, grad_s):
        q_b, k_b, gamma, s, lse, starts = ctx.saved_tensors
        group, layout, name, dtype = ctx.group, ctx.layout, ctx.layout_name, s.dtype
        q_scaled = q_b.to(dtype) * q_b.shape[-1] ** -0.5
        gamma32 = gamma.to(dtype)
        k_all = all_gather_sequence(k_b.to(dtype), group, name)
        lam = _cp_adjoint(q_scaled, k_all, gamma32, lse, grad_s.to(dtype).contiguous(), layout, starts, group,
                          ctx.triton)
        s_all = all_gather_sequence(s, group, name)
        dq, dk_all, dgamma = _cp_gradients(q_scaled, k_all, gamma32, lse, lam, s_all, layout, starts)
        dk = reduce_scatter_sequence(dk_all, group, name)
        return (_layout_like(dq, q_b), _layout_like(dk, k_b), _layout_like(lam, ctx.f_layout),
                _layout_like(dgamma, gamma), None, None, None, None, None)


def feedback_solve_context_parallel(q_b, k_b, f, gamma, group, chunk_size: int = 64, doc_ids=None,
                                    layout: str = "contiguous", impl: str = "auto"):
    """This rank's piece of s = (I - diag(gamma) alpha)^-1 f for a sequence split over `group`.

    Args:
        q_b, k_b: [B, L, K] this rank's feedback queries/keys: the positions `context_positions(T,
            CP, r, layout)` of the sequence of length T = CP * L (r = rank in `group`, CP its size).
        f: [B, L, V]; gamma: [B, L] (the same positions).
        group: the torch.distributed process group of the CP ranks (every rank calls this).
        chunk_size: rows per diagonal block and per tile (a piece need not be a multiple).
        doc_ids: optional FULL-length [B, T] integer document ids (the same on every rank; see
            feedback_solve): row t then sees only earlier keys of its own document.
        layout: "contiguous" (rank r holds piece r of CP) or "zigzag" (pieces r and 2 CP - 1 - r of
            2 CP; L even).
        impl: a feedback_impl (kernels.feedback_solve.FEEDBACK_IMPLS): "triton" ("auto" on CUDA) solves
            each diagonal piece, forward and backward, with the Triton kernels (on CPU only under
            TRITON_INTERPRET=1); the lse pass, the off-diagonal tiles and the gradient pass are PyTorch
            tiles whatever impl; "chunked" and "dense" are PyTorch tiles throughout.
    Returns s [B, L, V] in f's dtype; equals the matching rows of feedback_solve on the whole
    sequence, and so do the gradients of q_b, k_b, f and gamma.
    """
    size = dist.get_world_size(group)
    batch, length = f.shape[:2]
    if not (q_b.shape[:2] == k_b.shape[:2] == (batch, length) and gamma.shape == (batch, length)):
        raise ValueError(f"feedback_solve_context_parallel: q_b {tuple(q_b.shape)}, k_b {tuple(k_b.shape)}, "
                         f"gamma {tuple(gamma.shape)} must be this rank's [B, L] piece, like f {tuple(f.shape)}")
    context_segments(size * length, size, dist.get_rank(group), layout)  # checks the layout and the length
    starts = None
    if doc_ids is not None:  # document_starts checks the shape: full length [B, CP * L]
        starts = document_starts(doc_ids, batch, size * length, f.device)
    triton = resolve_feedback_impl(impl, f.device) == "triton"
    if triton:
        from .triton_chunk import check_triton_device  # imported lazily: Triton is optional on CPU

        check_triton_device(f.device)
    return ContextParallelFeedbackSolve.apply(q_b, k_b, f, gamma, group, chunk_size, starts, layout, triton)
