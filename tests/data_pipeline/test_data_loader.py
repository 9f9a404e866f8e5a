"""The streaming loader: batch format, coverage, shuffling, exact resume, re-dealing to new dp sizes."""

import json
from collections import Counter

import pytest
import torch

from data_pipeline.loader import build_dataloader, merge_dp_states
from data_pipeline.manifest import read_manifest
from dp_helpers import batches, prepare_small, read_split, sample_ids


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out, _ = prepare_small(tmp_path_factory.mktemp("loader"), n_docs=60)
    return out


def loader(data, rank=0, size=1, workers=0, batch=3, seed=7, **kw):
    return build_dataloader(data, "train", batch, rank, size, workers, seed, **kw)


def n_train(data):
    return read_manifest(data)["splits"]["train"]["samples"]


def test_batch_format_matches_stored_samples(data):
    stored = read_split(data, "train")
    for batch in batches(loader(data, batch=4), 10):
        tokens, ids = batch["tokens"], batch["doc_ids"]
        assert tokens.dtype == torch.int64 and tokens.shape == (4, 17)
        assert ids.dtype == torch.int32 and ids.shape == (4, 17)
        assert batch["sample_index"].dtype == torch.int64 and batch["epoch"].tolist() == [0] * 4
        for row, index in enumerate(batch["sample_index"].tolist()):
            sample_tokens, n_valid, starts = stored[index]
            assert tokens[row].tolist() == sample_tokens.tolist()
            # a new document id right after each EOT, -1 on padding only
            after_eot = [p for p in range(1, n_valid) if tokens[row, p - 1] == 4095]
            assert [p for p in range(1, 17) if ids[row, p] > ids[row, p - 1]] == after_eot
            assert (ids[row, n_valid:] == -1).all() and (ids[row, :n_valid] >= 0).all()


def test_bounded_pass_covers_every_sample_once_over_ranks(data):
    N = n_train(data)
    for size in (1, 2, 3):
        seen = Counter()
        for rank in range(size):
            seen.update(sample_ids(list(loader(data, rank, size, infinite=False, lanes=4))))
        assert seen == Counter({(0, i): 1 for i in range(N)}), size
    # a second iteration of a bounded loader repeats the same pass
    one = loader(data, infinite=False)
    assert sample_ids(list(one)) == sample_ids(list(one))


