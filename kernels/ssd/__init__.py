"""Mamba-2's state-space duality (SSD) scan, for the `M` block of model.layer_pattern (model/mamba.py).

Implementations (laid out like kernels/feedback_solve/):
  recurrent -- naive.py: the step-by-step recurrence; the oracle.
  chunked   -- chunk.py: the chunked SSD (quadratic within a chunk, the state across chunks).
Under context parallelism context_parallel.py scans each rank's pieces and passes the state across
ranks (all-gathered per-piece summaries).

Per head h, with a_t = exp(dt_t A_h) (A_h < 0, dt_t > 0):
    S_t = a_t S_{t-1} + dt_t B_t^T x_t          (state [N, P])
    y_t = C_t S_t                               (the D skip term is the caller's)
Shapes: x [b, T, h, P], dt [b, T, h], A [h], B / C [b, T, g, N] with g groups dividing h (heads
head i reads group i // (h / g); g = h: one B/C per head), initial_state [b, h, N, P] or None
(zeros). doc_ids [b, T] (packed documents, each one's positions contiguous): a_t = 0 at the first
position of a document, so no state crosses a boundary; initial_state belongs to the document of
position 0.
Every implementation returns (y [b, T, h, P], final state [b, h, N, P]).
"""
from .chunk import ssd_chunked
from .naive import ssd_recurrence

SSD_IMPLS = ("chunked", "recurrent")

__all__ = ["SSD_IMPLS", "ssd", "ssd_chunked", "ssd_recurrence"]


def ssd(x, dt, A, B, C, impl: str = "chunked", chunk_size: int = 64, initial_state=None, doc_ids=None):
    """(y [b, T, h, P], final state [b, h, N, P]) of the scan (shapes above); `chunk_size`: positions
    per chunk of the chunked scan."""
    if impl == "chunked":
        return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state, doc_ids)
    if impl == "recurrent":
        return ssd_recurrence(x, dt, A, B, C, initial_state, doc_ids)
    raise ValueError(f"ssd: impl must be one of {SSD_IMPLS}, got {impl!r}")
