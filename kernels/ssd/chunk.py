"""The chunked SSD scan (kernels/ssd/__init__.py has the recurrence and the shapes): within a chunk
the quadratic, attention-like form, across chunks the carried state."""
import torch

from .naive import check_inputs


def ssd_chunked(x, dt, A, B, C, chunk_size: int = 64, initial_state=None, doc_ids=None):
    """The chunked SSD: within a chunk the quadratic (attention-like) form with the decay mask
    L[i, j] = exp(cum_i - cum_j) (i >= j, same document), across chunks the state carried by the
    recurrence. The same function as naive.ssd_recurrence up to rounding, in O(T Q) work per head.

    Matmuls per chunk of n positions (model/flops.py counts these): C.B per group (2 n^2 N g),
    scores @ x (2 n^2 h P), the carried state read by C (2 n h N P; skipped while the state is
    zero: the first chunk without initial_state) and the state update (2 n h N P)."""
    if chunk_size < 1:
        raise ValueError(f"ssd_chunked: chunk_size must be >= 1, got {chunk_size}")
    check_inputs(x, B, doc_ids)
    b, T, h, p = x.shape
    g, n_state = B.shape[2], B.shape[-1]
    hg = h // g
    x = x.view(b, T, g, hg, p)
    state = None if initial_state is None else initial_state.view(b, g, hg, n_state, p)
    ys = []
    for c0 in range(0, T, chunk_size):
        c1 = min(c0 + chunk_size, T)
        q = c1 - c0
        xc, dtc, Bc, Cc = x[:, c0:c1], dt[:, c0:c1].view(b, q, g, hg), B[:, c0:c1], C[:, c0:c1]
        cum = (dtc * A.view(g, hg)).cumsum(dim=1)  # [b, q, g, hg]: log of the decay from the chunk start
        visible = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()[None]  # [1, i, j]
        if doc_ids is not None:
            docs = doc_ids[:, c0:c1]
            visible = visible & (docs[:, :, None] == docs[:, None, :])
            # the carried state reaches a position (and crosses the chunk) only within its document
            same_as_before = docs == doc_ids[:, max(c0 - 1, 0), None]  # [b, q]
        diff = (cum[:, :, None] - cum[:, None]).masked_fill(~visible[..., None, None], float("-inf"))
        scores = torch.einsum("bign,bjgn->bijg", Cc, Bc)[..., None] * torch.exp(diff) * dtc[:, None]
        y = torch.einsum("bijgh,bjghp->bighp", scores, xc)
        if state is not None:
            decayed = torch.exp(cum)
            if doc_ids is not None:
                decayed = decayed * same_as_before[:, :, None, None].to(decayed.dtype)
            y = y + torch.einsum("bighn,bghnp->bighp", Cc[:, :, :, None] * decayed[..., None], state)
        to_end = torch.exp(cum[:, -1:] - cum) * dtc  # [b, q, g, hg]
        carry = torch.exp(cum[:, -1])  # [b, g, hg]
        if doc_ids is not None:
            in_last = (docs == docs[:, -1:]).to(to_end.dtype)  # only the last document's positions
            to_end = to_end * in_last[:, :, None, None]
            carry = carry * same_as_before[:, -1, None, None].to(carry.dtype)
        update = torch.einsum("bjgn,bjghp->bghnp", Bc, xc * to_end[..., None])
        state = update if state is None else carry[..., None, None] * state + update
        ys.append(y)
    return torch.cat(ys, dim=1).reshape(b, T, h, p), state.reshape(b, h, n_state, p)
