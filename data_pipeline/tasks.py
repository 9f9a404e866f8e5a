"""Supervised task files: TSV (header row), CSV (header row) or JSONL examples with a prompt and an
answer field, and how one example becomes tokens plus a loss mask.

    examples = read_task_file("test.tsv", "Text", "Answer")      # [TaskExample], file order
    ids, mask = encode_example(tok, ex.prompt, ex.answer, "\\n")  # prompt + sep + answer + EOT

The file format follows the suffix (.tsv, .csv, .jsonl/.json/.ndjson, each optionally .gz/.xz/.bz2).
TSV and CSV are read with Python's csv module, so quoted fields with embedded newlines, tabs and
quotes (as csv.writer writes them) round-trip. Every problem (missing column or field, a row with
the wrong number of fields, an empty prompt/answer, invalid UTF-8 or JSON) is a DataError naming
the file and the line the example starts on. Fields other than prompt/answer/split are kept in
`TaskExample.fields` (e.g. the synthetic tasks' bucket metadata: lag, length, position).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, check_on_error, handle
from .readers import COMPRESSED_SUFFIXES, JSONL_SUFFIXES

TASK_FORMATS = {".tsv": "tsv", ".csv": "csv", **{s: "jsonl" for s in JSONL_SUFFIXES}}
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test"}
MAX_LABELS = 64  # a closed label set has at most this many distinct answers


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str
    where: str  # "path:line", for error messages
    split: str | None = None  # "train" | "val" | "test" when the file has a split field
    fields: dict = field(default_factory=dict)  # every other field of the row


def task_file_format(path: str | Path) -> str:
    """'tsv' | 'csv' | 'jsonl' from the suffix (compression suffix ignored); ValueError otherwise."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes.pop()
    kind = TASK_FORMATS.get(suffixes[-1] if suffixes else "")
    if kind is None:
        raise ValueError(f"{path}: unknown task file format (suffix {''.join(suffixes) or 'none'!r}); "
                         f"use .tsv or .csv with a header row, or .jsonl (optionally .gz/.xz/.bz2)")
    return kind


def read_task_file(path: str | Path, prompt_field: str, answer_field: str,
                   split_field: str | None = None) -> list[TaskExample]:
    """All examples of a task file, in file order (see the module docstring)."""
    return list(iter_task_file(path, prompt_field, answer_field, split_field))


def iter_task_file(path: str | Path, prompt_field: str, answer_field: str, split_field: str | None = None,
                   on_error: str = "raise", skipped: Counter | None = None) -> Iterator[TaskExample]:
    """As read_task_file, lazily; with on_error="skip" a bad row is counted in `skipped` instead
    (a bad header or an unparseable file still raises)."""
    check_on_error(on_error)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    kind = task_file_format(path)
    wanted = [prompt_field, answer_field] + ([split_field] if split_field else [])
    rows = _jsonl_rows(path) if kind == "jsonl" else _csv_rows(path, "\t" if kind == "tsv" else ",", wanted)
    for where, row in rows:
        try:
            yield _example(where, row, wanted, prompt_field, answer_field, split_field)
        except DataError as e:
            handle(e, on_error, skipped)


def _example(where: str, row: dict, wanted: list[str], prompt_field: str, answer_field: str,
             split_field: str | None) -> TaskExample:
    for name in wanted:
        if name not in row:
            raise DataError("missing_field", where, f"no field {name!r} in this example "
                            f"(fields: {sorted(row)})")
    values = {}
    for name in wanted:
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError("bad_field", where, f"field {name!r} is {type(value).__name__}, "
                            f"expected a string")
        values[name] = str(value)
    for name in (prompt_field, answer_field):
        if not values[name]:
            raise DataError("empty_field", where, f"field {name!r} is empty")
    split = None
    if split_field:
        split = SPLIT_ALIASES.get(values[split_field].strip().lower())
        if split is None:
            raise DataError("bad_split", where, f"split {values[split_field]!r} is not one of "
                            f"{sorted(SPLIT_ALIASES)}")
    extra = {k: v for k, v in row.items() if k not in wanted}
    return TaskExample(values[prompt_field], values[answer_field], where, split, extra)


