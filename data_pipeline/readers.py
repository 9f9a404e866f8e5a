"""Corpus readers: JSONL (field configurable), plain text files/dirs, Parquet, and the built-in corpus.

Every reader yields `Document`s in a deterministic order (directories are walked sorted) and checks
each one: not valid UTF-8, invalid JSON, a missing/non-string field, a null Parquet value or an empty
(whitespace-only) document is a `DataError` naming file and line/row, or a counted skip when
on_error="skip".
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, check_on_error, handle

BUILTIN_CORPUS = Path(__file__).parent / "corpus" / "python311_docs.jsonl.xz"
BUILTIN_DESCRIPTION = ("Python 3.11 documentation sources (reStructuredText) from Debian's "
                       "python3.11-doc 3.11.2-6+deb12u8, PSF License; see data_pipeline/corpus/README.md")

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
COMPRESSED_SUFFIXES = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    where: str  # "path:line" / "path:row N" / "path", for error messages
    nbytes: int  # size in the source, for MB/s
    offset: int = 0  # where its line starts in the file (JSONL; 0 for other files)


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file of the sources, in reading order."""
    path: Path
    explicit: bool  # named as a source (text whatever its suffix), not found walking a directory
    text_field: str | None = None  # the built-in corpus: "text" whatever the caller's field

    @property
    def splittable(self) -> bool:
        """Uncompressed JSONL: a byte range of it can be read on its own (read_source_file)."""
        return _kind(self.path) == ("jsonl", "")


def source_files(sources: list[str] | str) -> list[SourceFile]:
    """The files of `sources` (each "builtin", a file or a directory) in the order they are read."""
    files = []
    for source in [sources] if isinstance(sources, str) else sources:
        if source == "builtin":
            if not BUILTIN_CORPUS.exists():
                raise FileNotFoundError(f"built-in corpus {BUILTIN_CORPUS} is missing; rebuild it with "
                                        f"python -m data_pipeline.corpus.build_python_docs")
            files.append(SourceFile(BUILTIN_CORPUS, True, "text"))
            continue
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"corpus source {source} does not exist")
        if not path.is_dir():
            files.append(SourceFile(path, True))
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
        if not found:
            raise FileNotFoundError(f"corpus directory {source} contains no files")
        files += [SourceFile(p, False) for p in found]
    return files


def iter_documents(sources: list[str] | str, text_field: str = "text", on_error: str = "raise",
                   skipped: Counter | None = None) -> Iterator[Document]:
    """All documents of `sources` (each "builtin", a file or a directory), in order."""
    check_on_error(on_error)
    for file in source_files(sources):
        yield from read_source_file(file, text_field, on_error, skipped)


def read_source_file(file: SourceFile, text_field: str, on_error: str, skipped: Counter | None,
                     start: int = 0, end: int | None = None) -> Iterator[Document]:
    """The documents of one file; of a splittable one, those whose line starts in bytes [start, end)
    (a line starts at byte 0 or after a newline), so adjacent ranges share no document and lose none."""
    text_field = file.text_field or text_field
    kind, compression = _kind(file.path)
    if kind == "jsonl":
        if (start or end is not None) and not file.splittable:
            raise ValueError(f"{file.path} is compressed: it can only be read whole")
        yield from _read_jsonl(file.path, text_field, on_error, skipped, start, end)
    elif kind == "parquet":
        yield from _read_parquet(file.path, text_field, on_error, skipped)
    elif kind == "text" or file.explicit:  # a file named on the command line is text whatever its suffix
        yield from _read_text(file.path, compression, on_error, skipped)
    # other files found while walking a directory (images, archives...) are not documents


def describe_sources(sources: list[str], text_field: str) -> list[dict]:
    """What the manifest records about where the data came from."""
    out = []
    for source in sources:
        if source == "builtin":
            out.append({"source": "builtin", "file": BUILTIN_CORPUS.name, "description": BUILTIN_DESCRIPTION})
        else:
            out.append({"source": os.path.abspath(source), "text_field": text_field})
    return out


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _kind(path: Path) -> tuple[str, str]:
    """('jsonl'|'parquet'|'text'|'other', compression suffix or '')."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES else ""
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl", compression
    if last == ".parquet":
        return "parquet", compression
    if last in TEXT_SUFFIXES:
        return "text", compression
    return "other", compression


def _open(path: Path, compression: str):
    return COMPRESSED_SUFFIXES[compression](path, "rb") if compression else open(path, "rb")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError("invalid_utf8", where,
                        f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _check_text(text: str, where: str) -> None:
    if not text.strip():
        raise DataError("empty_document", where, "empty document")


def _read_jsonl(path: Path, text_field: str, on_error: str, skipped: Counter | None, start: int = 0,
                end: int | None = None) -> Iterator[Document]:
    _, compression = _kind(path)
    with _open(path, compression) as f:
        at = 0  # byte offset of the line being read
        if start:  # skip the line that began before `start` (it belongs to the previous range)
            f.seek(start - 1)
            at = start - 1 + len(f.readline())
        for line_no, raw in enumerate(f, start=1):
            line_at, at = at, at + len(raw)
            if end is not None and line_at >= end:
                break
            if not raw.strip():
                continue  # blank lines (e.g. a trailing one) separate nothing
            where = f"{path}:{line_no}" if not start else f"{path}:byte {line_at}"  # line unknown mid-file
            try:
                record = json.loads(_decode(raw, where))
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError("missing_field", where, f"no field {text_field!r} in this JSON line")
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError("bad_field", where,
                                    f"field {text_field!r} is {type(text).__name__}, expected a string")
                try:
                    text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates
                except UnicodeEncodeError as e:
                    raise DataError("invalid_utf8", where, f"invalid unicode in {text_field!r}: {e.reason}")
                _check_text(text, where)
            except json.JSONDecodeError as e:
                handle(DataError("bad_json", where, f"invalid JSON: {e}"), on_error, skipped)
                continue
            except DataError as e:
                handle(e, on_error, skipped)
                continue
            yield Document(text, where, len(raw), line_at)


def _read_text(path: Path, compression: str, on_error: str, skipped: Counter | None) -> Iterator[Document]:
    with _open(path, compression) as f:
        raw = f.read()
    where = str(path)
    try:
        text = _decode(raw, where)
        _check_text(text, where)
    except DataError as e:
        handle(e, on_error, skipped)
        return
    yield Document(text, where, len(raw))


def _read_parquet(path: Path, text_field: str, on_error: str, skipped: Counter | None) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        handle(DataError("unreadable_file", str(path), f"cannot read Parquet file: {e}"), on_error, skipped)
        return
    if text_field not in parquet.schema_arrow.names:
        raise DataError("missing_field", str(path),
                        f"no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError("bad_field", str(path), f"column {text_field!r} has type {column_type}, expected string")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            where = f"{path}:row {row}"
            row += 1
            try:
                if text is None:
                    raise DataError("null_value", where, f"{text_field!r} is null")
                _check_text(text, where)
            except DataError as e:
                handle(e, on_error, skipped)
                continue
            yield Document(text, where, len(text.encode("utf-8")))
