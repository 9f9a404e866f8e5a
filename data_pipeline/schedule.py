"""Which sample every reader gets, epoch by epoch; the exact-resume and re-deal arithmetic.

Epoch order. For epoch e the split's samples form one sequence: shards in a permutation drawn from
(seed, e); inside each shard its entries rotated by an offset drawn from (seed, e) (so a stream
reader still reads entries in file order, with one wrap-around); inside each entry its k samples
permuted by (seed, e, shard, entry). Randomness comes from PCG64 raw output (stable across NumPy
versions), so the order is a pure function of (manifest, seed, epoch).

Streams. With dp_size D, W DataLoader workers (W = 1 for num_workers=0) and P lanes per worker there
are V = D*W*P streams; stream v = (rank*W + worker)*P + lane. Every "round" (normally one epoch) is
cut into V contiguous parts, part v going to stream v (sizes differ by at most one). A worker's
t-th sample comes from lane t % P (so a micro-batch mixes P distant places of the epoch), and a
rank's batches come from its workers. Streams simply continue into the next round, so an infinite
loader never stops at epoch ends.

State. All a rank needs to resume is how many samples each of its workers has delivered
(`worker_positions`): that fixes the position of each of its streams.

Re-dealing (different dp_size, num_workers or lanes). From all ranks' states we know exactly which
samples were consumed; the unconsumed rest of every round that has been started becomes a
`pending` list of (epoch, start, end) intervals. The new layout treats that list as its first round
(cut into V' parts like any round) and continues with whole epochs after it. So the interrupted
epoch is finished with every sample seen exactly once, whatever the new size.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_SHARD_SALT, _ENTRY_SALT = 0x5348_4152, 0x454E_5452  # separate streams for shard and entry draws


def _raw(seed_words: list[int], n: int) -> np.ndarray:
    return np.random.PCG64(np.random.SeedSequence(seed_words)).random_raw(n)


def permutation(seed_words: list[int], n: int) -> np.ndarray:
    return np.argsort(_raw(seed_words, n), kind="stable")


@dataclass(frozen=True)
class ShardTable:
    """Sample counts of a split's shards, in storage order."""

    samples: tuple[int, ...]
    samples_per_entry: int

    @property
    def n_samples(self) -> int:
        return sum(self.samples)

    def entries(self, shard: int) -> int:
        return -(-self.samples[shard] // self.samples_per_entry)

    def first_sample(self, shard: int) -> int:
        return int(self._offsets[shard])

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.samples, dtype=np.int64)])


