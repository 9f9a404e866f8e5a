"""Selective copying (as in the Mamba paper).

Prompt = `length` positions, `tokens` of them (at random positions) holding symbols of
`alphabet`, the rest the blank symbol `blank`; answer = the non-blank symbols in order. Metadata:
length, span (first to last data position), position (first data position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class SelectiveCopy:
    """Selective copying: repeat the scattered data symbols of a mostly blank sequence, in order."""

    length: int = _knob(256, "prompt positions")
    tokens: int = _knob(16, "data symbols to copy")
    alphabet: str = _knob("abcdefghijklmnop", "data symbols")
    blank: str = _knob(".", "the blank symbol (not in the alphabet)")

    def __post_init__(self):
        if not 1 <= self.tokens <= self.length:
            raise ValueError("need 1 <= tokens <= length")
        if len(self.blank) != 1 or self.blank in self.alphabet or not self.alphabet:
            raise ValueError("blank must be one symbol outside a non-empty alphabet")

    def example(self, rng: np.random.Generator, split: str) -> dict:
        positions = np.sort(rng.choice(self.length, size=self.tokens, replace=False))
        symbols = [self.alphabet[i] for i in rng.integers(len(self.alphabet), size=self.tokens)]
        chars = [self.blank] * self.length
        for p, s in zip(positions, symbols):
            chars[p] = s
        return {"prompt": "".join(chars), "answer": "".join(symbols), "length": self.length,
                "span": int(positions[-1] - positions[0]), "position": int(positions[0])}
