"""Two-style long-range classification ("SymbolSoup"-like).

Styles: family A has `family_sizes[0]` styles, family B `family_sizes[1]` (4 and 5: 20 classes).
A style is a Markov source over `alphabet`: a unigram preference u ~ Dirichlet(concentration),
per previous symbol a bigram preference T[a] ~ Dirichlet(concentration), next symbol drawn from
(1 - bigram_weight) u + bigram_weight T[prev]; with probability `motif_rate` per step one of the
style's `motifs` fixed strings (`motif_len` symbols) is inserted instead; finally each symbol is
replaced by a uniform one with probability `noise`. The styles are drawn once from `style_seed`,
so every split and every example seed shares them.

Example: a block of a family-A style and a block of a family-B style (`block_min`..`block_max`
symbols each) in random order, with uniform noise (i.i.d. symbols) before, between and after
them; the prompt is `min_length`..`max_length` symbols (400-600; two-style-4k / two-style-16k:
0.8-1.2 x 4096 / 16384). Answer = the style pair, "A<i>B<j>". Metadata: length, order ("AB" or
"BA"), gap (noise symbols between the blocks), position (start of the first block), a_start,
a_len, b_start, b_len.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Style:
    unigram: np.ndarray  # (V,)
    bigram: np.ndarray  # (V, V), rows sum to 1
    motifs: tuple[np.ndarray, ...]
    cdf: np.ndarray  # (V + 1, V): cumulative next-symbol probabilities after each symbol, then at the start


@dataclass
class TwoStyle:
    """Two-style long-range classification: label = (family-A style, family-B style) of two blocks."""

    alphabet: str = _knob("abcdefghijklmnop", "symbols of every block (styles and noise share them)")
    family_sizes: tuple = _knob((4, 5), "styles in family A and in family B (classes = product)")
    style_seed: int = _knob(0, "seed the styles are drawn from (keep it fixed across splits and runs)")
    min_length: int = _knob(400, "shortest prompt, in symbols")
    max_length: int = _knob(600, "longest prompt, in symbols")
    block_min: int = _knob(48, "shortest style block")
    block_max: int = _knob(80, "longest style block")
    concentration: float = _knob(0.3, "Dirichlet concentration of the unigram/bigram preferences (lower = sharper)")
    bigram_weight: float = _knob(0.5, "weight of the bigram preference against the unigram one")
    motifs: int = _knob(2, "motifs per style")
    motif_len: int = _knob(4, "symbols per motif")
    motif_rate: float = _knob(0.05, "chance per position of inserting a motif")
    noise: float = _knob(0.03, "chance per style-block symbol of a uniform replacement")

    def __post_init__(self):
        self.family_sizes = tuple(self.family_sizes)
        if len(self.family_sizes) != 2 or min(self.family_sizes) < 1:
            raise ValueError(f"family_sizes must be two positive counts, got {self.family_sizes}")
        if len(set(self.alphabet)) != len(self.alphabet) or len(self.alphabet) < 2:
            raise ValueError("alphabet must hold at least 2 distinct symbols")
        if not 1 <= self.block_min <= self.block_max:
            raise ValueError("need 1 <= block_min <= block_max")
        if not 2 * self.block_max <= self.min_length <= self.max_length:
            raise ValueError(f"need 2 * block_max ({2 * self.block_max}) <= min_length <= max_length")
        for name in ("bigram_weight", "motif_rate", "noise"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]")

    @staticmethod
    def lengths_around(n: int) -> dict:
        return {"min_length": int(0.8 * n), "max_length": int(1.2 * n)}

    @cached_property
    def styles(self) -> tuple[tuple[Style, ...], tuple[Style, ...]]:
        rng = np.random.default_rng([self.style_seed, len(self.alphabet), *self.family_sizes])
        V, c = len(self.alphabet), self.concentration
        families = []
        for size in self.family_sizes:
            family = []
            for _ in range(size):
                unigram, bigram = rng.dirichlet(np.full(V, c)), rng.dirichlet(np.full(V, c), size=V)
                motifs = tuple(rng.integers(V, size=self.motif_len) for _ in range(self.motifs))
                probs = np.vstack([(1 - self.bigram_weight) * unigram + self.bigram_weight * bigram, unigram])
                family.append(Style(unigram, bigram, motifs, np.cumsum(probs, axis=1)))
            families.append(tuple(family))
        return tuple(families)

    @staticmethod
    def label(a: int, b: int) -> str:
        return f"A{a}B{b}"

    def labels(self) -> list[str]:
        return [self.label(a, b) for a in range(self.family_sizes[0]) for b in range(self.family_sizes[1])]

    def block(self, rng: np.random.Generator, style: Style, n: int) -> np.ndarray:
        out: list[int] = []
        while len(out) < n:
            if style.motifs and rng.random() < self.motif_rate:
                out += style.motifs[int(rng.integers(len(style.motifs)))].tolist()
                continue
            row = style.cdf[out[-1] if out else -1]
            out.append(min(int(np.searchsorted(row, rng.random() * row[-1], side="right")), len(row) - 1))
        ids = np.array(out[:n])
        flip = rng.random(n) < self.noise
        ids[flip] = rng.integers(len(self.alphabet), size=int(flip.sum()))
        return ids

    def example(self, rng: np.random.Generator, split: str) -> dict:
        V = len(self.alphabet)
        a, b = int(rng.integers(self.family_sizes[0])), int(rng.integers(self.family_sizes[1]))
        length = int(rng.integers(self.min_length, self.max_length + 1))
        a_len, b_len = (int(x) for x in rng.integers(self.block_min, self.block_max + 1, size=2))
        a_first = bool(rng.integers(2))
        cuts = np.sort(rng.integers(0, length - a_len - b_len + 1, size=2))
        noise = rng.integers(V, size=length - a_len - b_len)
        blocks = [self.block(rng, self.styles[0][a], a_len), self.block(rng, self.styles[1][b], b_len)]
        first, second = blocks if a_first else blocks[::-1]
        ids = np.concatenate([noise[:cuts[0]], first, noise[cuts[0]:cuts[1]], second, noise[cuts[1]:]])
        start1 = int(cuts[0])
        start2 = start1 + len(first) + int(cuts[1] - cuts[0])
        a_start, b_start = (start1, start2) if a_first else (start2, start1)
        return {"prompt": "".join(self.alphabet[i] for i in ids), "answer": self.label(a, b),
                "length": length, "order": "AB" if a_first else "BA", "gap": int(cuts[1] - cuts[0]),
                "position": start1, "a_start": a_start, "a_len": a_len, "b_start": b_start, "b_len": b_len}
