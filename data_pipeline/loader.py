"""Streaming, exactly resumable batches of packed token sequences for the trainer.

    loader = build_dataloader("data/pydocs", "train", micro_batch_size=8, dp_rank=rank,
                              dp_size=world, num_workers=2, seed=1234,
                              expected_tokenizer_id=model_tokenizer_id)
    for batch in loader:
        tokens = batch["tokens"]                  # (B, L + 1) int64
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        ...
        checkpoint["data"] = loader.state_dict()  # small, JSON-serialisable
    loader.load_state_dict(checkpoint["data"])    # next batch == the one an uninterrupted run gets

A batch is a dict:
  "tokens"        int64 (B, L + 1)   packed token ids; documents end with the EOT id
  "doc_ids"       int32 (B, L + 1)   index of the document each position belongs to, counted from 0
                                     within the sample (EOT belongs to the document it ends); -1 marks
                                     padding (only in the split's last sample). Attention/loss may be
                                     cut where doc_ids changes; drop targets where doc_ids[:, 1:] < 0.
  "loss_mask"     bool (B, L + 1)    True where the token counts as a prediction target (supervised
                                     task data: the answer and its EOT); all True for data prepared
                                     without a mask. The loss uses loss_mask[:, 1:] & (doc_ids[:, 1:] >= 0).
  "sample_index"  int64 (B,)         the sample's index within the split (storage order)
  "epoch"         int64 (B,)         the epoch the sample was drawn in

Which sample comes when, and how a state resumes or is re-dealt to another number of ranks, is
described in schedule.py. State per rank = samples delivered by each of its DataLoader workers; the
loader counts them as batches reach the trainer, so batches prefetched but not yet consumed are
produced again after a restart.

Changing dp_size (or num_workers, or lanes) on resume: pass every old rank's state to
`merge_dp_states(states, new_dp_rank, new_dp_size)` and load the result on each new rank. The
unconsumed rest of the interrupted epoch is dealt to the new ranks, then whole epochs follow: every
sample of the epoch is seen exactly once. With infinite=False a loader makes one pass over epoch
`first_epoch` (default 0; a worker's last batch may be short) and the next iteration starts the pass
again.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from .errors import DataError, check_on_error, handle
from .manifest import check_tokenizer, fingerprint, read_manifest, split_info
from .packing import doc_ids
from .schedule import EpochOrder, Layout, ShardTable, lane_consumed
from .shards import ShardReader, shard_specs

STATE_FORMAT = "sessa.data_pipeline.loader/1"
DEFAULT_LANES = 8
_SKIP = object()  # a lane yields this for each sample lost to a skipped bad entry


def build_dataloader(data_dir: str | os.PathLike, split: str, micro_batch_size: int, dp_rank: int,
                     dp_size: int, num_workers: int, seed: int, infinite: bool = True,
                     expected_tokenizer_id: str | None = None, *, lanes: int = DEFAULT_LANES,
                     first_epoch: int = 0, verify_checksums: bool = True, on_error: str = "raise",
                     shard_url_template: str | None = None, pin_memory: bool = False) -> "TokenDataLoader":
    """A StatefulDataLoader over `split` of a prepared directory for one data-parallel rank.

    lanes: streams per worker a micro-batch draws from (more = better mixed batches).
    first_epoch: the epoch an infinite loader starts in / a bounded loader passes over.
    verify_checksums: sha256 every shard once per worker process before reading it.
    on_error: "raise" on a bad shard/entry, or "skip" its samples and count them in loader.skipped.
    shard_url_template: e.g. "pipe:aws s3 cp s3://bucket/pydocs/{path} -" to stream the shards
        from elsewhere (the manifest is still read from data_dir).
    """
    dataset = PackedTokenDataset(data_dir, split, micro_batch_size, dp_rank, dp_size, num_workers, seed,
                                 infinite, expected_tokenizer_id, lanes, first_epoch, verify_checksums,
                                 on_error, shard_url_template)
    return TokenDataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)


class PackedTokenDataset(IterableDataset):
    """Yields whole micro-batches; each DataLoader worker reads its own streams (schedule.py)."""

    def __init__(self, data_dir, split, micro_batch_size, dp_rank, dp_size, num_workers, seed, infinite,
                 expected_tokenizer_id, lanes, first_epoch, verify_checksums, on_error, shard_url_template):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if micro_batch_size < 1 or lanes < 1 or num_workers < 0 or seed < 0:
            raise ValueError("micro_batch_size and lanes must be >= 1, num_workers and seed >= 0")
        self.data = SplitSamples(data_dir, split, expected_tokenizer_id, shard_url_template)
        self.data_dir, self.split, self.seed = self.data.data_dir, split, seed
        self.tokenizer_id, self.fingerprint = self.data.tokenizer_id, self.data.fingerprint
        self.sample_len, self.table = self.data.sample_len, self.data.table
        self.micro_batch_size, self.dp_rank = micro_batch_size, dp_rank
        self.verify_checksums, self.on_error = verify_checksums, check_on_error(on_error)
        workers, n = max(1, num_workers), self.table.n_samples
        if infinite:
            if n < dp_size * workers:
                raise ValueError(f"split {split!r} of {data_dir} has {n} samples, fewer than "
                                 f"dp_size * num_workers = {dp_size * workers} readers")
            lanes = min(lanes, n // (dp_size * workers))  # every stream needs >= 1 sample per epoch
        self.layout = Layout(n, dp_size, workers, lanes, infinite, first_epoch)
        # Set by TokenDataLoader before each iteration: where each worker starts, and which worker
        # the DataLoader's round robin (which always begins at process 0) should play first.
        self.start_positions = [0] * workers
        self.first_worker = 0

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        process, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        if workers != self.layout.workers:
            raise RuntimeError(f"dataset laid out for {self.layout.workers} workers, running in {workers}")
        w = (process + self.first_worker) % workers  # the logical worker this process plays
        return self._batches(w, self.start_positions[w])

    def _batches(self, w: int, position: int) -> Iterator[dict]:
        verified, failed = set(), {}  # shared by this worker's readers: hash/fail a shard once
        orders: dict[int, EpochOrder] = {}
        P = self.layout.lanes
        readers = [self.data.reader(self.verify_checksums, verified, failed) for _ in range(P)]
        lanes = [self._lane(self.layout.stream(self.dp_rank, w, p), lane_consumed(position, p, P), readers[p],
                            orders) for p in range(P)]
        try:
            yield from self._fill(lanes, w, position)
        finally:  # the pass ended, or the loader stopped early: close the open shard files
            for reader in readers:
                reader.close()

    def _fill(self, lanes: list[Iterator[tuple]], w: int, position: int) -> Iterator[dict]:
        P = len(lanes)
        finished = False
        while not finished:
            rows, skipped = [], Counter()
            while len(rows) < self.micro_batch_size:
                # Lanes with one sample more are the first ones, so once lane t % P is done all are.
                item = next(lanes[position % P], None)
                if item is None:
                    finished = True
                    break
                position += 1
                if item[0] is _SKIP:
                    skipped[item[1]] += 1
                    if sum(skipped.values()) > self.table.n_samples:
                        raise DataError("all_skipped", f"{self.data_dir} split {self.split}",
                                        "every sample was skipped as bad; nothing left to train on")
                    continue
                rows.append(item)
            if rows or skipped:  # (no rows: the pass ended in skipped samples; report them anyway)
                yield (collate(rows, self.sample_len) if rows else {}) | {
                    "_worker": w, "_position": position, "_skipped": dict(skipped)}

    def _lane(self, stream: int, consumed: int, reader: ShardReader, orders: dict) -> Iterator[tuple]:
        for epoch, start, end in self.layout.stream_intervals(stream, consumed):
            if epoch not in orders:
                if len(orders) > 4:
                    orders.pop(min(orders))
                orders[epoch] = EpochOrder(self.table, self.seed, epoch)
            yield from self.data.rows(orders[epoch], start, end, reader, self.on_error)


class SplitSamples:
    """One split of a prepared directory: the manifest's facts about it, and its samples read by
    position in an epoch's order (schedule.EpochOrder)."""

    def __init__(self, data_dir, split: str, expected_tokenizer_id: str | None, shard_url_template: str | None):
        self.data_dir, self.split = str(data_dir), split
        self.manifest = manifest = read_manifest(data_dir)
        check_tokenizer(manifest, expected_tokenizer_id, self.data_dir)
        info = split_info(manifest, split, self.data_dir)
        self.tokenizer_id, self.fingerprint = manifest["tokenizer_id"], fingerprint(manifest, split)
        self.sample_len, self.vocab_size = manifest["sample_len"], manifest["vocab_size"]
        self.with_mask = bool(manifest.get("loss_mask", False))  # older manifests: no masks
        self.table = ShardTable(tuple(s["samples"] for s in info["shards"]), manifest["samples_per_entry"])
        self.shards = shard_specs(manifest, split, self.data_dir, shard_url_template)
        self.first_samples = [self.table.first_sample(s) for s in range(len(self.shards))]

    def reader(self, verify_checksums: bool, verified: set, failed: dict) -> ShardReader:
        return ShardReader(self.sample_len, self.table.samples_per_entry, self.vocab_size, verify_checksums,
                           verified, failed, self.with_mask)

    def rows(self, order: EpochOrder, start: int, end: int, reader: ShardReader, on_error: str) -> Iterator[tuple]:
        """(epoch, sample_index, tokens, n_valid, starts, mask) for positions [start, end) of `order`;
        (_SKIP, reason) for each sample of a bad entry when on_error="skip"."""
        for shard, entry, first, last in order.runs(start, end):
            try:
                data = reader.read(self.shards[shard], entry)
            except DataError as e:
                handle(e, on_error, None)
                for _ in range(first, last):
                    yield _SKIP, e.reason
                continue
            base = self.first_samples[shard] + entry * self.table.samples_per_entry
            for row in order.entry_permutation(shard, entry, len(data.tokens))[first:last]:
                n_valid, starts = data.bounds[row]
                mask = data.mask[row] if data.mask is not None else None
                yield order.epoch, base + int(row), data.tokens[row], n_valid, starts, mask


