"""Context-parallel Sessa feedback solve: one sequence split into CP contiguous pieces (issue 19).

Rank r of the CP group holds positions [r*L, (r+1)*L), L = T / CP, of q_b, k_b [B, L, K], f [B, L, V]
and gamma [B, L]; `doc_ids`, when given, is the FULL [B, T] on every rank (as everywhere in the
model: it is B*T integers, and every rank needs the document starts of every position to know which
earlier pieces its rows can see). Nothing T x T is formed or sent: tiles are [C, <= T] as in
chunk.py, and messages are [B, L, V] pieces.

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

from .chunk import _unit_lower_system, softmax_with_lse_
from .documents import document_starts
from .naive import _solve_dtype


def all_gather_sequence(piece: torch.Tensor, group) -> torch.Tensor:
    """All-gather [B, L, ...] pieces along dim 1 in rank order: [B, CP * L, ...]."""
    piece = piece.contiguous()  # gloo sends and receives dense buffers only
    pieces = [torch.empty_like(piece) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, piece, group=group)
    return torch.cat(pieces, dim=1)


def reduce_scatter_sequence(full: torch.Tensor, group) -> torch.Tensor:
    """Sum [B, T, ...] over the group and keep this rank's piece [B, T / CP, ...] (reduce-scatter)."""
    size = dist.get_world_size(group)
    pieces = [p.contiguous() for p in full.chunk(size, dim=1)]
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
    """Who sees what: this rank's chunks and, for every pair of pieces, whether rows of the later
    one can see keys of the earlier one (every rank derives the same answers from the full starts,
    so senders and receivers agree without talking)."""

    def __init__(self, starts, T, rank, size, chunk_size):
        self.rank, self.size, self.length = rank, size, T // size
        self.offset = rank * self.length
        chunk_starts = list(range(0, self.length, chunk_size))
        if starts is None:
            self.piece_lo = [0] * size
            self.chunks = [(c0, min(c0 + chunk_size, self.length), 0, False) for c0 in chunk_starts]
            return
        # Starts are non-decreasing along T: a block's first row has the earliest start (over rows).
        local = starts[:, self.offset : self.offset + self.length]
        padded = torch.nn.functional.pad(local, (0, len(chunk_starts) * chunk_size - self.length), value=-1)
        latest = padded.view(local.shape[0], len(chunk_starts), chunk_size).amax(2).amax(0)
        firsts = local[:, ::chunk_size].amin(0)
        piece_lo, firsts, masked = (starts[:, :: self.length].amin(0).tolist(), firsts.tolist(),
                                    (latest > firsts).tolist())  # host syncs here, before any tile
        self.piece_lo = piece_lo
        self.chunks = [(c0, min(c0 + chunk_size, self.length), lo, m)
                       for c0, lo, m in zip(chunk_starts, firsts, masked)]

    def sees(self, later: int, earlier: int) -> bool:
        """Rows of piece `later` see some key of piece `earlier`."""
        return earlier < later and self.piece_lo[later] < (earlier + 1) * self.length

    def rows(self, starts, c0, c1, masked):
        return starts[:, self.offset + c0 : self.offset + c1] if masked else None


def _cp_forward(q_scaled, k_all, f, gamma, layout: _Layout, starts, group):
    """s [B, L, V] and lse [B, L] for this rank's rows (solve dtype)."""
    L, o = layout.length, layout.offset
    lse = torch.empty_like(gamma)
    receives = {}
    for q in range(layout.rank):
        if layout.sees(layout.rank, q):
            buffer = torch.empty_like(f)
            receives[q] = (buffer, dist.irecv(buffer, dist.get_global_rank(group, q), group=group))
    # While earlier pieces are being solved: each row's normaliser over its whole visible past.
    for c0, c1, lo, masked in layout.chunks:
        _, lse[:, c0:c1] = _tile_probs(q_scaled[:, c0:c1], k_all, o + c0, lo, o + c1, None,
                                       layout.rows(starts, c0, c1, masked))
    context = torch.zeros_like(f)
    for q, (s_q, request) in receives.items():  # in rank order: the order they are solved in
        request.wait()
        for c0, c1, lo, masked in layout.chunks:
            k0 = max(lo, q * L)
            if k0 < (q + 1) * L:
                probs = _tile_probs(q_scaled[:, c0:c1], k_all, o + c0, k0, (q + 1) * L, lse[:, c0:c1],
                                    layout.rows(starts, c0, c1, masked))
                context[:, c0:c1].baddbmm_(probs, s_q[:, k0 - q * L :])
    s = torch.empty_like(f)
    for c0, c1, lo, masked in layout.chunks:
        k0 = max(lo, o)  # keys of this piece; earlier ones are in `context`
        probs = _tile_probs(q_scaled[:, c0:c1], k_all, o + c0, k0, o + c1, lse[:, c0:c1],
                            layout.rows(starts, c0, c1, masked))
        gamma_rows = gamma[:, c0:c1]
        past = context[:, c0:c1].baddbmm_(probs[:, :, : o + c0 - k0], s[:, k0 - o : c0])
        rhs = past.mul_(gamma_rows.unsqueeze(-1)).add_(f[:, c0:c1])
        system = _unit_lower_system(probs[:, :, o + c0 - k0 :], gamma_rows)
        s[:, c0:c1] = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    sends = [dist.isend(s, dist.get_global_rank(group, p), group=group)
             for p in range(layout.rank + 1, layout.size) if layout.sees(p, layout.rank)]
    for request in sends:
        request.wait()
    return s, lse


