"""Weighted mixtures of prepared sources: which source fills each sequence of the global batch, and
which of that source's samples it is, as arithmetic on (weights, seed, position in the run).

    sources = [MixtureSource("web", "data/web", weight=0.7),
               MixtureSource("passkey", "data/passkey", weight=0.3, max_repetition=4)]
    loader = build_mixture_loader(sources, "train", global_batch=64, micro_batch_size=4, dp_rank=rank,
                                  dp_size=world, num_workers=2, seed=1234)
    for batch in loader:         # build_dataloader's batches plus "source": int64 (B,), index into sources
        ...
        checkpoint["data"] = loader.state_dict()
    loader.load_state_dict(merge_mixture_states(every_old_ranks_state, dp_rank, dp_size))

Positions. Sequence k = step * G + j is position j of a step's global batch of G sequences. Of each
global batch, data-parallel rank r of D holds positions r*G/D .. (r+1)*G/D - 1, its micro-batch m the
rows m*B .. m*B + B - 1 of that share. Which source and which sample fill sequence k depend on k, the
weights and the seed only, never on D, B or the worker count: a resume at another layout continues
with the global batches the uninterrupted run would have read.

The rule (which source fills sequence k). The weights are normalised exactly, w_i = a_i / A (fractions
of the decimal numbers in the config). Source i's c-th sequence (c = 1, 2, ...) is released at
sequence floor((c - 1) / w_i) and due by sequence ceil(c / w_i) - 1. Each sequence goes to the released
source whose next sequence is due first (ties: the source listed first): earliest deadline first.
Guarantee: after the first n sequences, source i has filled c_i(n) of them with

    floor(w_i n) <= c_i(n) <= ceil(w_i n)        for every n and every source,

the closest whole sequences allow; so any L consecutive sequences (a global batch, a run of steps)
hold more than w_i L - 2 and fewer than w_i L + 2 of source i. Proof: the upper bound is the release.
The lower bound says every deadline is met. The jobs that must run inside slots [a, b] (released at
>= a, due <= b) number at most w_i (b - a + 1) per source, so at most b - a + 1 for all sources
together (the weights sum to 1); that is Hall's condition, and earliest-deadline-first meets every
deadline of unit jobs whenever it holds. No slot idles: sum_i ceil(w_i n) >= n, so some source is
always released. (Megatron's blended index gives each sequence to the largest error w_i n - c_i
instead; with three or more sources that can fall a sequence and more behind.) The rule uses no
randomness; the seed orders each source's samples.

Which sample. Source i's draw c (counted from 0 over the run) is position c mod N_i of epoch c div N_i
of its split (N_i samples), in the order schedule.EpochOrder gives (seed, epoch): every epoch is a fresh
shuffle, logged when it begins (MixtureLoader.new_epochs). A source may be read for `max_repetition`
epochs (OLMo-core's default, 1.0: no repetition; 2.5 allows two and a half). The loader raises
SourceExhausted, naming the source and what to change, before the first micro-batch of a global batch
that would go past the cap, so a trainer can save the finished step and stop.

State. Per rank: the cursor of every source (its draws so far) at the first sequence of the rank's
current global batch, that sequence's number, and the micro-batches of the global batch this rank has
delivered. At a step boundary all ranks hold the same state, so merge_mixture_states deals it to any
data-parallel size, micro-batch size, worker count or global batch size, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .loader import CursorLoader, SplitSamples, collate, unpack
from .manifest import read_manifest
from .schedule import EpochOrder

STATE_FORMAT = "sessa.data_pipeline.mixture/1"
DEFAULT_MAX_REPETITION = 1.0  # OLMo-core's SourceMixtureConfig default: each source read at most once


@dataclass(frozen=True)
class MixtureSource:
    name: str  # names the source in metrics (data/<name>/tokens, val/<name>/loss) and messages
    path: str  # a directory written by `python -m data_pipeline prepare`
    weight: float  # relative share of the sequences (normalised over the sources)
    max_repetition: float = DEFAULT_MAX_REPETITION  # epochs of this source a run may read


class SourceExhausted(RuntimeError):
    """A source would be read past its max_repetition epochs; the message says what to change."""


def check_sources(sources: Sequence[MixtureSource]) -> list[dict]:
    """The sources' manifests, after refusing what cannot be mixed: bad names, weights or repetition
    caps, and sources that differ in tokenizer or sequence length (naming both directories)."""
    if not sources:
        raise ValueError("a mixture needs at least one source")
    names = [s.name for s in sources]
    if len(set(names)) != len(names) or not all(names) or any("/" in n for n in names):
        raise ValueError(f"source names must be distinct, non-empty and free of '/', got {names}")
    for s in sources:
        if not s.weight > 0:
            raise ValueError(f"source {s.name!r}: weight must be > 0, got {s.weight}")
        if not s.max_repetition >= 1:
            raise ValueError(f"source {s.name!r}: max_repetition must be >= 1 (epochs), got {s.max_repetition}")
    manifests = [read_manifest(s.path) for s in sources]
    for source, manifest in zip(sources[1:], manifests[1:]):
        for key, what in (("tokenizer_id", "tokenizer"), ("seq_len", "sequence length")):
            if manifest[key] != manifests[0][key]:
                raise ValueError(
                    f"sources {sources[0].name!r} and {source.name!r} differ in {what}: {sources[0].path} has "
                    f"{manifests[0][key]!r}, {source.path} has {manifest[key]!r}; the sources of one run (or "
                    f"stage) must share tokenizer and sequence length: prepare {source.path} again with "
                    f"--tokenizer {manifests[0]['tokenizer']['spec']} --seq-len {manifests[0]['seq_len']}")
    return manifests


class Interleave:
    """The rule of the module docstring in exact integer arithmetic: w_i = shares[i] / total."""

    def __init__(self, weights: Sequence[float]):
        fractions = [Fraction(str(w)) for w in weights]  # str: 0.7 means 7/10, not the nearest binary float
        scale = math.lcm(*(f.denominator for f in fractions))
        shares = [int(f * scale) for f in fractions]
        common = math.gcd(*shares)
        self.shares = [s // common for s in shares]
        self.total = sum(self.shares)

    def run(self, start: int, counts: list[int], n: int) -> list[int]:
        """Sources of sequences start .. start + n - 1, given every source's count before `start`
        (updated in place)."""
        shares, total = self.shares, self.total
        release = [c * total // a for c, a in zip(counts, shares)]  # of each source's next sequence
        due = [-(-(c + 1) * total // a) - 1 for c, a in zip(counts, shares)]
        chosen = []
        for k in range(start, start + n):
            best = -1
            for i in range(len(shares)):
                if release[i] <= k and (best < 0 or due[i] < due[best]):
                    best = i
            chosen.append(best)
            counts[best] += 1
            c, a = counts[best], shares[best]
            release[best], due[best] = c * total // a, -(-(c + 1) * total // a) - 1
        return chosen

    def check(self, start: int, counts: Sequence[int]) -> None:
        """Refuse cursors this rule cannot have produced (other weights, or an edited state)."""
        fits = len(counts) == len(self.shares) and sum(counts) == start and all(
            a * start // self.total <= c <= -(-a * start // self.total) for a, c in zip(self.shares, counts))
        if not fits:
            raise ValueError(f"mixture cursors {list(counts)} after {start} sequences do not follow the weights "
                             f"{self.shares}/{self.total}: the state was saved with other weights or sources")


class MixtureDataset(IterableDataset):
    """Yields one rank's micro-batches; DataLoader worker p of W makes the rank's micro-batches p, p + W, ..."""

    def __init__(self, sources, split, global_batch, micro_batch_size, dp_rank, dp_size, num_workers, seed,
                 expected_tokenizer_id, verify_checksums):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if min(global_batch, micro_batch_size) < 1 or num_workers < 0 or seed < 0:
            raise ValueError("global_batch and micro_batch_size must be >= 1, num_workers and seed >= 0")
        if global_batch % (dp_size * micro_batch_size):
            raise ValueError(f"global_batch ({global_batch} sequences) must be a multiple of dp_size x "
                             f"micro_batch_size = {dp_size} x {micro_batch_size}")
        check_sources(sources)
        self.sources = list(sources)
        self.splits = [SplitSamples(s.path, split, expected_tokenizer_id, None) for s in sources]
        self.split, self.seed, self.sample_len = split, seed, self.splits[0].sample_len
        self.interleave = Interleave([s.weight for s in sources])
        self.caps = [math.floor(Fraction(str(s.max_repetition)) * d.table.n_samples)
                     for s, d in zip(sources, self.splits)]
        self.global_batch, self.micro_batch_size, self.dp_rank, self.dp_size = \
            global_batch, micro_batch_size, dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.microbatches = self.per_rank // micro_batch_size  # per rank and global batch
        self.workers, self.verify_checksums = max(1, num_workers), verify_checksums
        # Set by MixtureLoader before each iteration: (first sequence of the current global batch,
        # every source's cursor there, micro-batches of it this rank has delivered).
        self.start = (0, [0] * len(sources), 0)

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        process, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        slot, cursors, delivered = self.start
        return self._batches(delivered + process, workers, slot, list(cursors))

    def _batches(self, t: int, workers: int, slot: int, cursors: list[int]) -> Iterator[dict]:
        """Micro-batches t, t + workers, ... counted from the global batch at sequence `slot`."""
        verified, failed = set(), {}  # shared by this worker's readers: hash/fail a shard once
        readers = [d.reader(self.verify_checksums, verified, failed) for d in self.splits]
        orders: list[dict[int, EpochOrder]] = [{} for _ in self.splits]
        at, B = slot, self.micro_batch_size
        try:
            while True:
                step, m = divmod(t, self.microbatches)
                first = slot + step * self.global_batch + self.dp_rank * self.per_rank + m * B
                self.interleave.run(at, cursors, first - at)  # other ranks' and workers' sequences
                drawn = list(cursors)
                chosen = self.interleave.run(first, cursors, B)
                at = first + B
                yield self._read(chosen, drawn, readers, orders)
                t += workers
        finally:
            for reader in readers:
                reader.close()

    def _read(self, chosen: list[int], drawn: list[int], readers, orders) -> dict:
        rows = [None] * len(chosen)
        for i in sorted(set(chosen)):
            where = [b for b, source in enumerate(chosen) if source == i]
            first, end = drawn[i], drawn[i] + len(where)
            if end > self.caps[i]:
                raise SourceExhausted(self.exhausted_message(i))
            for b, row in zip(where, self._draws(i, first, end, readers[i], orders[i])):
                rows[b] = row
        return collate(rows, self.sample_len, np.array(chosen))

    def _draws(self, i: int, first: int, end: int, reader, orders: dict) -> Iterator[tuple]:
        """Rows of source i's draws [first, end), epoch by epoch."""
        data, c = self.splits[i], first
        n = data.table.n_samples
        while c < end:
            epoch, position = divmod(c, n)
            stop = min(n, position + end - c)
            if epoch not in orders:
                if len(orders) > 1:  # a source's draws move forward: keep this epoch and the last
                    orders.pop(min(orders))
                orders[epoch] = EpochOrder(data.table, self.seed, epoch)
            yield from data.rows(orders[epoch], position, stop, reader, "raise")
            c += stop - position

    def exhausted_message(self, i: int) -> str:
        s, n = self.sources[i], self.splits[i].table.n_samples
        return (f"data source {s.name!r} ({s.path}) is used up: max_repetition {s.max_repetition} allows "
                f"{self.caps[i]} draws of its {n} {self.split} sequences and the next global batch needs more. "
                f"Raise its max_repetition, lower its weight ({s.weight}), prepare more data for it, or "
                f"train fewer steps; the last checkpoint resumes with the changed setting")