def collate(rows: list[tuple], sample_len: int, sources: np.ndarray | None = None) -> dict:
    """Rows of SplitSamples.rows -> a batch (module docstring); `sources` adds a mixture's "source" (B,)."""
    parts = {  # int64 parts first, so every part of the packed block below stays aligned
        "tokens": np.stack([r[2] for r in rows]).astype(np.int64),
        "sample_index": np.array([r[1] for r in rows], dtype=np.int64),
        "epoch": np.array([r[0] for r in rows], dtype=np.int64),
    }
    if sources is not None:
        parts["source"] = sources.astype(np.int64)
    parts["doc_ids"] = np.stack([doc_ids(r[3], r[4], sample_len) for r in rows])
    parts["loss_mask"] = np.stack([np.ones(sample_len, dtype=bool) if r[5] is None else r[5] for r in rows])
    if get_worker_info() is None:
        return {name: torch.from_numpy(array) for name, array in parts.items()}
    # Handing a tensor to the main process costs a shared-memory segment and a file
    # descriptor each; one block per batch instead of four doubled the rate.
    block = torch.empty(sum(a.nbytes for a in parts.values()), dtype=torch.uint8)
    flat, at = block.numpy(), 0
    for array in parts.values():
        flat[at:at + array.nbytes] = array.reshape(-1).view(np.uint8)
        at += array.nbytes
    return {"_packed": block, "_rows": len(rows), "_with_source": sources is not None}


