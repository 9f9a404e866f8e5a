"""Associative recall: MQAR and Diffuse MQAR.

Prompt = `pairs` key-value pairs written back to back (each key `key_len` symbols of
`key_alphabet`, each value `value_len` symbols of `value_alphabet`; every key in a context is
distinct), then "?", then the `queries` query keys; answer = their values, in query order.

    mqar           key_len 1, value_len 1, 4 queries, no distractors:
                   "aB3xQ7...?ax" -> "37"
    diffuse-mqar   key_len 3, value_len 2, 1 query, 4 distractors: for each queried key
                   p+s, `distractors` other pairs have keys p+s' (same prefix, other last symbol)
                   and other values, so matching the prefix is not enough.

Lag: the number of pairs between a queried pair and the "?" (0 = the last pair). Training and
validation lags are uniform in [0, max_lag]; test lags uniform in [0, test_lag_factor * max_lag]
(so up to 4x the longest trained lag by default); the context length (`pairs`) is the same for
every split, so only the lag changes. Metadata per example: lag (the largest, with several
queries), lags (per query), length (prompt characters).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np

QUERY_MARK = "?"


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class AssociativeRecall:
    """Associative recall (MQAR; diffuse-mqar = multi-symbol keys with prefix-sharing distractors)."""

    pairs: int = _knob(32, "key-value pairs in the context")
    key_len: int = _knob(1, "symbols per key")
    value_len: int = _knob(1, "symbols per value")
    queries: int = _knob(4, "queried keys per example (answer = their values in order)")
    distractors: int = _knob(0, "pairs per queried key whose key shares all but its last symbol (key_len >= 2)")
    max_lag: int = _knob(7, "longest lag (pairs between a queried pair and the query) in train/val")
    test_lag_factor: int = _knob(4, "test lags go up to this many times max_lag")
    key_alphabet: str = _knob(string.ascii_letters, "symbols keys are made of")
    value_alphabet: str = _knob(string.digits, "symbols values are made of")

    DIFFUSE = {"pairs": 64, "key_len": 3, "value_len": 2, "queries": 1, "distractors": 4, "max_lag": 15}

    def __post_init__(self):
        longest = self.test_lag_factor * self.max_lag
        if min(self.pairs, self.key_len, self.value_len, self.queries) < 1 or self.max_lag < 0 \
                or self.distractors < 0 or self.test_lag_factor < 1:
            raise ValueError("pairs, key_len, value_len, queries must be >= 1; max_lag, distractors >= 0; "
                             "test_lag_factor >= 1")
        if longest + 1 < self.queries:
            raise ValueError(f"{self.queries} queries need {self.queries} distinct lags; raise max_lag")
        if self.pairs < longest + 1 or self.pairs < self.queries * (1 + self.distractors):
            raise ValueError(f"pairs={self.pairs} is too few: test lags reach {longest} and the queries "
                             f"with their distractors take {self.queries * (1 + self.distractors)} pairs")
        if self.distractors and self.key_len < 2:
            raise ValueError("distractors share a key's prefix: they need key_len >= 2")
        if self.distractors >= len(self.key_alphabet):
            raise ValueError(f"{self.distractors} distractors need more than {len(self.key_alphabet)} symbols")
        if len(set(self.key_alphabet) | set(self.value_alphabet) | {QUERY_MARK}) != \
                len(self.key_alphabet) + len(self.value_alphabet) + 1:
            raise ValueError(f"key and value alphabets must be disjoint and not contain {QUERY_MARK!r}")
        reserved = self.queries * len(self.key_alphabet) if self.key_len > 1 else 0  # queried prefixes
        if len(self.key_alphabet) ** self.key_len - reserved < self.pairs:
            raise ValueError(f"{len(self.key_alphabet)}^{self.key_len} keys are too few for {self.pairs} pairs")

    def example(self, rng: np.random.Generator, split: str) -> dict:
        max_lag = self.max_lag * (self.test_lag_factor if split == "test" else 1)
        lags = [int(x) for x in rng.choice(max_lag + 1, size=self.queries, replace=False)]
        slots = [self.pairs - 1 - lag for lag in lags]
        keys: list[str | None] = [None] * self.pairs
        values: list[str | None] = [None] * self.pairs
        free = sorted(set(range(self.pairs)) - set(slots))
        used, prefixes = set(), set()
        for slot in slots:
            key = self._fresh_key(rng, used, prefixes)
            keys[slot], values[slot] = key, self._value(rng)
            prefixes.add(key[:-1])
        for slot in slots:  # distractors: same prefix, another last symbol, another value
            prefix, last = keys[slot][:-1], keys[slot][-1]
            lasts = [c for c in self.key_alphabet if c != last and prefix + c not in used]
            for c in rng.choice(lasts, size=self.distractors, replace=False):
                at = free.pop(int(rng.integers(len(free))))
                keys[at] = prefix + str(c)
                used.add(keys[at])
                while (v := self._value(rng)) == values[slot]:
                    pass
                values[at] = v
        for at in free:  # fillers share no queried prefix, so the distractor count is exact
            keys[at], values[at] = self._fresh_key(rng, used, prefixes), self._value(rng)
        prompt = "".join(k + v for k, v in zip(keys, values)) + QUERY_MARK + "".join(keys[s] for s in slots)
        answer = "".join(values[s] for s in slots)
        meta = {"lag": max(lags), "length": len(prompt)}
        if self.queries > 1:
            meta["lags"] = lags
        return {"prompt": prompt, "answer": answer, **meta}

    def _fresh_key(self, rng, used: set, prefixes: set) -> str:
        while True:
            key = "".join(self.key_alphabet[i] for i in rng.integers(len(self.key_alphabet), size=self.key_len))
            if key not in used and (self.key_len < 2 or key[:-1] not in prefixes):
                used.add(key)
                return key

    def _value(self, rng) -> str:
        return "".join(self.value_alphabet[i] for i in rng.integers(len(self.value_alphabet), size=self.value_len))

    def parse(self, prompt: str) -> tuple[dict[str, str], list[str]]:
        """(context {key: value}, query keys) read back from a prompt (for checks and evaluation)."""
        context, query = prompt.split(QUERY_MARK)
        w = self.key_len + self.value_len
        pairs = [context[i:i + w] for i in range(0, len(context), w)]
        return ({p[:self.key_len]: p[self.key_len:] for p in pairs},
                [query[i:i + self.key_len] for i in range(0, len(query), self.key_len)])