def test_order_depends_on_seed_and_epoch_only(data):
    N = n_train(data)
    a, b, c = (sample_ids(batches(loader(data, seed=s), 2 * N // 3)) for s in (7, 7, 8))
    assert a == b and a != c
    epoch0 = [i for e, i in a if e == 0]
    epoch1 = [i for e, i in a if e == 1]
    assert sorted(epoch0) == list(range(N)) and epoch1 and epoch1 != epoch0[:len(epoch1)]


def test_state_is_json_and_resumes_exactly_across_epochs(data):
    N = n_train(data)
    k = N // 3 - 3  # 3-sample batches: the resumed part crosses into epoch 1
    reference = batches(loader(data), k + 10)
    first = loader(data)
    assert sample_ids(batches(first, k)) == sample_ids(reference[:k])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader(data)
    resumed.load_state_dict(state)
    after = batches(resumed, 10)
    assert {e for e, _ in sample_ids(after)} == {0, 1}
    for got, want in zip(after, reference[k:]):
        assert all(torch.equal(got[key], want[key]) for key in want)
    # a changed micro-batch size resumes at the same sample too
    other = loader(data, batch=5)
    other.load_state_dict(state)
    assert sample_ids(batches(other, 1)) == sample_ids(reference[k:])[:5]


def test_tokenizer_mismatch_and_missing_data_are_clear(data, tmp_path):
    with pytest.raises(ValueError, match="pydocs4k-5cd72dae532c.*o200k_base-70724d399878"):
        loader(data, expected_tokenizer_id="o200k_base-70724d399878")
    loader(data, expected_tokenizer_id="pydocs4k-5cd72dae532c")
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*python -m data_pipeline prepare"):
        loader(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"(?s)manifest.json not found.*python -m data_pipeline prepare"):
        loader(tmp_path)
    with pytest.raises(ValueError, match="no split 'test'"):
        build_dataloader(data, "test", 1, 0, 1, 0, 0)
    state = loader(data).state_dict()
    with pytest.raises(ValueError, match="seed"):
        loader(data, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        loader(data).load_state_dict(state | {"tokenizer_id": "gpt2-a823f0a7bb90"})


def test_layout_change_without_merge_is_refused(data):
    state = loader(data, 0, 2).state_dict()
    with pytest.raises(ValueError, match="merge_dp_states"):
        loader(data, 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="one state per old rank"):
        merge_dp_states([state], 0, 1)


def run_ranks(data, size, steps, states=None, workers=0, **kw):
    """Every rank takes `steps` batches (from `states` if given); return (loaders, samples seen)."""
    loaders, seen = [], []
    for rank in range(size):
        ld = loader(data, rank, size, workers=workers, **kw)
        if states is not None:
            ld.load_state_dict(merge_dp_states(states, rank, size))
        seen += sample_ids(batches(ld, steps) if steps else list(ld))
        loaders.append(ld)
    return loaders, seen


@pytest.mark.parametrize("new_size", [1, 2, 3])
@pytest.mark.parametrize("infinite", [True, False])
def test_resume_on_another_dp_size_sees_each_sample_once(data, new_size, infinite):
    N = n_train(data)
    old, seen = run_ranks(data, 2, 4, infinite=infinite)
    states = [ld.state_dict() for ld in old]
    if infinite:
        # run the new ranks well into epoch 1: epoch 0 must be complete and never repeated
        _, more = run_ranks(data, new_size, (N // new_size) // 3 + 2, states, infinite=True)
        counts = Counter(seen + more)
        assert all(counts[(0, i)] == 1 for i in range(N))
        assert max(counts.values()) == 1 and any(e == 1 for e, _ in more)
    else:
        _, more = run_ranks(data, new_size, 0, states, infinite=False)
        assert Counter(seen + more) == Counter({(0, i): 1 for i in range(N)})


def test_chained_redeal_2_to_3_to_1(data):
    N = n_train(data)
    old, seen = run_ranks(data, 2, 3)
    mid, more = run_ranks(data, 3, 2, [ld.state_dict() for ld in old])
    _, rest = run_ranks(data, 1, N, [ld.state_dict() for ld in mid])
    counts = Counter(seen + more + rest)
    assert all(counts[(0, i)] == 1 for i in range(N)) and max(counts.values()) == 1


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("infinite", [True, False])
def test_two_ranks_resume_exactly_across_epoch_boundary(data, workers, infinite):
    per_rank = n_train(data) // 2
    k = per_rank // 3 - 3  # batches before the stop: odd, so not a multiple of the worker count
    k += 1 - k % 2
    more = 8 if infinite else per_rank  # bounded: run out the pass (short last batches included)
    for rank in range(2):
        reference = batches(loader(data, rank, 2, workers=workers, infinite=infinite), k + more)
        first = loader(data, rank, 2, workers=workers, infinite=infinite)
        assert sample_ids(batches(first, k)) == sample_ids(reference[:k])
        resumed = loader(data, rank, 2, workers=workers, infinite=infinite)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        after = batches(resumed, more)
        assert len(after) == len(reference) - k
        for got, want in zip(after, reference[k:]):
            assert all(torch.equal(got[key], want[key]) for key in want)
        if infinite:
            assert {e for e, _ in sample_ids(after)} == {0, 1}


@pytest.mark.slow
def test_two_workers_redeal_to_three_ranks_without_workers(data):
    N = n_train(data)
    old, seen = run_ranks(data, 2, 5, workers=2)
    _, more = run_ranks(data, 3, N // 3 + 1, [ld.state_dict() for ld in old])
    counts = Counter(seen + more)
    assert all(counts[(0, i)] == 1 for i in range(N)) and max(counts.values()) == 1


@pytest.mark.slow
def test_two_workers_bounded_pass_is_complete(data):
    N = n_train(data)
    seen = Counter()
    for rank in range(2):
        seen.update(sample_ids(list(loader(data, rank, 2, workers=2, infinite=False))))
    assert seen == Counter({(0, i): 1 for i in range(N)})