def unpack(batch: dict, sample_len: int) -> dict:
    """The main-process side of collate's packing."""
    if "_packed" not in batch:
        return batch
    block, B, L1 = batch.pop("_packed"), batch.pop("_rows"), sample_len
    sizes = {"tokens": (torch.int64, (B, L1)), "sample_index": (torch.int64, (B,)), "epoch": (torch.int64, (B,))}
    if batch.pop("_with_source"):
        sizes["source"] = (torch.int64, (B,))
    sizes |= {"doc_ids": (torch.int32, (B, L1)), "loss_mask": (torch.bool, (B, L1))}
    at = 0
    for name, (dtype, shape) in sizes.items():
        n = dtype.itemsize * int(np.prod(shape))
        batch[name] = block[at:at + n].view(dtype).view(shape)
        at += n
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """SLURM preemption and `timeout` signal a whole process group: the trainer saves a checkpoint
    and stops, so its workers must not die first (torch's worker handler would kill them on SIGTERM,
    and the trainer would crash mid-step). They end when the loader shuts them down."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class CursorLoader(StatefulDataLoader):
    """A StatefulDataLoader over a dataset that yields finished micro-batches, whose state is a small
    cursor of its own (state_dict/load_state_dict of the subclass) rather than torchdata's per-worker
    snapshots, so it can be re-dealt to another dp_size / num_workers."""

    def __init__(self, dataset: IterableDataset, num_workers: int, pin_memory: bool):
        # batch_size=None: the dataset yields finished micro-batches; in_order keeps batches
        # deterministic; no persistent workers, each iteration starts from the loader's cursor.
        with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                             in_order=True, persistent_workers=False, worker_init_fn=_ignore_stop_signals)

    def close(self) -> None:
        """Stop this loader's worker processes now. A trainer that stops mid-epoch calls it: the
        workers ignore stop signals, and an unfinished iterator would otherwise keep them waiting."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


