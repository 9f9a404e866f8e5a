"""Train our own byte-level BPE with rustbpe and save it as a .tiktoken file (+ .json sidecar).

`vocab_size` counts every id the model embeds: 256 byte tokens + merges + <|endoftext|>, so a
4096 vocabulary has 3839 merges and end-of-text id 4095. rustbpe's ranks load into
tiktoken.Encoding with identical ids (checked by the tests); training is deterministic, so the
committed data_pipeline/tokenizers/pydocs4k.tiktoken is reproduced byte for byte by

    python -m data_pipeline train-tokenizer --source builtin --vocab-size 4096 \
        --name pydocs4k --out data_pipeline/tokenizers/pydocs4k.tiktoken
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import rustbpe

from .readers import iter_documents
from .tokenizer import ENDOFTEXT, load_tiktoken_file, save_tiktoken_file, tokenizer_id


def train_bpe(texts: Iterable[str], vocab_size: int) -> tuple[dict[bytes, int], str]:
    """Return (mergeable ranks, split pattern) for a vocabulary of `vocab_size` ids incl. EOT."""
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + 1 merge + EOT), got {vocab_size}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - 1)  # last id is reserved for EOT
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    if len(ranks) != vocab_size - 1:
        raise ValueError(f"corpus too small: BPE stopped at {len(ranks) + 1} ids, asked for {vocab_size}")
    return ranks, trainer.get_pattern()


def train_tokenizer(sources: list[str], out: str | os.PathLike, vocab_size: int, name: str,
                    text_field: str = "text", on_error: str = "raise") -> str:
    """Train on the documents of `sources`, write `out` (+ `out`.json); return the tokenizer id."""
    docs = (doc.text for doc in iter_documents(sources, text_field=text_field, on_error=on_error))
    ranks, pat_str = train_bpe(docs, vocab_size)
    save_tiktoken_file(out, name, ranks, pat_str, {ENDOFTEXT: len(ranks)},
                       info={"trained_on": sources, "trainer": "rustbpe", "vocab_size": vocab_size})
    return tokenizer_id(load_tiktoken_file(out))
