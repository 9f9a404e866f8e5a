"""Mamba-2's state-space duality (SSD) scan in PyTorch: the chunked algorithm and its step-by-step
recurrence (the oracle), for the `M` block of model.layer_pattern (not wired into the stack yet).

Per head h, with a_t = exp(dt_t A_h) (A_h < 0, dt_t > 0):
    S_t = a_t S_{t-1} + dt_t B_t^T x_t          (state [N, P])
    y_t = C_t S_t                               (the D skip term is the caller's)
Shapes: x [b, T, h, P], dt [b, T, h], A [h], B / C [b, T, h, N] (groups already expanded to heads),
initial_state [b, h, N, P] or None (zeros). Both functions return (y [b, T, h, P], final state).
"""
import torch


def ssd_recurrence(x, dt, A, B, C, initial_state=None):
    """The recurrence, one step per position (decoding, and the oracle of `ssd_chunked`)."""
    b, T, h, p = x.shape
    state = x.new_zeros(b, h, B.shape[-1], p) if initial_state is None else initial_state
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)  # [b, h]
        state = decay[..., None, None] * state + torch.einsum("bhn,bh,bhp->bhnp", B[:, t], dt[:, t], x[:, t])
        ys.append(torch.einsum("bhn,bhnp->bhp", C[:, t], state))
    return torch.stack(ys, dim=1), state


def ssd_chunked(x, dt, A, B, C, chunk_size: int = 64, initial_state=None):
    """The chunked SSD: within a chunk the quadratic (attention-like) form with the decay mask
    L[i, j] = exp(cum_i - cum_j) (i >= j), across chunks the state carried by the recurrence.
    The same function as `ssd_recurrence` up to rounding, in O(T Q) work per head."""
    if chunk_size < 1:
        raise ValueError(f"ssd_chunked: chunk_size must be >= 1, got {chunk_size}")
    b, T, h, p = x.shape
    state = x.new_zeros(b, h, B.shape[-1], p) if initial_state is None else initial_state
    ys = []
    for c0 in range(0, T, chunk_size):
        c1 = min(c0 + chunk_size, T)
        xc, dtc, Bc, Cc = x[:, c0:c1], dt[:, c0:c1], B[:, c0:c1], C[:, c0:c1]
        cum = (dtc * A).cumsum(dim=1)  # [b, q, h]: log of the decay from the chunk start
        q = c1 - c0
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
        diff = (cum[:, :, None, :] - cum[:, None, :, :]).masked_fill(~causal[None, :, :, None], float("-inf"))
        scores = torch.einsum("bihn,bjhn->bijh", Cc, Bc) * torch.exp(diff) * dtc[:, None]  # [b, i, j, h]
        y = torch.einsum("bijh,bjhp->bihp", scores, xc)
        y = y + torch.einsum("bihn,bhnp->bihp", Cc * torch.exp(cum)[..., None], state)  # the carried state
        to_end = torch.exp(cum[:, -1:] - cum) * dtc  # [b, q, h]
        state = (torch.exp(cum[:, -1])[..., None, None] * state
                 + torch.einsum("bjhn,bjh,bjhp->bhnp", Bc, to_end, xc))
        ys.append(y)
    return torch.cat(ys, dim=1), state