class TokenDataLoader(CursorLoader):
    """A CursorLoader whose cursor is each worker's position in its streams (module docstring)."""

    def __init__(self, dataset: PackedTokenDataset, num_workers: int, pin_memory: bool):
        super().__init__(dataset, num_workers, pin_memory)
        self._positions = [0] * dataset.layout.workers
        self._next_worker = 0  # logical worker whose batch comes next (DataLoader round robin)
        self.skipped: Counter = Counter()  # samples skipped as bad (on_error="skip"), by reason

    def __iter__(self) -> Iterator[dict]:
        dataset: PackedTokenDataset = self.dataset
        dataset.start_positions, dataset.first_worker = list(self._positions), self._next_worker
        for batch in super().__iter__():
            worker = batch.pop("_worker")
            self._positions[worker] = batch.pop("_position")
            self._next_worker = (worker + 1) % len(self._positions)
            self.skipped.update(batch.pop("_skipped"))
            if batch:
                yield unpack(batch, dataset.sample_len)
        if not dataset.layout.infinite:  # pass complete: the next one starts over
            self._positions, self._next_worker = [0] * dataset.layout.workers, 0

    def state_dict(self) -> dict:
        ds: PackedTokenDataset = self.dataset
        layout = ds.layout
        return {
            **_identity(ds),
            "layout": {"dp_size": layout.dp_size, "workers": layout.workers, "lanes": layout.lanes,
                       "infinite": layout.infinite, "first_epoch": layout.first_epoch,
                       "n_samples": layout.n_samples, "pending": [list(p) for p in layout.pending]},
            "dp_rank": ds.dp_rank,
            "worker_positions": list(self._positions),
            "next_worker": self._next_worker,
        }

    def load_state_dict(self, state: dict) -> None:
        ds: PackedTokenDataset = self.dataset
        _check_identity(state, _identity(ds))
        layout = ds.layout
        if "redealt" in state:  # from merge_dp_states: the unconsumed rest, for any new layout
            if (state["dp_rank"], state["dp_size"]) != (ds.dp_rank, layout.dp_size):
                raise ValueError(f"merged state is for rank {state['dp_rank']} of {state['dp_size']}, "
                                 f"this loader is rank {ds.dp_rank} of {layout.dp_size}")
            redealt = state["redealt"]
            ds.layout = Layout(layout.n_samples, layout.dp_size, layout.workers, layout.lanes,
                               layout.infinite, redealt["first_epoch"], tuple(map(tuple, redealt["pending"])))
            self._positions, self._next_worker = [0] * layout.workers, 0
            return
        saved = state["layout"]
        mine = (ds.dp_rank, layout.dp_size, layout.workers, layout.lanes, layout.infinite)
        theirs = (state["dp_rank"], saved["dp_size"], saved["workers"], saved["lanes"], saved["infinite"])
        if mine != theirs:
            raise ValueError(
                "loader state was saved as (dp_rank, dp_size, workers, lanes, infinite)="
                f"{theirs}, this loader is {mine}; to change the layout pass every rank's state "
                "through data_pipeline.loader.merge_dp_states(states, new_dp_rank, new_dp_size)")
        ds.layout = Layout(layout.n_samples, layout.dp_size, layout.workers, layout.lanes, layout.infinite,
                           saved["first_epoch"], tuple(map(tuple, saved["pending"])))
        self._positions, self._next_worker = list(state["worker_positions"]), state["next_worker"]


