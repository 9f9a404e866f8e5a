"""Raw text or supervised task examples -> tokenised, packed, sharded webdataset tars + manifest.json.

    python -m data_pipeline prepare --source builtin --tokenizer pydocs4k --seq-len 1024 --out data/pydocs
    python -m data_pipeline prepare --source task.tsv --format task --prompt-field Text \
        --answer-field Answer --tokenizer chars --seq-len 1024 --out data/task

Two passes. First, documents (or examples) are read in a fixed order and tokenised in parallel
worker processes (results come back in order); each is assigned a split (text: every
round(1/val_fraction)-th document of each piece of the sources is validation, parts.py; tasks:
the file's split field, separate
--val-source/--test-source files, or the same every-k-th rule) and its ids go to a temporary
token file. Second, per split, the documents are taken in a seeded random order (`shuffle_seed`,
as Megatron shuffles its document index; None keeps source order), packed (packing.py) and
written with webdataset.ShardWriter (mtime=0, fixed uid/gid names), so re-running on the same
input gives byte-identical shards.

Several sequence lengths (`seq_len` a list, `--seq-len 1024,8192`) share pass 1: the documents are
tokenised once, and pass 2 runs once per length into `out`/seq{L} (`length_dirs`), each directory
exactly what a prepare at that one length writes (splits and skips are decided per length).

Part I of N (`part=(I, N)`, `--part I/N`) reads only its run of pieces of the text sources
(parts.py) and writes `out`/part-0000I-of-0000N (per length with several), its documents shuffled
among themselves (`document_order`); merge.py joins the parts into one dataset.

A task example becomes prompt + separator + answer + EOT, and its loss mask marks the answer and
the EOT (loss_on="answer") or every token (loss_on="all"); masks are stored in the shards
("loss_mask": true in the manifest) and the loader hands them out as batch["loss_mask"].
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .encode_worker import encode, init_worker
from .errors import DataError, check_on_error, handle
from .manifest import FORMAT, MANIFEST_NAME, write_manifest
from .packing import PACK_MODES, TOKEN_DTYPE, PackedSample, encode_entry, make_packer
from .parts import DEFAULT_PIECE_BYTES, Part, plan_pieces, read_chunks, select_part
from .readers import describe_sources
from .tasks import MAX_LABELS, SPLIT_NAMES, TaskExample, iter_task_file, separator_ids, task_file_format
from .tokenizer import BUILTIN_BPE_NAME, CHARS_NAME, STANDARD_ENCODINGS, Tokenizer, load_tokenizer

SPLITS = ("train", "val")
TASK_BYTES = 512 << 10  # text per worker task: big enough to amortise IPC, small enough to balance
FORMATS = ("text", "task")
DEFAULT_SHUFFLE_SEED = 0
TMP_TOKENS = "tokens.tmp"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    """One document (texts = (text,)) or task example (texts = (prompt, answer)) to tokenise."""
    texts: tuple[str, ...]
    where: str
    nbytes: int
    split: str | None = None  # fixed split (task files); None: by position
    piece: int = 0  # the piece of the sources it comes from (parts.py): positions count within a piece


@dataclass(frozen=True)
class TaskSpec:
    """How task examples become tokens; recorded in the manifest under "task"."""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    separator: str = "\n"
    loss_on: str = "answer"
    split_field: str | None = None
    file_format: str | None = None  # tsv | csv | jsonl (None: generated, not read from a file)

    def __post_init__(self):
        if self.loss_on not in ("answer", "all"):
            raise ValueError(f"loss_on must be 'answer' or 'all', got {self.loss_on!r}")


def prepare(sources: list[str] | str, tokenizer: str | Tokenizer, seq_len: int | Sequence[int],
            out: str | os.PathLike, *,
            text_field: str = "text", val_fraction: float = 0.01, num_workers: int | None = None,
            shard_bytes: int = 128_000_000, entry_bytes: int = 512 << 10, on_error: str = "raise",
            overwrite: bool = False, progress: bool = True, format: str = "text",
            task: TaskSpec | None = None, val_sources: list[str] | None = None,
            test_sources: list[str] | None = None, pack: str | None = None,
            shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED, part: tuple[int, int] | None = None,
            piece_bytes: int = DEFAULT_PIECE_BYTES) -> dict:
    """Tokenise `sources` into `out`/{train,val[,test]}/shard-NNNNNN.tar and `out`/manifest.json.

    seq_len: one length, or several: one tokenisation pass writes `out`/seq{L} for each length L
        (`length_dirs`) and the return value maps each length to its manifest.
    val_fraction: share of documents (by position) that go to the validation split (task data with
        a split field or val/test sources ignores it).
    num_workers: tokeniser processes (default: all cores; 1 = in this process).
    shard_bytes / entry_bytes: target tar shard size / bytes of tokens per tar entry.
    on_error: "raise" on bad input, or "skip" it and count it in manifest["skipped"].
    format: "text" (documents) or "task" (prompt/answer examples from TSV/CSV/JSONL, see `task`).
    pack: "stream" (default for text), "greedy" or "none" (default for tasks); see packing.py.
    shuffle_seed: seed of the per-split document order; None keeps the source order.
    part: (I, N): prepare only part I of N of the text sources (parts.py) into `out`/part-0000I-of-0000N
        (per length: `length_dirs`(out)/part-...), a directory `merge` (merge.py) joins with the others.
    piece_bytes: the size of the pieces the sources are cut into (parts.py); the validation count
        restarts at each piece, so it must be the same for all parts and for a prepare to compare.
    Returns the manifest.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    check_on_error(on_error)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; use one of {FORMATS}")
    skipped: Counter = Counter()
    if format == "text":
        if task is not None or val_sources or test_sources:
            raise ValueError("task options (prompt/answer fields, --val-source, --test-source) need --format task")
        chunks = plan_pieces(sources, piece_bytes)
        selected = None
        if part is not None:
            selected, chunks = select_part(chunks, *part, piece_bytes)
        records = (Record((d.text,), d.where, d.nbytes, piece=piece) for piece, d in
                   read_chunks(chunks, text_field, on_error, skipped))
        described = describe_sources(sources, text_field)
        return write_records(records, tokenizer, seq_len, out, sources=described, val_fraction=val_fraction,
                             num_workers=num_workers, shard_bytes=shard_bytes, entry_bytes=entry_bytes,
                             on_error=on_error, skipped=skipped, overwrite=overwrite, progress=progress,
                             pack=pack, shuffle_seed=shuffle_seed, part=selected, piece_bytes=piece_bytes)
    if part is not None:
        raise ValueError("--part splits text sources only; task files are small enough for one prepare")
    task = task or TaskSpec()
    files = {"train": sources, "val": list(val_sources or []), "test": list(test_sources or [])}
    if task.split_field and (val_sources or test_sources):
        raise ValueError("give either a split field or --val-source/--test-source files, not both")
    formats = {task_file_format(f) for group in files.values() for f in group}
    task = TaskSpec(**{**task.__dict__, "file_format": "+".join(sorted(formats))})
    records = _task_records(files, task, on_error, skipped)
    described = [{"source": os.path.abspath(f), "split": split if (val_sources or test_sources) else
                  (f"field {task.split_field!r}" if task.split_field else "by position")}
                 for split, group in files.items() for f in group]
    return write_records(records, tokenizer, seq_len, out, sources=described, task=task,
                         val_fraction=val_fraction, fixed_splits=bool(val_sources or test_sources),
                         num_workers=num_workers, shard_bytes=shard_bytes, entry_bytes=entry_bytes,
                         on_error=on_error, skipped=skipped, overwrite=overwrite, progress=progress,
                         pack=pack, shuffle_seed=shuffle_seed)


