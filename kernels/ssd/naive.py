"""The SSD scan one position at a time (kernels/ssd/__init__.py has the recurrence and the shapes):
the oracle the chunked scan is tested against, and the input checks both share."""
import torch


def per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, T, g, N] -> [b, T, h, N]: each group's B or C for its heads."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def check_inputs(x, B, doc_ids):
    """A clear error for heads that the B/C groups do not divide, or doc_ids not [b, T]."""
    h, g = x.shape[2], B.shape[2]
    if h % g:
        raise ValueError(f"ssd: the number of heads ({h}) must be a multiple of the number of B/C groups ({g})")
    if doc_ids is not None and tuple(doc_ids.shape) != tuple(x.shape[:2]):
        raise ValueError(f"ssd: doc_ids must be [batch, T] = {list(x.shape[:2])}, got {list(doc_ids.shape)}")


def ssd_recurrence(x, dt, A, B, C, initial_state=None, doc_ids=None):
    """The recurrence, one step per position: the oracle of kernels.ssd.chunk.ssd_chunked."""
    check_inputs(x, B, doc_ids)
    b, T, h, p = x.shape
    B, C = per_head(B, h), per_head(C, h)
    state = x.new_zeros(b, h, B.shape[-1], p) if initial_state is None else initial_state
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)  # [b, h]
        if doc_ids is not None and t > 0:  # a document starts here: forget the previous one
            decay = decay * (doc_ids[:, t] == doc_ids[:, t - 1]).to(decay.dtype)[:, None]
        state = decay[..., None, None] * state + torch.einsum("bhn,bh,bhp->bhnp", B[:, t], dt[:, t], x[:, t])
        ys.append(torch.einsum("bhn,bhnp->bhp", C[:, t], state))
    return torch.stack(ys, dim=1), state
