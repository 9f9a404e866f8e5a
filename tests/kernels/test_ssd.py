"""kernels/ssd: the chunked SSD scan (chunk.py) equals the step-by-step recurrence (naive.py) (fp64, 1e-10), outputs,
final states and gradients of every input, for chunks that divide T and ragged ones, with B/C
shared by groups of heads and with packed documents (== each document alone)."""
import pytest
import torch

from kernels.ssd import ssd, ssd_chunked, ssd_recurrence


def inputs(b=2, T=37, h=3, p=4, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    dt = torch.nn.functional.softplus(randn(b, T, h))
    A = -torch.exp(randn(h) * 0.5)
    return dict(x=randn(b, T, h, p), dt=dt, A=A, B=randn(b, T, h, n), C=randn(b, T, h, n),
                initial_state=randn(b, h, n, p))


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 37, 64])
def test_chunked_equals_recurrence_with_gradients(chunk_size):
    tensors = {k: v.requires_grad_(True) for k, v in inputs().items()}
    weights = torch.randn(2, 37, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights_state = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_chunked_equals_recurrence(tensors, chunk_size, lambda y, state: (y * weights).sum() + (state * weights_state).sum())


def assert_chunked_equals_recurrence(tensors, chunk_size, loss, **extra):
    """Outputs, final states and the gradient of `loss(y, state)` for every input agree to 1e-10."""
    results = []
    for scan in (ssd_recurrence, lambda **kw: ssd_chunked(**kw, chunk_size=chunk_size)):
        y, state = scan(**tensors, **extra)
        grads = torch.autograd.grad(loss(y, state), list(tensors.values()))
        results.append((y, state, grads))
    (y0, s0, g0), (y1, s1, g1) = results
    torch.testing.assert_close(y1, y0, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s1, s0, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(tensors, g1, g0):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_chunks_continue_from_a_state():
    """Prefill then continue from the returned state == one pass (the decoding contract)."""
    t = inputs()
    full, final = ssd_chunked(**t, chunk_size=8)
    first = {k: (v[:, :20] if v.dim() > 1 and k != "initial_state" else v) for k, v in t.items()}
    y_a, state = ssd_chunked(**first, chunk_size=8)
    rest = {k: (v[:, 20:] if v.dim() > 1 and k != "initial_state" else v) for k, v in t.items()} | {"initial_state": state}
    y_b, final_b = ssd_recurrence(**rest)
    torch.testing.assert_close(torch.cat((y_a, y_b), dim=1), full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(final_b, final, atol=1e-10, rtol=1e-10)


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        ssd_chunked(**inputs(), chunk_size=0)


def grouped_inputs(b=2, T=29, h=4, g=2, p=3, n=5, seed=3):
    t = inputs(b, T, h, p, n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return t | dict(B=torch.randn(b, T, g, n, generator=gen, dtype=torch.float64),
                    C=torch.randn(b, T, g, n, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
def test_documents_and_groups_chunked_equals_recurrence(chunk_size):
    """B/C shared by groups of heads and packed documents (boundaries inside and at chunk edges):
    chunked == recurrence, outputs, final state and gradients."""
    doc_ids = torch.repeat_interleave(torch.arange(5), torch.tensor([4, 1, 9, 8, 7]))[None].repeat(2, 1)
    doc_ids[1] = torch.repeat_interleave(torch.arange(2), torch.tensor([14, 15]))
    tensors = {k: v.requires_grad_(True) for k, v in grouped_inputs().items()}
    assert_chunked_equals_recurrence(tensors, chunk_size, lambda y, state: (y * y.detach().sin()).sum() + state.sum(),
                                     doc_ids=doc_ids)


def test_packed_documents_equal_each_document_alone():
    t = grouped_inputs(b=1, T=21)
    del t["initial_state"]
    lengths = [6, 1, 14]
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    packed, _ = ssd_chunked(**t, chunk_size=4, doc_ids=doc_ids)
    pieces = [ssd_chunked(**{k: v[:, s:s + n] if k != "A" else v for k, v in t.items()}, chunk_size=4)[0]
              for s, n in zip([0, 6, 7], lengths)]
    torch.testing.assert_close(packed, torch.cat(pieces, dim=1), atol=1e-10, rtol=1e-10)


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of the number of B/C groups \(3\)"):
        ssd_chunked(**grouped_inputs(g=3))


def test_dispatch_runs_the_named_implementation():
    t = inputs(T=9)
    for impl, scan in (("recurrent", ssd_recurrence), ("chunked", lambda **kw: ssd_chunked(**kw, chunk_size=4))):
        got, expected = ssd(**t, impl=impl, chunk_size=4), scan(**t)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), impl
    with pytest.raises(ValueError, match="impl must be one of"):
        ssd(**t, impl="triton")
