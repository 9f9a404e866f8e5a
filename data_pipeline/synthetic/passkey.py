"""Passkey (needle) retrieval at 1k ... 128k.

Prompt = an instruction line, filler text (the usual "The grass is green. The sky is blue. ..."
repeated and cut to length) with the needle "The pass key is NNNNN. Remember it. NNNNN is the
pass key." inserted at a relative depth, then the question; answer = the pass key (`digits`
random digits). Examples cycle through every (length, depth) pair of `lengths` x `depths`, so
buckets are balanced; length counts characters of the prompt (= tokens with the chars
tokenizer). Metadata: length, depth, position (character offset of the needle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HEADER = "There is an important piece of information hidden in the text below. Find it and remember it.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key?"


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Passkey:
    """Passkey retrieval: find a random number hidden at some depth of long filler text."""

    lengths: tuple = _knob((1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
                           "prompt lengths in characters, cycled through")
    depths: tuple = _knob((0.0, 0.25, 0.5, 0.75, 1.0), "relative needle positions (0 = start, 1 = end)")
    digits: int = _knob(5, "digits of the pass key")

    def __post_init__(self):
        self.lengths, self.depths = tuple(self.lengths), tuple(float(d) for d in self.depths)
        if not self.lengths or not self.depths or self.digits < 1:
            raise ValueError("need at least one length and one depth, and digits >= 1")
        fixed = len(HEADER) + len(NEEDLE.format(key="0" * self.digits)) + len(QUESTION)
        if min(self.lengths) < fixed:
            raise ValueError(f"lengths must be >= {fixed} characters (instruction, needle and question)")
        if not all(0 <= d <= 1 for d in self.depths):
            raise ValueError("depths must be in [0, 1]")

    def example(self, rng: np.random.Generator, split: str) -> dict:
        # The (length, depth) cell comes from the example's own generator, uniformly over all
        # cells, so an example is the same whatever else is drawn.
        cell = int(rng.integers(len(self.lengths) * len(self.depths)))
        length, depth = self.lengths[cell % len(self.lengths)], self.depths[cell // len(self.lengths)]
        key = "".join(str(d) for d in rng.integers(10, size=self.digits))
        if key[0] == "0" and self.digits > 1:
            key = str(int(rng.integers(1, 10))) + key[1:]
        needle = NEEDLE.format(key=key)
        n_filler = length - len(HEADER) - len(needle) - len(QUESTION)
        filler = (FILLER * (n_filler // len(FILLER) + 1))[:n_filler]
        at = round(depth * n_filler)
        prompt = HEADER + filler[:at] + needle + filler[at:] + QUESTION
        return {"prompt": prompt, "answer": key, "length": len(prompt), "depth": depth,
                "position": len(HEADER) + at}