class MixtureLoader(CursorLoader):
    """A CursorLoader whose cursor is every source's draws so far (module docstring)."""

    def __init__(self, dataset: MixtureDataset, num_workers: int, pin_memory: bool):
        super().__init__(dataset, num_workers, pin_memory)
        self._slot, self._cursors, self._delivered = 0, [0] * len(dataset.sources), 0
        self._next_cursors: tuple[int, list[int]] | None = None  # cursors after the current global batch
        self.new_epochs: list[str] = []  # "source 'web' begins epoch 1 (reshuffled) ...": read and clear

    @property
    def cursors(self) -> dict[str, int]:
        """Draws of each source over the run, through the global batches this rank finished."""
        return {s.name: c for s, c in zip(self.dataset.sources, self._cursors)}

    def __iter__(self) -> Iterator[dict]:
        ds: MixtureDataset = self.dataset
        ds.start = (self._slot, list(self._cursors), self._delivered)
        if self._delivered == 0:
            self.check_next_global_batch()
        for batch in super().__iter__():
            self._delivered += 1
            if self._delivered == ds.microbatches:
                self._finish_global_batch()
            yield unpack(batch, ds.sample_len)
            if self._delivered == 0:  # the consumer asks for the next global batch: may it come?
                self.check_next_global_batch()

    def check_next_global_batch(self) -> None:
        """Raise SourceExhausted if the global batch after the finished ones would pass a source's
        max_repetition. Every rank computes the same answer, so all stop at the same step."""
        ds: MixtureDataset = self.dataset
        if self._next_cursors is None or self._next_cursors[0] != self._slot:
            after = list(self._cursors)
            ds.interleave.run(self._slot, after, ds.global_batch)
            self._next_cursors = (self._slot, after)
        for i, count in enumerate(self._next_cursors[1]):
            if count > ds.caps[i]:
                raise SourceExhausted(ds.exhausted_message(i))

    def _finish_global_batch(self) -> None:
        ds: MixtureDataset = self.dataset
        self.check_next_global_batch()  # (fills _next_cursors)
        after = self._next_cursors[1]
        for source, data, before, now in zip(ds.sources, ds.splits, self._cursors, after):
            n = data.table.n_samples
            for epoch in range(max(1, -(-before // n)), -(-now // n)):  # epoch e starts with draw e * n
                self.new_epochs.append(f"data source {source.name!r} begins epoch {epoch} (reshuffled) after "
                                       f"{epoch * n} of its sequences; max_repetition {source.max_repetition}")
        self._slot += ds.global_batch
        self._cursors, self._delivered = list(after), 0

    def state_dict(self) -> dict:
        ds: MixtureDataset = self.dataset
        return {**_identity(ds), "global_batch": ds.global_batch, "dp_rank": ds.dp_rank, "dp_size": ds.dp_size,
                "micro_batch_size": ds.micro_batch_size, "slot": self._slot, "cursors": list(self._cursors),
                "delivered": self._delivered}

    def load_state_dict(self, state: dict) -> None:
        ds: MixtureDataset = self.dataset
        _check_identity(state, _identity(ds))
        ours = (ds.dp_rank, ds.dp_size, ds.micro_batch_size, ds.global_batch)
        theirs = (state["dp_rank"], state["dp_size"], state["micro_batch_size"], state["global_batch"])
        if state["delivered"] and ours != theirs:
            raise ValueError(f"mixture state saved inside a global batch (rank {state['dp_rank']} had delivered "
                             f"{state['delivered']} of its micro-batches) resumes only at the same (dp_rank, "
                             f"dp_size, micro_batch_size, global_batch) {theirs}, this loader is {ours}")
        ds.interleave.check(state["slot"], state["cursors"])
        self._slot, self._cursors, self._delivered = state["slot"], list(state["cursors"]), state["delivered"]
        self._next_cursors = None


def build_mixture_loader(sources: Sequence[MixtureSource], split: str, global_batch: int, micro_batch_size: int,
                         dp_rank: int, dp_size: int, num_workers: int, seed: int,
                         expected_tokenizer_id: str | None = None, *, verify_checksums: bool = True,
                         pin_memory: bool = False) -> MixtureLoader:
    """An endless MixtureLoader over `split` of every source for one data-parallel rank.

    global_batch: sequences per optimizer step over all ranks (fixes the positions, not the data).
    """
    dataset = MixtureDataset(sources, split, global_batch, micro_batch_size, dp_rank, dp_size, num_workers, seed,
                             expected_tokenizer_id, verify_checksums)
    return MixtureLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)


def merge_mixture_states(states: list[dict], new_dp_rank: int, new_dp_size: int) -> dict:
    """Every old rank's state -> the state for rank new_dp_rank of new_dp_size. At a global-batch
    boundary the ranks agree, so any new layout continues exactly; inside one, only the same layout."""
    if not states:
        raise ValueError("merge_mixture_states needs the states of all old ranks, got none")
    if not 0 <= new_dp_rank < new_dp_size:
        raise ValueError(f"new_dp_rank must be in [0, {new_dp_size}), got {new_dp_rank}")
    first = states[0]
    ranks = sorted(s["dp_rank"] for s in states)
    if ranks != list(range(first["dp_size"])):
        raise ValueError(f"need exactly one state per old rank 0..{first['dp_size'] - 1}, got ranks {ranks}")
    for s in states:
        _check_identity(s, _identity_of(first))
        if (s["slot"], s["cursors"], s["delivered"]) != (first["slot"], first["cursors"], first["delivered"]):
            raise ValueError(f"ranks {first['dp_rank']} and {s['dp_rank']} stopped at different places "
                             f"(sequence {first['slot']} + {first['delivered']} micro-batches vs {s['slot']} + "
                             f"{s['delivered']}): the states are not from one step of one run")
    if first["delivered"]:
        if new_dp_size != first["dp_size"]:
            raise ValueError(f"these states were saved inside a global batch ({first['delivered']} micro-batches "
                             f"into it): they resume at dp_size {first['dp_size']} only")
        return next(s for s in states if s["dp_rank"] == new_dp_rank)
    return {**first, "dp_rank": new_dp_rank, "dp_size": new_dp_size}


def _identity(ds: MixtureDataset) -> dict:
    return {"format": STATE_FORMAT, "split": ds.split, "seed": ds.seed,
            "tokenizer_id": ds.splits[0].tokenizer_id, "shares": [ds.interleave.shares, ds.interleave.total],
            "sources": [{"name": s.name, "fingerprint": d.fingerprint} for s, d in zip(ds.sources, ds.splits)]}


def _identity_of(state: dict) -> dict:
    return {k: state.get(k) for k in ("format", "split", "seed", "tokenizer_id", "shares", "sources")}


def _check_identity(state: dict, expected: dict) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a mixture loader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
    for key, what in (("sources", "sources (names and data)"), ("shares", "weights"), ("seed", "seed"),
                      ("split", "split"), ("tokenizer_id", "tokenizer")):
        if state.get(key) != expected[key]:
            raise ValueError(f"mixture state {what} {state.get(key)!r} differ from this loader's {expected[key]!r}: "
                             f"a state resumes only on the same sources, weights, seed and split")

