"""Raw text -> tokenised, packed, sharded webdataset tars + manifest.json.

    python -m data_pipeline prepare --source builtin --tokenizer pydocs4k --seq-len 1024 --out data/pydocs

Documents are read in a fixed order, tokenised in parallel worker processes (results come back in
order), assigned to train/val by position (every round(1/val_fraction)-th document is validation),
packed (see packing.py) and written with webdataset.ShardWriter (mtime=0, fixed uid/gid names), so
re-running on the same input gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .encode_worker import encode, init_worker
from .errors import check_on_error
from .manifest import FORMAT, write_manifest
from .packing import TOKEN_DTYPE, PackedSample, SequencePacker, encode_entry
from .readers import Document, describe_sources, iter_documents
from .tokenizer import BUILTIN_BPE_NAME, STANDARD_ENCODINGS, Tokenizer, load_tokenizer

SPLITS = ("train", "val")
TASK_BYTES = 512 << 10  # text per worker task: big enough to amortise IPC, small enough to balance


def prepare(sources: list[str] | str, tokenizer: str | Tokenizer, seq_len: int, out: str | os.PathLike, *,
            text_field: str = "text", val_fraction: float = 0.01, num_workers: int | None = None,
            shard_bytes: int = 128_000_000, entry_bytes: int = 512 << 10, on_error: str = "raise",
            overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenise `sources` into `out`/{train,val}/shard-NNNNNN.tar and `out`/manifest.json.

    val_fraction: share of documents (by position) that go to the validation split.
    num_workers: tokeniser processes (default: all cores; 1 = in this process).
    shard_bytes / entry_bytes: target tar shard size / bytes of tokens per tar entry.
    on_error: "raise" on bad input, or "skip" it and count it in manifest["skipped"].
    Returns the manifest.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    check_on_error(on_error)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    num_workers = num_workers or len(os.sched_getaffinity(0))
    out = Path(out)
    _prepare_out_dir(out, overwrite)

    sample_len = seq_len + 1
    samples_per_entry = max(1, round(entry_bytes / (sample_len * TOKEN_DTYPE.itemsize)))
    entries_per_shard = max(1, shard_bytes // (samples_per_entry * sample_len * TOKEN_DTYPE.itemsize))
    writers = {s: SplitWriter(out, s, samples_per_entry, entries_per_shard) for s in SPLITS}
    packers = {s: SequencePacker(seq_len, tok.eot_id) for s in SPLITS}
    val_every = round(1 / val_fraction) if val_fraction > 0 else 0
    skipped: Counter = Counter()
    docs_per_split: Counter = Counter()

    documents = iter_documents(sources, text_field=text_field, on_error=on_error, skipped=skipped)
    bar = _progress_bar(progress)
    start, text_bytes, n_tokens, ordinal = time.perf_counter(), 0, 0, 0
    for batch, token_arrays in _tokenize(documents, tok, num_workers):
        for doc, ids in zip(batch, token_arrays):
            split = "val" if val_every and ordinal % val_every == val_every - 1 else "train"
            ordinal += 1
            docs_per_split[split] += 1
            writers[split].add(packers[split].add(ids))
            text_bytes += doc.nbytes
            n_tokens += len(ids)
        if bar is not None:
            bar.update(sum(d.nbytes for d in batch))
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - start) / 1e6:.2f}M tok/s", refresh=False)
    if bar is not None:
        bar.close()
    if ordinal == 0:
        raise ValueError(f"no documents found in {sources} (skipped: {dict(skipped)})")

    splits = {}
    for split in SPLITS:
        writers[split].add(packers[split].finish())
        splits[split] = writers[split].close() | {
            "documents": docs_per_split[split], "stream_tokens": packers[split].stream_tokens}
    manifest = {
        "format": FORMAT,
        "tokenizer_id": tok.id,
        "tokenizer": {"name": tok.name, "spec": _portable_spec(tok.spec), "vocab_size": tok.vocab_size,
                      "eot_id": tok.eot_id},
        "vocab_size": tok.vocab_size,
        "seq_len": seq_len,
        "sample_len": sample_len,
        "samples_per_entry": samples_per_entry,
        "token_dtype": "uint32le",
        "sources": describe_sources(sources, text_field),
        "val_fraction": val_fraction,
        "documents": {"total": ordinal, "text_bytes": text_bytes, "tokens": n_tokens},
        "skipped": dict(sorted(skipped.items())),
        "splits": splits,
    }
    write_manifest(out, manifest)
    return manifest


class SplitWriter:
    """Groups samples into entries and entries into shards; records per-shard counts and sha256."""

    def __init__(self, out: Path, split: str, samples_per_entry: int, entries_per_shard: int):
        self.out, self.split = out, split
        self.samples_per_entry, self.entries_per_shard = samples_per_entry, entries_per_shard
        self._writer = None  # a webdataset.ShardWriter, opened on the first entry: no empty tars
        self._pending: list[PackedSample] = []
        self._entries = 0
        self._current = Counter()  # counts of the shard being written
        self.shards: list[dict] = []

    def add(self, samples: Iterable[PackedSample]) -> None:
        for sample in samples:
            self._pending.append(sample)
            if len(self._pending) == self.samples_per_entry:
                self._write_entry()

    def _write_entry(self) -> None:
        if self._writer is None:
            import webdataset  # here, not at the top: it imports torch, and spawned tokeniser
            # workers re-import the caller's main module (and so this one) before they start
            (self.out / self.split).mkdir(parents=True, exist_ok=True)
            self._writer = webdataset.ShardWriter(
                str(self.out / self.split / "shard-%06d.tar"), maxcount=self.entries_per_shard,
                maxsize=float("inf"), post=self._shard_done, verbose=0, encoder=False, mtime=0)
        # Global entry number as key: the loader checks it, which catches shuffled or swapped shards.
        self._writer.write({"__key__": f"{self._entries:09d}", **encode_entry(self._pending)})
        self._current.update(entries=1, samples=len(self._pending),
                             tokens=sum(s.n_valid for s in self._pending))
        self._entries += 1
        self._pending = []

    def _shard_done(self, fname: str) -> None:
        # Called by ShardWriter when it closes a shard (before writing the next shard's first entry).
        data = Path(fname).read_bytes()
        self.shards.append({"path": str(Path(fname).relative_to(self.out)), **self._current,
                            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        self._current = Counter()

    def close(self) -> dict:
        if self._pending:
            self._write_entry()
        if self._writer is not None:
            self._writer.close()
        return {"samples": sum(s["samples"] for s in self.shards),
                "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def _portable_spec(spec: str) -> str:
    """What load_tokenizer needs to reload it from anywhere: names stay names, paths become absolute."""
    return spec if spec in (*STANDARD_ENCODINGS, BUILTIN_BPE_NAME) else os.path.abspath(spec)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        for name in ("manifest.json", *SPLITS):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _batches(documents: Iterator[Document]) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += doc.nbytes
        if size >= TASK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenize(documents: Iterator[Document], tok: Tokenizer,
              num_workers: int) -> Iterator[tuple[list[Document], list[np.ndarray]]]:
    """(batch of documents, their token ids), in input order."""
    batches = _batches(documents)
    if num_workers <= 1:
        init_worker(tok)
        for batch in batches:
            yield batch, encode([d.text for d in batch])
        return
    # spawn, not fork: the caller may hold threads (torch, tqdm) that fork would copy mid-lock.
    # The Encoding travels pickled, so workers skip re-reading rank files and re-hashing the id.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=init_worker, initargs=(tok,)) as pool:
        pending: deque[list[Document]] = deque()  # batches sent out, to pair with results in order

        def texts():
            for batch in batches:
                pending.append(batch)
                yield [d.text for d in batch]

        # imap's feeder thread reads ahead only as far as the pipe to the workers lets it
        for ids in pool.imap(encode, texts(), chunksize=1):
            yield pending.popleft(), ids


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc="tokenising", smoothing=0.1)