def merge_dp_states(states: list[dict], new_dp_rank: int, new_dp_size: int) -> dict:
    """Combine the states of all old data-parallel ranks into the state for one new rank.

    The result holds the unconsumed rest of the started epoch(s) as (epoch, start, end) intervals;
    a loader of any dp_size / num_workers / lanes deals it out and then continues with whole epochs.
    """
    if not states:
        raise ValueError("merge_dp_states needs the states of all old ranks, got none")
    if not 0 <= new_dp_rank < new_dp_size:
        raise ValueError(f"new_dp_rank must be in [0, {new_dp_size}), got {new_dp_rank}")
    first = states[0]
    if "redealt" in first:
        raise ValueError("these are merged states; merge the states saved by the loaders instead")
    for s in states:
        _check_identity(s, _identity_of(first))
        if s["layout"] != first["layout"]:
            raise ValueError(f"states come from different layouts: {s['layout']} vs {first['layout']}")
    saved = first["layout"]
    ranks = sorted(s["dp_rank"] for s in states)
    if ranks != list(range(saved["dp_size"])):
        raise ValueError(f"need exactly one state per old rank 0..{saved['dp_size'] - 1}, got ranks {ranks}")
    layout = Layout(saved["n_samples"], saved["dp_size"], saved["workers"], saved["lanes"],
                    saved["infinite"], saved["first_epoch"], tuple(map(tuple, saved["pending"])))
    consumed = {}
    for s in states:
        for w, position in enumerate(s["worker_positions"]):
            for p in range(layout.lanes):
                consumed[layout.stream(s["dp_rank"], w, p)] = lane_consumed(position, p, layout.lanes)
    pending, first_epoch = layout.remaining(consumed)
    return {**_identity_of(first), "dp_rank": new_dp_rank, "dp_size": new_dp_size,
            "redealt": {"first_epoch": first_epoch, "pending": [list(p) for p in pending],
                        "from_dp_size": layout.dp_size}}


def _identity(ds: PackedTokenDataset) -> dict:
    return {"format": STATE_FORMAT, "split": ds.split, "seed": ds.seed, "fingerprint": ds.fingerprint,
            "tokenizer_id": ds.tokenizer_id}


def _identity_of(state: dict) -> dict:
    return {k: state.get(k) for k in ("format", "split", "seed", "fingerprint", "tokenizer_id")}


def _check_identity(state: dict, expected: dict) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a data_pipeline loader state (format {state.get('format')!r}, "
                         f"expected {STATE_FORMAT!r})")
    if state.get("tokenizer_id") != expected["tokenizer_id"]:
        raise ValueError(f"tokenizer mismatch: the state was saved on data tokenised with "
                         f"{state.get('tokenizer_id')!r}, this data uses {expected['tokenizer_id']!r}")
    for key in ("split", "seed", "fingerprint"):
        if state.get(key) != expected[key]:
            raise ValueError(f"loader state {key} is {state.get(key)!r} but this loader has "
                             f"{expected[key]!r}: a state only resumes on the same split, seed and shards")
