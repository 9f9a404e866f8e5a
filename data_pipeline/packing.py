"""Packing documents into fixed-length samples, and the on-disk layout of one tar entry.

The token stream is doc_0 EOT doc_1 EOT ... (an end-of-text id after every document). Sample i is
stream[i*L : i*L + L + 1]: L + 1 tokens, overlapping the next sample by one token, so that with
inputs = tokens[:-1] and targets = tokens[1:] every stream token after the first is a target exactly
once and no token is lost. The last sample of a split is padded with EOT up to L + 1; its `n_valid`
says how many tokens are real.

That is `--pack stream`. For supervised examples two more packers keep every example whole:
`greedy` puts examples into the current sample while they fit and pads the rest of it; `none`
puts one example per sample and pads. Samples of these packers do not overlap, and padding
(EOT ids beyond n_valid) gets doc_ids -1, so no example sees another across a sample.

Per sample we store the document boundaries: `starts`, the positions in [0, n_valid) where a
document begins (0 when the sample starts exactly on a document).

A tar entry holds k samples (several per entry for read speed) in two or three members:
  <key>.docs.u32     little-endian uint32, per sample: n_valid, n_starts, starts...
  <key>.mask.bits    (only when the manifest says "loss_mask": true) per sample ceil((L+1)/8)
                     bytes, np.packbits of the loss mask: bit t = 1 when token t is a target
  <key>.tokens.u32   k * (L + 1) little-endian uint32 token ids
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

TOKENS_MEMBER = "tokens.u32"
DOCS_MEMBER = "docs.u32"
MASK_MEMBER = "mask.bits"
TOKEN_DTYPE = np.dtype("<u4")
PACK_MODES = ("stream", "greedy", "none")


@dataclass(frozen=True, slots=True)
class PackedSample:
    tokens: np.ndarray  # (L + 1,) uint32, EOT-padded after n_valid
    n_valid: int
    starts: tuple[int, ...]
    mask: np.ndarray  # (L + 1,) bool: the token is a prediction target (padding: False)


class TooLong(ValueError):
    """An example does not fit one sample under greedy/none packing."""


def make_packer(mode: str, seq_len: int, eot_id: int) -> "SequencePacker | ExamplePacker":
    if mode == "stream":
        return SequencePacker(seq_len, eot_id)
    if mode in ("greedy", "none"):
        return ExamplePacker(seq_len, eot_id, share=mode == "greedy")
    raise ValueError(f"unknown pack mode {mode!r}; use one of {PACK_MODES}")


class SequencePacker:
    """Streams documents in, complete (L + 1)-token samples out (`--pack stream`)."""

    def __init__(self, seq_len: int, eot_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.eot = np.array([eot_id], dtype=TOKEN_DTYPE)
        self._buffer = np.empty(0, dtype=TOKEN_DTYPE)  # stream tokens from the next sample's start
        self._mask = np.empty(0, dtype=bool)
        self._starts: list[int] = []  # document starts, relative to the buffer
        self.stream_tokens = 0  # tokens in the stream so far (documents + EOTs)

    def add(self, tokens: np.ndarray, mask_start: int = 0) -> Iterator[PackedSample]:
        """Append one document (its ids, without EOT; targets from index mask_start on, EOT
        included); yield the samples it completes."""
        self._starts.append(len(self._buffer))
        self._buffer = np.concatenate([self._buffer, tokens.astype(TOKEN_DTYPE, copy=False), self.eot])
        self._mask = np.concatenate([self._mask, np.arange(len(tokens) + 1) >= mask_start])
        self.stream_tokens += len(tokens) + 1
        L = self.seq_len
        offset = 0  # slide a window over the buffer rather than copying it per sample
        while len(self._buffer) - offset >= L + 1:
            yield PackedSample(self._buffer[offset:offset + L + 1], L + 1,
                               tuple(s - offset for s in self._starts if offset <= s <= offset + L),
                               self._mask[offset:offset + L + 1])
            offset += L
        if offset:
            self._buffer = self._buffer[offset:].copy()
            self._mask = self._mask[offset:].copy()
            self._starts = [s - offset for s in self._starts if s >= offset]

    def finish(self) -> Iterator[PackedSample]:
        """The EOT-padded last sample, unless only the overlap token (already a target) is left."""
        n = len(self._buffer)
        if n >= 2:
            padded = np.full(self.seq_len + 1, self.eot[0], dtype=TOKEN_DTYPE)
            padded[:n] = self._buffer
            mask = np.zeros(self.seq_len + 1, dtype=bool)
            mask[:n] = self._mask
            yield PackedSample(padded, n, tuple(self._starts), mask)
        self._buffer = np.empty(0, dtype=TOKEN_DTYPE)
        self._mask = np.empty(0, dtype=bool)
        self._starts = []


class ExamplePacker:
    """Whole examples (ids + EOT) per sample, EOT-padded: one per sample (`none`), or as many as
    fit in input order (`greedy`). An example longer than L + 1 tokens raises TooLong."""

    def __init__(self, seq_len: int, eot_id: int, share: bool):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.eot_id, self.share = seq_len, eot_id, share
        self._parts: list[tuple[np.ndarray, int]] = []
        self._used = 0
        self.stream_tokens = 0

    def add(self, tokens: np.ndarray, mask_start: int = 0) -> Iterator[PackedSample]:
        n = len(tokens) + 1
        if n > self.seq_len + 1:
            raise TooLong(f"example has {n} tokens with its end-of-text, more than one sample holds "
                          f"(seq_len + 1 = {self.seq_len + 1}); raise --seq-len to at least {n - 1}")
        if self._parts and (not self.share or self._used + n > self.seq_len + 1):
            yield from self.finish()
        self._parts.append((tokens, mask_start))
        self._used += n
        self.stream_tokens += n

    def finish(self) -> Iterator[PackedSample]:
        if not self._parts:
            return
        L1 = self.seq_len + 1
        tokens = np.full(L1, self.eot_id, dtype=TOKEN_DTYPE)
        mask = np.zeros(L1, dtype=bool)
        starts, at = [], 0
        for ids, mask_start in self._parts:
            starts.append(at)
            tokens[at:at + len(ids)] = ids
            mask[at + mask_start:at + len(ids) + 1] = True
            at += len(ids) + 1
        self._parts, self._used = [], 0
        if at < 2:  # a 1-token sample has no target; nothing to store
            return
        yield PackedSample(tokens, at, tuple(starts), mask)


def encode_entry(samples: list[PackedSample], with_mask: bool = False) -> dict[str, bytes]:
    tokens = np.stack([s.tokens for s in samples]).astype(TOKEN_DTYPE, copy=False)
    docs: list[int] = []
    for s in samples:
        docs += [s.n_valid, len(s.starts), *s.starts]
    entry = {TOKENS_MEMBER: tokens.tobytes(), DOCS_MEMBER: np.array(docs, dtype=TOKEN_DTYPE).tobytes()}
    if with_mask:
        entry[MASK_MEMBER] = np.packbits(np.stack([s.mask for s in samples]), axis=1).tobytes()
    return entry


def decode_mask(mask_bytes: bytes, n_samples: int, sample_len: int) -> np.ndarray:
    """(k, L+1) bool from a mask member; ValueError when its size does not fit k samples."""
    row = (sample_len + 7) // 8
    if len(mask_bytes) != n_samples * row:
        raise ValueError(f"{MASK_MEMBER} has {len(mask_bytes)} bytes, expected {n_samples} x {row}")
    bits = np.frombuffer(mask_bytes, dtype=np.uint8).reshape(n_samples, row)
    return np.unpackbits(bits, axis=1, count=sample_len).astype(bool)


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
