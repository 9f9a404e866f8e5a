"""Shared by the feedback-solve tests: packed sequences of documents and the packed == alone check."""
import torch

# Per sequence, document lengths (-1: padding of that length at the end, its own document). With
# chunk_size 16 they straddle chunk boundaries, and include one-token documents and a document
# that fills whole chunks.
PACKED_LAYOUTS = [[1, 15, 17, 1, 20, 6, -10], [33, 1, 1, 35], [70]]
PACKED_T = 70


def packed_doc_ids(layouts=PACKED_LAYOUTS):
    rows = []
    for lengths in layouts:
        ids = [i if n > 0 else -1 for i, n in enumerate(lengths) for _ in range(abs(n))]
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.int32)


def documents_of(doc_ids):
    """(b, start, end) for each maximal run of equal ids."""
    spans = []
    for b, row in enumerate(doc_ids.tolist()):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[t - 1]:
                spans.append((b, start, t))
                start = t
    return spans


def packed_vs_alone(solve, solve_alone, dtype, tolerances, layouts=PACKED_LAYOUTS, T=PACKED_T, K=24, V=20):
    """Output and all four input gradients of `solve(*inputs, doc_ids)` equal, document by document,
    `solve_alone` on that document's slice of the inputs (with the same output gradient)."""
    doc_ids = packed_doc_ids(layouts)
    gen = torch.Generator().manual_seed(len(layouts))
    inputs = [torch.randn(len(layouts), T, n, generator=gen, dtype=dtype) for n in (K, K, V)]
    inputs.append(0.999 * torch.tanh(2 * torch.randn(len(layouts), T, generator=gen, dtype=dtype)))
    inputs = [x.requires_grad_() for x in inputs]
    grad_out = torch.randn(len(layouts), T, V, dtype=dtype, generator=torch.Generator().manual_seed(2))
    s = solve(*inputs, doc_ids)
    grads = torch.autograd.grad(s, inputs, grad_out)
    for b, a, e in documents_of(doc_ids):
        alone = [x.detach()[b : b + 1, a:e].clone().requires_grad_() for x in inputs]
        s_alone = solve_alone(*alone)
        grads_alone = torch.autograd.grad(s_alone, alone, grad_out[b : b + 1, a:e])
        where = f"sequence {b}, document [{a}, {e})"
        torch.testing.assert_close(s[b : b + 1, a:e], s_alone, **tolerances, msg=lambda m: f"s, {where}: {m}")
        for name, got, want in zip(("q_b", "k_b", "f", "gamma"), grads, grads_alone):
            torch.testing.assert_close(got[b : b + 1, a:e], want, **tolerances, msg=lambda m: f"d{name}, {where}: {m}")
