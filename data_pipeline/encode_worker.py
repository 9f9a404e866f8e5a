"""Tokeniser worker for `prepare`: kept free of torch/webdataset imports so spawned workers start fast."""

from __future__ import annotations

import numpy as np

from .tokenizer import Tokenizer

_tokenizer: Tokenizer | None = None


def init_worker(tok: Tokenizer) -> None:
    global _tokenizer
    _tokenizer = tok


def encode(texts: list[str]) -> list[np.ndarray]:
    encoding = _tokenizer.encoding
    # encode_to_numpy with no allowed special tokens == encode_ordinary, minus the Python list.
    return [encoding.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]
