"""Cutting a corpus into pieces, and pieces into parts, so that many machines prepare it together.

    python -m data_pipeline prepare --source corpus/ ... --out data/web --part 3/16   # -> data/web/part-00003-of-00016
    python -m data_pipeline merge data/web                                           # -> data/web/manifest.json

Pieces. The source files, in the order prepare reads them, are taken as one stream of bytes and cut
into pieces of `piece_bytes`: a piece takes whole files until it holds piece_bytes, and an
uncompressed JSONL file that would overflow it is cut at a byte position (its rest starts the next
piece). A byte range holds the documents whose line starts in it (a line starts at byte 0 or after
a newline), so no document is split, lost or read twice. Other files (compressed, Parquet, text)
are never cut: one larger than piece_bytes is a piece of its own size. The pieces depend on the
files, their sizes and piece_bytes, never on the number of parts.

Parts. Part I of N prepares a contiguous run of pieces, cut where the bytes before it reach I/N of
the total (every part at least one piece), into its own prepared directory.

Validation split. Every round(1/val_fraction)-th document *of each piece* is validation (the count
restarts at each piece), so a document lands in the same split whether one prepare reads all pieces
or N parts read them; a corpus smaller than one piece is split exactly as before pieces existed.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .readers import Document, SourceFile, read_source_file, source_files

DEFAULT_PIECE_BYTES = 256_000_000
PART_DIR = "part-{index:05d}-of-{count:05d}"


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, end) of one file (the whole file unless it is splittable), in piece `piece`."""
    file: SourceFile
    start: int
    end: int
    piece: int


@dataclass(frozen=True)
class Part:
    """Which pieces part `index` of `count` prepares; recorded in its manifest under "part"."""
    index: int
    count: int
    pieces: tuple[int, int]  # [first, end)
    piece_count: int
    piece_bytes: int
    plan: str  # fingerprint of the piece plan: parts that disagree were cut from different files

    @property
    def dir_name(self) -> str:
        return PART_DIR.format(index=self.index, count=self.count)

    def to_manifest(self) -> dict:
        return asdict(self) | {"pieces": list(self.pieces)}


def parse_part(text: str) -> tuple[int, int]:
    """"I/N" (0 <= I < N) -> (I, N); ValueError otherwise."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"a part is I/N with integers 0 <= I < N (e.g. 0/8), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"a part is I/N with integers 0 <= I < N (e.g. 0/8), got {text!r}")
    return index, count


def plan_pieces(sources: list[str], piece_bytes: int) -> list[Chunk]:
    """The chunks of all source files, in reading order, each with its piece (module docstring)."""
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
    chunks, piece, filled = [], 0, 0
    for file in source_files(sources):
        size, at = file.path.stat().st_size, 0
        if file.splittable:
            while size - at > piece_bytes - filled:  # the rest overflows this piece: cut the file
                cut = at + piece_bytes - filled
                chunks.append(Chunk(file, at, cut, piece))
                piece, filled, at = piece + 1, 0, cut
        chunks.append(Chunk(file, at, size, piece))
        filled += size - at
        if filled >= piece_bytes:
            piece, filled = piece + 1, 0
    return chunks


def select_part(chunks: list[Chunk], index: int, count: int, piece_bytes: int) -> tuple[Part, list[Chunk]]:
    """(part `index` of `count`, its chunks); ValueError when there are fewer pieces than parts."""
    piece_count = chunks[-1].piece + 1 if chunks else 0
    if count > piece_count:
        pieces = f"{piece_count} piece{'s' * (piece_count != 1)}"
        raise ValueError(f"--part {index}/{count}: the sources make {pieces} of --piece-mb {piece_bytes / 1e6:g} "
                         f"(only uncompressed JSONL files are cut), fewer than {count} parts; "
                         f"use at most {piece_count} parts or a smaller --piece-mb")
    sizes = [0] * piece_count
    for chunk in chunks:
        sizes[chunk.piece] += chunk.end - chunk.start
    before = [0]  # bytes before each piece
    for size in sizes:
        before.append(before[-1] + size)
    total, bounds = before[-1], [0]
    for i in range(1, count):
        first = bisect_left(before, -(-i * total // count))  # the first piece at or after i/N of the bytes
        bounds.append(min(max(first, bounds[-1] + 1), piece_count - (count - i)))  # none empty
    bounds.append(piece_count)
    lo, hi = bounds[index], bounds[index + 1]
    plan = hashlib.sha256(json.dumps([(str(c.file.path), c.start, c.end, c.piece) for c in chunks]).encode())
    part = Part(index, count, (lo, hi), piece_count, piece_bytes, plan.hexdigest()[:16])
    return part, [c for c in chunks if lo <= c.piece < hi]


def read_chunks(chunks: list[Chunk], text_field: str, on_error: str,
                skipped: Counter | None) -> Iterator[tuple[int, Document]]:
    """(piece, document) for every document of `chunks`, in order; adjacent chunks of one file are
    read in one pass (whole-file line numbers in error messages when it starts at byte 0)."""
    for group in _passes(chunks):
        file = group[0].file
        if not file.splittable:
            for document in read_source_file(file, text_field, on_error, skipped):
                yield group[0].piece, document
            continue
        starts = [c.start for c in group]
        for document in read_source_file(file, text_field, on_error, skipped, group[0].start, group[-1].end):
            yield group[bisect_right(starts, document.offset) - 1].piece, document


def _passes(chunks: list[Chunk]) -> Iterator[list[Chunk]]:
    """Runs of chunks that one read covers: consecutive byte ranges of one splittable file."""
    run: list[Chunk] = []
    for chunk in chunks:
        if run and not (chunk.file == run[-1].file and chunk.file.splittable and chunk.start == run[-1].end):
            yield run
            run = []
        run.append(chunk)
    if run:
        yield run


def part_dirs(root: Path) -> list[Path]:
    """The part directories prepare --part wrote under `root`, sorted."""
    return sorted(p for p in root.glob("part-*-of-*") if p.is_dir())