def _cp_adjoint(q_scaled, k_all, gamma, lse, grad_s, layout: _Layout, starts, group):
    """lambda = (I - B)^-T G for this rank's rows (the backward wavefront, last rank first)."""
    L, o = layout.length, layout.offset
    later_terms = torch.zeros_like(grad_s)  # sum over later rows i of gamma[i] P[i, t] lambda[i]
    receives = []
    for p in range(layout.size - 1, layout.rank, -1):
        if layout.sees(p, layout.rank):
            buffer = torch.empty_like(grad_s)
            receives.append((buffer, dist.irecv(buffer, dist.get_global_rank(group, p), group=group)))
    for buffer, request in receives:
        request.wait()
        later_terms += buffer
    lam = torch.empty_like(grad_s)
    for c0, c1, lo, masked in reversed(layout.chunks):
        k0 = max(lo, o)
        probs = _tile_probs(q_scaled[:, c0:c1], k_all, o + c0, k0, o + c1, lse[:, c0:c1],
                            layout.rows(starts, c0, c1, masked))
        system = _unit_lower_system(probs[:, :, o + c0 - k0 :], gamma[:, c0:c1])
        rhs = grad_s[:, c0:c1] + later_terms[:, c0:c1]
        lam[:, c0:c1] = torch.linalg.solve_triangular(system.transpose(1, 2), rhs, upper=True, unitriangular=True)
        gamma_lam = gamma[:, c0:c1].unsqueeze(-1) * lam[:, c0:c1]
        later_terms[:, k0 - o : c0].baddbmm_(probs[:, :, : o + c0 - k0].transpose(1, 2), gamma_lam)
    sends = []
    for q in range(layout.rank - 1, -1, -1):  # the previous piece first: it is on the critical path
        if not layout.sees(layout.rank, q):
            continue
        terms = torch.zeros_like(grad_s)
        for c0, c1, lo, masked in layout.chunks:
            k0 = max(lo, q * L)
            if k0 < (q + 1) * L:
                probs = _tile_probs(q_scaled[:, c0:c1], k_all, o + c0, k0, (q + 1) * L, lse[:, c0:c1],
                                    layout.rows(starts, c0, c1, masked))
                gamma_lam = gamma[:, c0:c1].unsqueeze(-1) * lam[:, c0:c1]
                terms[:, k0 - q * L :].baddbmm_(probs.transpose(1, 2), gamma_lam)
        sends.append(dist.isend(terms, dist.get_global_rank(group, q), group=group))
    for request in sends:
        request.wait()
    return lam


