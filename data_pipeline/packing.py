"""Packing documents into fixed-length samples, and the on-disk layout of one tar entry.

The token stream is doc_0 EOT doc_1 EOT ... (an end-of-text id after every document). Sample i is
stream[i*L : i*L + L + 1]: L + 1 tokens, overlapping the next sample by one token, so that with
inputs = tokens[:-1] and targets = tokens[1:] every stream token after the first is a target exactly
once and no token is lost. The last sample of a split is padded with EOT up to L + 1; its `n_valid`
says how many tokens are real.

Per sample we store the document boundaries: `starts`, the positions in [0, n_valid) where a
document begins (0 when the sample starts exactly on a document).

A tar entry holds k samples (several per entry for read speed) in two members:
  <key>.tokens.u32   k * (L + 1) little-endian uint32 token ids
  <key>.docs.u32     little-endian uint32, per sample: n_valid, n_starts, starts...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

TOKENS_MEMBER = "tokens.u32"
DOCS_MEMBER = "docs.u32"
TOKEN_DTYPE = np.dtype("<u4")


@dataclass(frozen=True, slots=True)
class PackedSample:
    tokens: np.ndarray  # (L + 1,) uint32, EOT-padded after n_valid
    n_valid: int
    starts: tuple[int, ...]


class SequencePacker:
    """Streams documents in, complete (L + 1)-token samples out."""

    def __init__(self, seq_len: int, eot_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.eot = np.array([eot_id], dtype=TOKEN_DTYPE)
        self._buffer = np.empty(0, dtype=TOKEN_DTYPE)  # stream tokens from the next sample's start
        self._starts: list[int] = []  # document starts, relative to the buffer
        self.stream_tokens = 0  # tokens in the stream so far (documents + EOTs)

    def add(self, tokens: np.ndarray) -> Iterator[PackedSample]:
        """Append one document (its ids, without EOT); yield the samples it completes."""
        self._starts.append(len(self._buffer))
        self._buffer = np.concatenate([self._buffer, tokens.astype(TOKEN_DTYPE, copy=False), self.eot])
        self.stream_tokens += len(tokens) + 1
        L = self.seq_len
        offset = 0  # slide a window over the buffer rather than copying it per sample
        while len(self._buffer) - offset >= L + 1:
            yield PackedSample(self._buffer[offset:offset + L + 1], L + 1,
                               tuple(s - offset for s in self._starts if offset <= s <= offset + L))
            offset += L
        if offset:
            self._buffer = self._buffer[offset:].copy()
            self._starts = [s - offset for s in self._starts if s >= offset]

    def finish(self) -> Iterator[PackedSample]:
        """The EOT-padded last sample, unless only the overlap token (already a target) is left."""
        n = len(self._buffer)
        if n >= 2:
            padded = np.full(self.seq_len + 1, self.eot[0], dtype=TOKEN_DTYPE)
            padded[:n] = self._buffer
            yield PackedSample(padded, n, tuple(self._starts))
        self._buffer = np.empty(0, dtype=TOKEN_DTYPE)
        self._starts = []


def encode_entry(samples: list[PackedSample]) -> dict[str, bytes]:
    tokens = np.stack([s.tokens for s in samples]).astype(TOKEN_DTYPE, copy=False)
    docs: list[int] = []
    for s in samples:
        docs += [s.n_valid, len(s.starts), *s.starts]
    return {TOKENS_MEMBER: tokens.tobytes(), DOCS_MEMBER: np.array(docs, dtype=TOKEN_DTYPE).tobytes()}


def decode_entry(tokens_bytes: bytes, docs_bytes: bytes, sample_len: int,
                 vocab_size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """(tokens (k, L+1) uint32, [(n_valid, starts)] * k); ValueError says what is malformed."""
    row_bytes = sample_len * TOKEN_DTYPE.itemsize
    if len(tokens_bytes) == 0 or len(tokens_bytes) % row_bytes:
        raise ValueError(f"{TOKENS_MEMBER} has {len(tokens_bytes)} bytes, not a multiple of one "
                         f"sample ({row_bytes} bytes)")
    tokens = np.frombuffer(tokens_bytes, dtype=TOKEN_DTYPE).reshape(-1, sample_len)
    top = int(tokens.max())
    if top >= vocab_size:
        row, col = np.argwhere(tokens >= vocab_size)[0]
        raise ValueError(f"token id {top} >= vocab size {vocab_size} (sample {row} of the entry, "
                         f"position {col})")
    if len(docs_bytes) % TOKEN_DTYPE.itemsize:
        raise ValueError(f"{DOCS_MEMBER} has {len(docs_bytes)} bytes, not a multiple of 4")
    docs = np.frombuffer(docs_bytes, dtype=TOKEN_DTYPE)
    bounds, at = [], 0
    for row in range(len(tokens)):
        if at + 2 > len(docs):
            raise ValueError(f"{DOCS_MEMBER} ends before sample {row} of {len(tokens)}")
        n_valid, n_starts = int(docs[at]), int(docs[at + 1])
        starts = docs[at + 2:at + 2 + n_starts]
        at += 2 + n_starts
        if not 2 <= n_valid <= sample_len or len(starts) != n_starts or \
                (n_starts and (starts[-1] >= n_valid or np.any(np.diff(starts.astype(np.int64)) <= 0))):
            raise ValueError(f"{DOCS_MEMBER} is malformed at sample {row} (n_valid={n_valid}, "
                             f"starts={starts.tolist()[:8]})")
        bounds.append((n_valid, starts))
    if at != len(docs):
        raise ValueError(f"{DOCS_MEMBER} has {len(docs) - at} trailing values")
    return tokens, bounds


def doc_ids(n_valid: int, starts: np.ndarray, sample_len: int) -> np.ndarray:
    """Per-position document index within the sample (0, 1, ...), -1 on padding."""
    ids = np.zeros(sample_len, dtype=np.int32)
    ids[starts[starts > 0]] = 1
    np.cumsum(ids, out=ids)
    ids[n_valid:] = -1
    return ids
