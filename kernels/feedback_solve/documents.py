"""Document boundaries for the feedback solve: doc_ids -> the first position of each token's document.

A document is a maximal run of equal `doc_ids` along T (ids are non-decreasing within a packed
sequence; -1 padding is a run like any other). Because documents are contiguous, "key j is in the
strict past of query t within t's document" is exactly `starts[t] <= j < t`, so every implementation
masks with one integer per row instead of a T x T comparison.
"""
import torch


def document_starts(doc_ids: torch.Tensor, batch: int, T: int, device: torch.device) -> torch.Tensor:
    """[B, T] int64: the index of the first position of t's document (0 for a single document).

    Raises ValueError naming `doc_ids` when its shape, dtype or device does not fit the solve.
    """
    if doc_ids.shape != (batch, T):
        raise ValueError(f"doc_ids must be [B, T] = [{batch}, {T}] (one document id per position), "
                         f"got {tuple(doc_ids.shape)}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must be an integer tensor (document index per position), got {doc_ids.dtype}")
    if doc_ids.device != device:
        raise ValueError(f"doc_ids is on {doc_ids.device} but the solve's inputs are on {device}: move it there")
    positions = torch.arange(T, device=device).expand(batch, T)
    is_start = torch.ones(batch, T, dtype=torch.bool, device=device)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(is_start, positions, 0).cummax(dim=1).values