def prepare_examples(examples: Iterable[TaskExample], tokenizer: str | Tokenizer, seq_len: int | Sequence[int],
                     out: str | os.PathLike, *, task: TaskSpec, sources: list[dict], **kw) -> dict:
    """Task examples made in memory (e.g. the synthetic generators, each with its split) -> shards."""
    records = (Record((e.prompt, e.answer), e.where, len(e.prompt) + len(e.answer), e.split or "train")
               for e in examples)
    return write_records(records, tokenizer, seq_len, out, sources=sources, task=task, fixed_splits=True,
                         **kw)


def length_dirs(out: str | os.PathLike, seq_lens: Sequence[int]) -> dict[int, Path]:
    """Where a prepare at several sequence lengths writes each one: `out`/seq{L}."""
    return {seq_len: Path(out) / f"seq{seq_len}" for seq_len in seq_lens}


def write_records(records: Iterable[Record], tokenizer: str | Tokenizer, seq_len: int | Sequence[int],
                  out: str | os.PathLike, *, sources: list[dict], task: TaskSpec | None = None,
                  val_fraction: float = 0.01, fixed_splits: bool = False, num_workers: int | None = None,
                  shard_bytes: int = 128_000_000, entry_bytes: int = 512 << 10, on_error: str = "raise",
                  skipped: Counter | None = None, overwrite: bool = False, progress: bool = True,
                  pack: str | None = None, shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
                  part: Part | None = None, piece_bytes: int | None = None) -> dict:
    """The two passes (module docstring) over already-read records; see prepare() for the options.
    part: the records are that part of the sources: each length's directory is its part directory."""
    check_on_error(on_error)
    skipped = Counter() if skipped is None else skipped
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    seq_lens = [seq_len] if isinstance(seq_len, int) else list(seq_len)
    if not seq_lens or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in seq_lens) \
            or len(set(seq_lens)) < len(seq_lens):
        raise ValueError(f"seq_len must be a positive integer or distinct positive integers, got {seq_len!r}")
    pack = pack or ("none" if task else "stream")
    if pack not in PACK_MODES:
        raise ValueError(f"unknown pack mode {pack!r}; use one of {PACK_MODES}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    outs = {seq_len: Path(out)} if isinstance(seq_len, int) else length_dirs(out, seq_lens)
    if part is not None:
        for seq_len_, merged in outs.items():
            _drop_merged_manifest(merged, part, overwrite)
            outs[seq_len_] = merged / part.dir_name
    for out_dir in outs.values():
        _prepare_out_dir(out_dir, overwrite)
    splits_names = SPLIT_NAMES if task else SPLITS
    tmp_path = outs[seq_lens[0]] / TMP_TOKENS
    tokenized = _tokenize_to_file(records, tok, tmp_path, splits_names, seq_lens=seq_lens, task=task, pack=pack,
                                  val_fraction=val_fraction, num_workers=num_workers or len(os.sched_getaffinity(0)),
                                  on_error=on_error, skipped=skipped, progress=progress)
    # A part may hold no document of a split (merge checks the whole), a prepare must hold some.
    if part is None and any(done.documents == 0 for done in tokenized.values()):
        tmp_path.unlink()
        raise ValueError(f"no documents found in {[s.get('source') for s in sources]} "
                         f"(skipped: {dict(skipped + sum((d.skipped for d in tokenized.values()), Counter()))})")
    manifests = {}
    for seq_len_, done in tokenized.items():
        layout = ShardLayout.for_sizes(seq_len_, entry_bytes, shard_bytes)
        splits = _pack_to_shards(done, tmp_path, outs[seq_len_], layout, pack=pack, eot_id=tok.eot_id,
                                 with_mask=task is not None, shuffle_seed=shuffle_seed, part=part)
        manifest = {
            "format": FORMAT,
            "tokenizer_id": tok.id,
            "tokenizer": {"name": tok.name, "spec": _portable_spec(tok.spec), "vocab_size": tok.vocab_size,
                          "eot_id": tok.eot_id},
            "vocab_size": tok.vocab_size,
            "seq_len": seq_len_,
            "sample_len": layout.sample_len,
            "samples_per_entry": layout.samples_per_entry,
            "token_dtype": "uint32le",
            "sources": sources,
            "val_fraction": None if fixed_splits else val_fraction,
            "pack": pack,
            "shuffle_seed": shuffle_seed,
            "piece_bytes": piece_bytes,
            "loss_mask": task is not None,
            "documents": {"total": done.documents, "text_bytes": done.text_bytes, "tokens": done.tokens},
            "skipped": dict(sorted((skipped + done.skipped).items())),
            "splits": splits,
        }
        if task:
            manifest["task"] = _task_manifest(task, done.labels)
        if part is not None:
            manifest["part"] = part.to_manifest()
        write_manifest(outs[seq_len_], manifest)
        manifests[seq_len_] = manifest
    tmp_path.unlink()
    return manifests[seq_len] if isinstance(seq_len, int) else manifests


@dataclass
class TokenizedDocuments:
    """What pass 1 leaves beside the temporary token file for one sequence length: per split, each kept
    document's (offset, length, mask_start) columns, and the totals the manifest reports."""
    index: dict[str, tuple[array, array, array]]
    labels: Counter | None  # answers seen in a task file; None when there are too many to be labels
    skipped: Counter = field(default_factory=Counter)  # documents too long for this length
    text_bytes: int = 0
    tokens: int = 0
    piece: int = 0  # the piece being read
    ordinal: int = 0  # documents of this piece split by position so far (every k-th is validation)

    @property
    def documents(self) -> int:
        return sum(len(offsets) for offsets, _, _ in self.index.values())


def _tokenize_to_file(records: Iterable[Record], tok: Tokenizer, tmp_path: Path, splits_names: tuple[str, ...], *,
                      seq_lens: list[int], task: TaskSpec | None, pack: str, val_fraction: float, num_workers: int,
                      on_error: str, skipped: Counter, progress: bool) -> dict[int, TokenizedDocuments]:
    """Pass 1: tokenise into the temporary token file (once, whatever the number of lengths); each
    length keeps the documents that fit it and assigns them their splits as a prepare at that
    length alone would."""
    sep = separator_ids(tok, task.separator) if task else np.empty(0, dtype=np.int64)
    val_every = round(1 / val_fraction) if val_fraction > 0 else 0
    done = {seq_len: TokenizedDocuments({s: (array("q"), array("q"), array("q")) for s in splits_names},
                                        Counter() if task else None) for seq_len in seq_lens}
    bar = _progress_bar(progress)
    start, written, documents = time.perf_counter(), 0, 0  # written: tokens in the file, the next offset
    with open(tmp_path, "wb") as tmp:
        for batch, token_arrays in _tokenize(records, tok, num_workers):
            for record, parts in zip(batch, token_arrays):
                documents += 1
                if task:
                    ids = np.concatenate([parts[0], sep, parts[1]])
                    mask_start = len(parts[0]) + len(sep) if task.loss_on == "answer" else 0
                else:
                    ids, mask_start = parts[0], 0
                kept = False
                for seq_len, at_length in done.items():
                    if pack != "stream" and len(ids) + 1 > seq_len + 1:
                        handle(DataError("too_long", record.where, f"{len(ids) + 1} tokens with end-of-text, "
                                         f"more than one sample holds with --pack {pack} (seq_len + 1 = "
                                         f"{seq_len + 1}); raise --seq-len to at least {len(ids)}"),
                               on_error, at_length.skipped)
                        continue
                    if record.split is not None:
                        split = record.split
                    else:
                        if record.piece != at_length.piece:
                            at_length.piece, at_length.ordinal = record.piece, 0
                        split = "val" if val_every and at_length.ordinal % val_every == val_every - 1 else "train"
                        at_length.ordinal += 1
                    for column, value in zip(at_length.index[split], (written, len(ids), mask_start)):
                        column.append(value)
                    at_length.tokens += len(ids)
                    at_length.text_bytes += record.nbytes
                    if at_length.labels is not None:
                        at_length.labels[record.texts[1]] += 1
                        if len(at_length.labels) > MAX_LABELS:
                            at_length.labels = None
                    kept = True
                if kept:
                    tmp.write(ids.astype(TOKEN_DTYPE, copy=False).tobytes())
                    written += len(ids)
            if bar is not None:
                bar.update(sum(r.nbytes for r in batch))
                bar.set_postfix_str(f"{written / (time.perf_counter() - start) / 1e6:.2f}M tok/s", refresh=False)
    if bar is not None:
        bar.close()
    log.info("tokenised %d documents (%d tokens) in one pass for seq_len %s", documents, written,
             ", ".join(map(str, seq_lens)))
    return done


@dataclass(frozen=True)
class ShardLayout:
    sample_len: int  # seq_len + 1: inputs and the shifted targets
    samples_per_entry: int
    entries_per_shard: int

    @classmethod
    def for_sizes(cls, seq_len: int, entry_bytes: int, shard_bytes: int) -> ShardLayout:
        sample_len = seq_len + 1
        samples_per_entry = max(1, round(entry_bytes / (sample_len * TOKEN_DTYPE.itemsize)))
        entries_per_shard = max(1, shard_bytes // (samples_per_entry * sample_len * TOKEN_DTYPE.itemsize))
        return cls(sample_len, samples_per_entry, entries_per_shard)


def _pack_to_shards(tokenized: TokenizedDocuments, tmp_path: Path, out: Path, layout: ShardLayout, *, pack: str,
                    eot_id: int, with_mask: bool, shuffle_seed: int | None, part: Part | None) -> dict:
    """Pass 2: per split, documents in shuffled order -> packed samples -> shards. Returns the manifest's splits."""
    seq_len = layout.sample_len - 1
    tokens = np.memmap(tmp_path, dtype=TOKEN_DTYPE, mode="r") if tmp_path.stat().st_size else np.empty(0, TOKEN_DTYPE)
    splits = {}
    for split, (offsets, lengths, mask_starts) in tokenized.index.items():
        writer = SplitWriter(out, split, layout.samples_per_entry, layout.entries_per_shard, with_mask=with_mask)
        packer = make_packer(pack, seq_len, eot_id)
        for i in document_order(len(offsets), shuffle_seed, split, part):
            writer.add(packer.add(tokens[offsets[i]:offsets[i] + lengths[i]], mask_starts[i]))
        writer.add(packer.finish())
        splits[split] = writer.close() | {"documents": len(offsets), "stream_tokens": packer.stream_tokens}
    del tokens  # the memmap must be closed before the caller removes the file
    return splits


def _task_manifest(task: TaskSpec, labels: Counter | None) -> dict:
    """The task section of the manifest; labels only where each was seen at least twice on average."""
    n = sum(labels.values()) if labels is not None else 0
    return {"format": task.file_format, "prompt_field": task.prompt_field, "answer_field": task.answer_field,
            "split_field": task.split_field, "separator": task.separator, "loss_on": task.loss_on,
            "labels": sorted(labels) if labels is not None and n >= 2 * len(labels) else None}


def document_order(n: int, shuffle_seed: int | None, split: str, part: Part | None = None) -> np.ndarray:
    """The order documents of a split (of a part) are packed in: a seeded permutation, or 0..n-1 for None.
    A part permutes its own documents with the seed words (shuffle_seed, split, part index, part count)."""
    if shuffle_seed is None:
        return np.arange(n)
    split_key = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
    words = [shuffle_seed, split_key] + ([part.index, part.count] if part is not None else [])
    return np.random.default_rng(words).permutation(n)


def _task_records(files: dict[str, list[str]], task: TaskSpec, on_error: str,
                  skipped: Counter) -> Iterator[Record]:
    by_file = bool(files["val"] or files["test"])
    for split, group in files.items():
        for path in group:
            for e in iter_task_file(path, task.prompt_field, task.answer_field, task.split_field,
                                    on_error=on_error, skipped=skipped):
                yield Record((e.prompt, e.answer), e.where,
                             len(e.prompt.encode("utf-8")) + len(e.answer.encode("utf-8")),
                             split if by_file else e.split)


class SplitWriter:
    """Groups samples into entries and entries into shards; records per-shard counts and sha256."""

    def __init__(self, out: Path, split: str, samples_per_entry: int, entries_per_shard: int,
                 with_mask: bool = False):
        self.out, self.split, self.with_mask = out, split, with_mask
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
        self._writer.write({"__key__": f"{self._entries:09d}", **encode_entry(self._pending, self.with_mask)})
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
    return spec if spec in (*STANDARD_ENCODINGS, BUILTIN_BPE_NAME, CHARS_NAME) else os.path.abspath(spec)


def _drop_merged_manifest(merged: Path, part: Part, overwrite: bool) -> None:
    """A dataset merged from parts goes stale when a part is prepared again."""
    manifest = merged / MANIFEST_NAME
    if manifest.exists():
        if not overwrite:
            raise FileExistsError(f"{merged} already holds a prepared dataset ({manifest}); pass --overwrite to "
                                  f"prepare part {part.index}/{part.count} again (then merge again)")
        manifest.unlink()


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        for name in ("manifest.json", TMP_TOKENS, *SPLIT_NAMES):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _batches(records: Iterable[Record]) -> Iterator[list[Record]]:
    batch, size = [], 0
    for record in records:
        batch.append(record)
        size += record.nbytes
        if size >= TASK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenize(records: Iterable[Record], tok: Tokenizer,
              num_workers: int) -> Iterator[tuple[list[Record], list[list[np.ndarray]]]]:
    """(batch of records, per record the token ids of each of its texts), in input order."""
    batches = _batches(records)
    if num_workers <= 1:
        init_worker(tok)
        for batch in batches:
            yield batch, _regroup(batch, encode([t for r in batch for t in r.texts]))
        return
    # spawn, not fork: the caller may hold threads (torch, tqdm) that fork would copy mid-lock.
    # The Encoding travels pickled, so workers skip re-reading rank files and re-hashing the id.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=init_worker, initargs=(tok,)) as pool:
        pending: deque[list[Record]] = deque()  # batches sent out, to pair with results in order

        def texts():
            for batch in batches:
                pending.append(batch)
                yield [t for r in batch for t in r.texts]

        # imap's feeder thread reads ahead only as far as the pipe to the workers lets it
        for ids in pool.imap(encode, texts(), chunksize=1):
            batch = pending.popleft()
            yield batch, _regroup(batch, ids)


def _regroup(batch: list[Record], ids: list[np.ndarray]) -> list[list[np.ndarray]]:
    out, at = [], 0
    for r in batch:
        out.append(ids[at:at + len(r.texts)])
        at += len(r.texts)
    return out


def _progress_bar(enabled: bool):
    if not enabled or not sys.stderr.isatty():  # in a log file, tqdm's frames pile up on one line
        return None
    from tqdm import tqdm
    return tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc="tokenising", smoothing=0.1)
