"""Weighted mixtures (data_pipeline/mixture.py): the interleaving rule against its proven bound, the
source sequence under every layout, exact resume and re-deal, exhaustion, and the refusals."""

import json
import random
import shutil
from fractions import Fraction
from itertools import islice

import numpy as np
import pytest
import torch
from dp_helpers import prepare_small

from data_pipeline.mixture import (
    Interleave,
    MixtureSource,
    SourceExhausted,
    build_mixture_loader,
    check_sources,
    merge_mixture_states,
)

SEED = 5


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two small text sources of the same tokenizer and seq_len, of different sizes."""
    tmp = tmp_path_factory.mktemp("mixture")
    big, _ = prepare_small(tmp, n_docs=40, name="big")
    small, _ = prepare_small(tmp, n_docs=6, name="small")
    return {"big": big, "small": small, "tmp": tmp}


def _train_samples(path) -> int:
    return json.loads((path / "manifest.json").read_text())["splits"]["train"]["samples"]


def _mixture(sources, weights=(0.75, 0.25), small_repetition=50.0):
    return [MixtureSource("big", str(sources["big"]), weights[0], max_repetition=50.0),
            MixtureSource("small", str(sources["small"]), weights[1], max_repetition=small_repetition)]


def _loader(mixture, G, B, rank=0, D=1, W=0):
    return build_mixture_loader(mixture, "train", global_batch=G, micro_batch_size=B, dp_rank=rank, dp_size=D,
                                num_workers=W, seed=SEED)


def _global_batches(mixture, G, B, D, W, steps, states=None):
    """The first `steps` global batches as ((source, epoch, sample_index) per position), gathering every
    rank's micro-batches in rank order; `states` resumes each rank first (merged for this layout)."""
    per_rank = []
    for rank in range(D):
        loader = _loader(mixture, G, B, rank, D, W)
        if states is not None:
            loader.load_state_dict(merge_mixture_states(states, rank, D))
        per_rank.append(list(islice(loader, steps * G // (D * B))))
        loader.close()
    M = G // (D * B)
    batches = []
    for step in range(steps):
        rows = []
        for rank in range(D):
            for batch in per_rank[rank][step * M:(step + 1) * M]:
                rows += list(zip(batch["source"].tolist(), batch["epoch"].tolist(), batch["sample_index"].tolist()))
        batches.append(rows)
    return batches


def _exact_counts(shares, total, n):
    """floor and ceil of w_i * n for w_i = shares[i] / total, in integers."""
    return [a * n // total for a in shares], [-(-a * n // total) for a in shares]


def _random_weights(seed: int) -> tuple:
    rng = random.Random(seed)
    return tuple(round(rng.random() + 0.001, 3) for _ in range(2 + seed % 5))


WEIGHT_SETS = [(0.75, 0.25), (1, 1), (0.5, 0.25, 0.125, 0.125), (0.05, 0.05, 0.3, 0.3, 0.3), (3, 1, 0.001)] + [
    _random_weights(seed) for seed in range(12)]


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: "-".join(map(str, w)))
def test_counts_follow_the_weights_within_the_proven_bound(weights):
    """Module docstring: floor(w n) <= c(n) <= ceil(w n) for every prefix n, hence every window of L
    sequences holds more than w L - 2 and fewer than w L + 2 of each source."""
    n = 2500
    interleave = Interleave(weights)
    exact = [Fraction(str(w)) / sum(Fraction(str(v)) for v in weights) for w in weights]
    assert [Fraction(a, interleave.total) for a in interleave.shares] == exact
    sequence = np.array(interleave.run(0, [0] * len(weights), n))
    prefix = np.zeros((len(weights), n + 1), dtype=np.int64)
    for i in range(len(weights)):
        prefix[i, 1:] = np.cumsum(sequence == i)
    for k in range(n + 1):
        low, high = _exact_counts(interleave.shares, interleave.total, k)
        assert all(low[i] <= prefix[i, k] <= high[i] for i in range(len(weights))), (k, prefix[:, k], low, high)
    A = interleave.total
    for length in (1, 7, 64, 333):
        window = prefix[:, length:] - prefix[:, :-length]  # every window of this length
        for i, a in enumerate(interleave.shares):
            assert np.all(np.abs(window[i] * A - a * length) < 2 * A), (i, length)
    # cursors are the whole state: continuing from them in pieces gives the same sequence
    counts, pieces, start = [0] * len(weights), [], 0
    for size in (1, 37, 500, n - 538):
        pieces += interleave.run(start, counts, size)
        start += size
    assert pieces == sequence.tolist()


def test_source_sequence_is_the_same_for_every_dp_size_and_worker_count(sources):
    mixture = _mixture(sources)
    G, steps = 8, 5
    reference = _global_batches(mixture, G, B=4, D=1, W=0, steps=steps)
    for B, D, W in ((2, 2, 1), (1, 4, 2), (2, 2, 2), (8, 1, 2)):
        assert _global_batches(mixture, G, B=B, D=D, W=W, steps=steps) == reference, (B, D, W)
    interleave = Interleave([0.75, 0.25])
    for step, rows in enumerate(reference):  # a global batch is a window of G sequences
        for i, a in enumerate(interleave.shares):
            count = sum(source == i for source, _, _ in rows)
            assert abs(count * interleave.total - a * G) < 2 * interleave.total, (step, i, count)
    drawn = [row for rows in reference for row in rows if row[0] == 0]  # the big source, all in epoch 0
    assert len({row[2] for row in drawn}) == len(drawn) and {row[1] for row in drawn} == {0}


def _rows(batch):
    return {k: v.clone() for k, v in batch.items()}


def test_resume_inside_a_global_batch_and_across_epochs_is_exact(sources):
    mixture = _mixture(sources, weights=(1, 1))
    G, B, W = 6, 2, 2  # 3 micro-batches per global batch
    n_small = _train_samples(sources["small"])
    first = 2 * n_small + 1  # micro-batches before the save: mid global batch, the small source in epoch 1+
    straight = _loader(mixture, G, B, W=W)
    iterator = iter(straight)
    for _ in range(first):
        next(iterator)
    state = json.loads(json.dumps(straight.state_dict()))
    assert state["delivered"] == first % 3 != 0
    expected = [_rows(next(iterator)) for _ in range(2 * n_small)]
    straight.close()
    assert max(max(b["epoch"][b["source"] == 1].tolist(), default=0) for b in expected) >= 2  # epochs crossed
    resumed = _loader(mixture, G, B, W=W)
    resumed.load_state_dict(state)
    got = [_rows(b) for b in islice(resumed, len(expected))]
    resumed.close()
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dp2_state_redealt_to_dp1_equals_the_uninterrupted_run(sources):
    mixture = _mixture(sources)
    G, steps_before, steps_after = 8, 3, 4
    states = []
    for rank in range(2):
        loader = _loader(mixture, G, B=2, rank=rank, D=2, W=1)
        list(islice(loader, steps_before * 2))  # 2 micro-batches per rank and global batch
        states.append(json.loads(json.dumps(loader.state_dict())))
        loader.close()
    reference = _global_batches(mixture, G, B=4, D=1, W=2, steps=steps_before + steps_after)
    assert _global_batches(mixture, G, B=4, D=1, W=2, steps=steps_after, states=states) == reference[steps_before:]
    assert _global_batches(mixture, G, B=1, D=4, W=0, steps=steps_after, states=states) == reference[steps_before:]

    loader = _loader(mixture, G, B=2, rank=0, D=2, W=0)
    list(islice(loader, 1))  # inside a global batch: only the same layout may resume it
    inside = [loader.state_dict() | {"dp_rank": r} for r in range(2)]
    with pytest.raises(ValueError, match="inside a global batch.*resume at dp_size 2 only"):
        merge_mixture_states(inside, 0, 1)


def test_a_used_up_source_starts_new_epochs_then_stops_naming_the_source(sources):
    """Weights 1:1 alternate from the first source (ties go to the source listed first), so after n
    sequences the small source (listed first here) has given ceil(n / 2). With max_repetition 2 and
    N samples it may give 2N: global batches of 4 take 2 each, so exactly N of them come, and its
    epoch 1 begins in global batch N // 2 (0-based), when its draw N is taken."""
    n = _train_samples(sources["small"])
    mixture = [MixtureSource("small", str(sources["small"]), 1, max_repetition=2),
               MixtureSource("big", str(sources["big"]), 1, max_repetition=50)]
    loader = _loader(mixture, G=4, B=2)
    batches, logged = 0, {}
    with pytest.raises(SourceExhausted) as stopped:
        for batch in loader:
            batches += 1
            if batches % 2 == 0:
                logged[batches // 2 - 1] = list(loader.new_epochs)
                loader.new_epochs.clear()
    assert batches == 2 * n
    assert {step: messages for step, messages in logged.items() if messages} == {
        n // 2: [f"data source 'small' begins epoch 1 (reshuffled) after {n} of its sequences; max_repetition 2"]}
    message = str(stopped.value)
    assert f"'small' ({sources['small']})" in message and "max_repetition 2" in message
    assert f"allows {2 * n} draws" in message and "Raise its max_repetition" in message

    state = loader.state_dict()  # what the trainer saves at that step: loads with a raised cap
    assert state["cursors"] == [2 * n, 2 * n]
    more = [MixtureSource("small", str(sources["small"]), 1, max_repetition=3), mixture[1]]
    resumed = _loader(more, G=4, B=2)
    resumed.load_state_dict(state)
    batch = next(iter(resumed))
    assert batch["source"].tolist() == [0, 1] and batch["epoch"].tolist()[0] == 2


def test_sources_of_another_sequence_length_or_tokenizer_are_refused(sources):
    tmp = sources["tmp"]
    short, _ = prepare_small(tmp, n_docs=6, seq_len=8, name="short")
    mixture = [MixtureSource("big", str(sources["big"]), 1), MixtureSource("short", str(short), 1)]
    with pytest.raises(ValueError) as refused:
        _loader(mixture, G=2, B=1)
    message = str(refused.value)
    assert "differ in sequence length" in message and "16" in message and "8" in message
    assert str(sources["big"]) in message and str(short) in message

    other = tmp / "other_tokenizer"  # a copy whose manifest says it was tokenised otherwise
    shutil.copytree(sources["small"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer_id"] = "gpt2-000000000000"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as refused:
        check_sources([MixtureSource("big", str(sources["big"]), 1), MixtureSource("other", str(other), 1)])
    message = str(refused.value)
    ours = json.loads((sources["big"] / "manifest.json").read_text())["tokenizer_id"]
    assert "differ in tokenizer" in message and ours in message and "gpt2-000000000000" in message
    assert str(sources["big"]) in message and str(other) in message


def test_states_refuse_other_weights_or_sources(sources):
    loader = _loader(_mixture(sources), G=4, B=2)
    list(islice(loader, 2))
    state = loader.state_dict()
    for changed, what in ((_mixture(sources, weights=(0.5, 0.5)), "weights"),
                          (_mixture(sources)[:1], "sources")):
        with pytest.raises(ValueError, match=f"mixture state {what}"):
            _loader(changed, G=4, B=2).load_state_dict(state)


def test_data_sources_in_the_recipe(tmp_path):
    """data.sources parses into SourceConfig entries (max_repetition defaults to OLMo-core's 1.0);
    data.path becomes the first source's directory and may not name another one."""
    from pretrain.config import ConfigError, load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {vocab_size: 4096, hidden_size: 32, num_layers: 2, num_heads: 2}\n"
                      "data:\n  sources:\n    - {name: web, path: data/web, weight: 0.7}\n"
                      "    - {name: code, path: data/code, weight: 0.3, max_repetition: 4}\n")
    data = load_config(recipe).data
    assert [(s.name, s.path, s.weight, s.max_repetition) for s in data.sources] == [
        ("web", "data/web", 0.7, 1.0), ("code", "data/code", 0.3, 4.0)]
    assert data.path == "data/web"
    override = load_config(recipe, ["--data.sources", "[{name: only, path: data/only}]"]).data
    assert [(s.name, s.weight) for s in override.sources] == [("only", 1.0)] and override.path == "data/only"
    with pytest.raises(ConfigError, match=r"data.path \(data/other\) and data.sources are both set"):
        load_config(recipe, ["--data.path", "data/other"])
    with pytest.raises(ConfigError, match="names must be distinct"):
        load_config(recipe, ["--data.sources", "[{name: a, path: x}, {name: a, path: y}]"])
    with pytest.raises(ConfigError, match="'a': max_repetition must be >= 1"):
        load_config(recipe, ["--data.sources", "[{name: a, path: x, max_repetition: 0.5}]"])