class EpochOrder:
    """The sample sequence of one epoch, as (shard, entry, offset) runs."""

    def __init__(self, table: ShardTable, seed: int, epoch: int):
        self.table, self.seed, self.epoch = table, seed, epoch
        n = len(table.samples)
        self.shards = permutation([seed, epoch, _SHARD_SALT], n)
        draws = _raw([seed, epoch, _SHARD_SALT + 1], n)
        self.rotation = {int(s): int(draws[s] % table.entries(s)) for s in range(n)}
        self.cumulative = np.concatenate([[0], np.cumsum([table.samples[s] for s in self.shards])])

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """(shard, entry, first, last) for epoch positions [start, end): `first`..`last` (exclusive)
        index the entry's permuted samples (see entry_permutation)."""
        K = self.table.samples_per_entry
        i = int(np.searchsorted(self.cumulative, start, side="right")) - 1
        pos = start
        while pos < end:
            shard = int(self.shards[i])
            shard_start, shard_end = int(self.cumulative[i]), int(self.cumulative[i + 1])
            n, rot = shard_end - shard_start, self.rotation[shard]
            wrap = n - rot * K  # samples in entries rot..E-1 (entries before rot are all full)
            j = pos - shard_start
            while pos < end and j < n:
                entry, off = (rot + j // K, j % K) if j < wrap else ((j - wrap) // K, (j - wrap) % K)
                entry_size = min(K, self.table.samples[shard] - entry * K)
                take = min(entry_size - off, end - pos)
                yield shard, entry, off, off + take
                pos += take
                j += take
            i += 1

    def entry_permutation(self, shard: int, entry: int, size: int) -> np.ndarray:
        return permutation([self.seed, self.epoch, shard, entry, _ENTRY_SALT], size)


@dataclass(frozen=True)
class Layout:
    """How a split is dealt to V = dp_size * workers * lanes streams, from a starting point."""

    n_samples: int
    dp_size: int
    workers: int
    lanes: int
    infinite: bool
    first_epoch: int = 0
    pending: tuple[tuple[int, int, int], ...] = ()  # (epoch, start, end) left over by a re-deal

    @property
    def n_streams(self) -> int:
        return self.dp_size * self.workers * self.lanes

    def stream(self, rank: int, worker: int, lane: int) -> int:
        return (rank * self.workers + worker) * self.lanes + lane

    def part(self, round_size: int, v: int) -> tuple[int, int]:
        """Stream v's [lo, hi) of a round of `round_size` samples."""
        q, rem = divmod(round_size, self.n_streams)
        lo = v * q + min(v, rem)
        return lo, lo + q + (v < rem)

    def stream_intervals(self, v: int, consumed: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, start, end) pieces stream v reads after its first `consumed` samples."""
        if self.pending:
            lo, hi = self.part(_size(self.pending), v)
            if consumed < hi - lo:
                yield from _slice(self.pending, lo + consumed, hi)
                consumed = 0
            else:
                consumed -= hi - lo
            if not self.infinite:
                return
        lo, hi = self.part(self.n_samples, v)
        if hi == lo:
            if self.infinite:
                raise ValueError(f"stream {v} of {self.n_streams} gets no sample per epoch "
                                 f"({self.n_samples} samples): use fewer workers or lanes")
            return
        if not self.infinite:
            if consumed < hi - lo:
                yield self.first_epoch, lo + consumed, hi
            return
        epoch, consumed = self.first_epoch + consumed // (hi - lo), consumed % (hi - lo)
        while True:  # rounds after the pending one are whole epochs: round position == epoch position
            yield epoch, lo + consumed, hi
            epoch, consumed = epoch + 1, 0

    def remaining(self, consumed: dict[int, int]) -> tuple[tuple[tuple[int, int, int], ...], int]:
        """(pending, first_epoch): exactly the samples the streams have not consumed, given each
        stream's consumed count, as leftovers of started rounds followed by untouched epochs."""
        left = {v: consumed.get(v, 0) for v in range(self.n_streams)}
        pieces: list[tuple[int, int, int]] = []
        if self.pending:
            pieces += self._take(self.pending, left)
            if not self.infinite or not any(left.values()):
                return merge_intervals(pieces), self.first_epoch
        elif not any(left.values()):
            return (), self.first_epoch
        epoch = self.first_epoch
        if self.infinite:
            # epochs that every stream has finished leave nothing behind: skip them in one step
            sizes = {v: self.part(self.n_samples, v) for v in left}
            full = min(left[v] // (hi - lo) for v, (lo, hi) in sizes.items() if hi > lo)
            for v, (lo, hi) in sizes.items():
                left[v] -= full * (hi - lo)
            epoch += full
        while True:
            pieces += self._take(((epoch, 0, self.n_samples),), left)
            epoch += 1
            if not self.infinite:
                return merge_intervals(pieces), self.first_epoch  # a bounded pass restarts here
            if not any(left.values()):
                return merge_intervals(pieces), epoch

    def _take(self, intervals, left: dict[int, int]) -> list[tuple[int, int, int]]:
        """Charge each stream's consumption against its part of this round; return what is left."""
        out, size = [], _size(intervals)
        for v in range(self.n_streams):
            lo, hi = self.part(size, v)
            taken = min(left[v], hi - lo)
            left[v] -= taken
            out += _slice(intervals, lo + taken, hi)
        return out


def _size(intervals) -> int:
    return sum(b - a for _, a, b in intervals)


def _slice(intervals, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """The (epoch, start, end) pieces at round positions [lo, hi)."""
    out, pos = [], 0
    for epoch, a, b in intervals:
        s, e = max(lo, pos), min(hi, pos + b - a)
        if s < e:
            out.append((epoch, a + s - pos, a + e - pos))
        pos += b - a
    return out


def merge_intervals(pieces) -> tuple[tuple[int, int, int], ...]:
    out: list[list[int]] = []
    for epoch, a, b in sorted(pieces):
        if out and out[-1][0] == epoch and out[-1][2] == a:
            out[-1][2] = b
        else:
            out.append([epoch, a, b])
    return tuple(tuple(p) for p in out)


def lane_consumed(worker_position: int, lane: int, lanes: int) -> int:
    """Samples lane `lane` has delivered once its worker delivered `worker_position` (t % lanes)."""
    return max(0, -(-(worker_position - lane) // lanes))