def _cp_gradients(q_scaled, k_all, gamma, lse, lam, s_all, layout: _Layout, starts):
    """dq [B, L, K], dgamma [B, L] and this rank's rows' share of dk [B, T, K]."""
    o = layout.offset
    scale = k_all.shape[-1] ** -0.5
    dq = torch.empty_like(q_scaled)
    dk_all = torch.zeros_like(k_all)
    dgamma = torch.empty_like(gamma)
    for c0, c1, lo, masked in layout.chunks:
        probs = _tile_probs(q_scaled[:, c0:c1], k_all, o + c0, lo, o + c1, lse[:, c0:c1],
                            layout.rows(starts, c0, c1, masked))
        lam_rows, gamma_rows = lam[:, c0:c1], gamma[:, c0:c1].unsqueeze(-1)
        past_s = s_all[:, lo : o + c1]
        delta = (lam_rows * (probs @ past_s)).sum(-1)  # lambda . u, u = P s (the feedback context)
        dgamma[:, c0:c1] = delta
        # dL/dlogits = gamma P (lambda . s - delta), the logits being q . k / sqrt(K)
        dlogits = ((gamma_rows * lam_rows) @ past_s.transpose(1, 2)).sub_(gamma_rows * delta.unsqueeze(-1)).mul_(probs)
        dq[:, c0:c1] = (dlogits @ k_all[:, lo : o + c1]).mul_(scale)
        dk_all[:, lo : o + c1].baddbmm_(dlogits.transpose(1, 2), q_scaled[:, c0:c1])  # q_scaled carries 1/sqrt(K)
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
    def forward(ctx, q_b, k_b, f, gamma, group, chunk_size, starts):
        dtype = _solve_dtype(f.dtype)
        size = dist.get_world_size(group)
        layout = _Layout(starts, f.shape[1] * size, dist.get_rank(group), size, chunk_size)
        q32, k32, gamma32 = q_b.to(dtype), k_b.to(dtype), gamma.to(dtype)
        k_all = all_gather_sequence(k32, group)
        # f (and so s and the message buffers shaped like it) dense: point-to-point needs contiguous tensors
        s, lse = _cp_forward(q32 * q32.shape[-1] ** -0.5, k_all, f.to(dtype).contiguous(), gamma32, layout,
                             starts, group)
        ctx.save_for_backward(q_b, k_b, gamma, s, lse, starts)
        ctx.group, ctx.layout, ctx.f_layout = group, layout, f.detach().to("meta")  # shape, strides, dtype
        return s.to(f.dtype)

    @staticmethod
    def backward(ctx, grad_s):
        q_b, k_b, gamma, s, lse, starts = ctx.saved_tensors
        group, layout, dtype = ctx.group, ctx.layout, s.dtype
        q_scaled = q_b.to(dtype) * q_b.shape[-1] ** -0.5
        gamma32 = gamma.to(dtype)
        k_all = all_gather_sequence(k_b.to(dtype), group)
        lam = _cp_adjoint(q_scaled, k_all, gamma32, lse, grad_s.to(dtype).contiguous(), layout, starts, group)
        s_all = all_gather_sequence(s, group)
        dq, dk_all, dgamma = _cp_gradients(q_scaled, k_all, gamma32, lse, lam, s_all, layout, starts)
        dk = reduce_scatter_sequence(dk_all, group)
        return (_layout_like(dq, q_b), _layout_like(dk, k_b), _layout_like(lam, ctx.f_layout),
                _layout_like(dgamma, gamma), None, None, None)


def feedback_solve_context_parallel(q_b, k_b, f, gamma, group, chunk_size: int = 64, doc_ids=None):
    """This rank's piece of s = (I - diag(gamma) alpha)^-1 f for a sequence split over `group`.

    Args:
        q_b, k_b: [B, L, K] this rank's feedback queries/keys, positions [r*L, (r+1)*L) of the
            sequence of length T = CP * L (r = rank in `group`, CP its size).
        f: [B, L, V]; gamma: [B, L] (the same positions).
        group: the torch.distributed process group of the CP ranks (every rank calls this).
        chunk_size: rows per diagonal block and per tile (L need not be a multiple).
        doc_ids: optional FULL-length [B, T] integer document ids (the same on every rank; see
            feedback_solve): row t then sees only earlier keys of its own document.
    Returns s [B, L, V] in f's dtype; equals the matching rows of feedback_solve on the whole
    sequence, and so do the gradients of q_b, k_b, f and gamma.
    """
    size = dist.get_world_size(group)
    batch, length = f.shape[:2]
    if not (q_b.shape[:2] == k_b.shape[:2] == (batch, length) and gamma.shape == (batch, length)):
        raise ValueError(f"feedback_solve_context_parallel: q_b {tuple(q_b.shape)}, k_b {tuple(k_b.shape)}, "
                         f"gamma {tuple(gamma.shape)} must be this rank's [B, L] piece, like f {tuple(f.shape)}")
    starts = None
    if doc_ids is not None:  # document_starts checks the shape: full length [B, CP * L]
        starts = document_starts(doc_ids, batch, size * length, f.device)
    return ContextParallelFeedbackSolve.apply(q_b, k_b, f, gamma, group, chunk_size, starts)