def write_task_file(path: str | Path, examples: Iterable[dict]) -> Path:
    """Write dicts (same keys in each) as TSV/CSV (csv.writer quoting) or JSONL, by suffix."""
    path = Path(path)
    kind = task_file_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        text = "".join(json.dumps(e, ensure_ascii=False, sort_keys=False) + "\n" for e in examples)
    else:
        buf = io.StringIO()
        writer = None
        for e in examples:
            if writer is None:
                writer = csv.DictWriter(buf, fieldnames=list(e), delimiter="\t" if kind == "tsv" else ",",
                                        lineterminator="\n")
                writer.writeheader()
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in e.items()})
        text = buf.getvalue()
    opener = COMPRESSED_SUFFIXES.get(path.suffix.lower())
    data = text.encode("utf-8")
    if opener:
        with opener(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def encode_example(tok, prompt: str, answer: str, separator: str,
                   loss_on: str = "answer") -> tuple[np.ndarray, int]:
    """(ids, mask_start): ids = prompt + separator + answer + EOT, each part encoded on its own (so
    the answer's tokens start at a token boundary); targets at positions >= mask_start count.
    A separator that names a special token of `tok` (e.g. "<|sep|>" of `chars`) is that one id."""
    prompt_ids = encode_prompt(tok, prompt, separator)
    ids = np.concatenate([prompt_ids, np.asarray(tok.encode(answer), dtype=np.int64),
                          np.array([tok.eot_id], dtype=np.int64)])
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")
    return ids, (len(prompt_ids) if loss_on == "answer" else 0)


def encode_prompt(tok, prompt: str, separator: str) -> np.ndarray:
    """What a model is given to produce the answer: prompt + separator, as in encode_example."""
    return np.concatenate([np.asarray(tok.encode(prompt), dtype=np.int64), separator_ids(tok, separator)])


def separator_ids(tok, separator: str) -> np.ndarray:
    if separator in tok.encoding.special_tokens_set:
        return np.array([tok.encoding.encode_single_token(separator)], dtype=np.int64)
    return np.asarray(tok.encode(separator), dtype=np.int64)


def closed_label_set(answers: Iterable[str], max_labels: int = MAX_LABELS) -> list[str] | None:
    """The sorted distinct answers when they form a small closed set (at most `max_labels`, and on
    average at least two examples per answer), else None (score by generation, not by choice)."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
        if len(counts) > max_labels:
            return None
    n = sum(counts.values())
    return sorted(counts) if counts and n >= 2 * len(counts) else None


# ---- readers --------------------------------------------------------------------------------

def _open_text(path: Path):
    opener = COMPRESSED_SUFFIXES.get(path.suffix.lower())
    raw = opener(path, "rb") if opener else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _csv_rows(path: Path, delimiter: str, wanted: list[str]) -> Iterator[tuple[str, dict]]:
    with _open_text(path) as f:
        try:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            header = next(reader, None)
            if header is None:
                raise DataError("empty_file", f"{path}:1", "empty task file (expected a header row)")
            if len(set(header)) != len(header):
                raise DataError("bad_header", f"{path}:1", f"duplicate column names in header {header}")
            for name in wanted:
                if name not in header:
                    raise DataError("missing_field", f"{path}:1", f"no column {name!r} in the header "
                                    f"(columns: {header})")
            start = reader.line_num + 1  # the line the next record starts on
            for record in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1
                if not record or record == [""]:
                    continue  # blank line
                if len(record) != len(header):
                    raise DataError("bad_row", where, f"row has {len(record)} field(s), the header has "
                                    f"{len(header)} ({header}); quote fields that contain the delimiter")
                yield where, dict(zip(header, record))
        except csv.Error as e:
            raise DataError("bad_row", f"{path}:{reader.line_num}", f"cannot parse row: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError("invalid_utf8", f"{path}:{reader.line_num + 1}", f"not valid UTF-8: {e.reason}") \
                from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    opener = COMPRESSED_SUFFIXES.get(path.suffix.lower())
    with (opener(path, "rb") if opener else open(path, "rb")) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError("invalid_utf8", where, f"not valid UTF-8: {e.reason}") from None
            except json.JSONDecodeError as e:
                raise DataError("bad_json", where, f"invalid JSON: {e}") from None
            if not isinstance(record, dict):
                raise DataError("bad_json", where, f"expected a JSON object, got {type(record).__name__}")
            yield where, record
