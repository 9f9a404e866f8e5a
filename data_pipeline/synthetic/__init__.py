"""Synthetic long-range tasks: seeded, deterministic generators of prompt/answer examples.

    python -m data_pipeline synth NAME --out FILE.jsonl|FILE.tsv|FILE.csv --n N --seed S [--knob value ...]
    python -m data_pipeline synth NAME --out DIR --n N --seed S [--tokenizer chars] [--seq-len L] ...
    python -m data_pipeline synth NAME --help          # every knob with its meaning and default

Names (see each module for the construction):
  mqar, diffuse-mqar                       associative recall (recall.py)
  two-style, two-style-4k, two-style-16k   two-style long-range classification (styles.py)
  passkey                                  passkey / needle retrieval, 1k ... 128k (passkey.py)
  selective-copy                           selective copying (copying.py)

Every example is a dict {"prompt", "answer", "split", <bucket metadata>...} (e.g. lag, length,
position), written as a task file (`prepare --format task --prompt-field prompt --answer-field
answer --split-field split` reads it back) or straight into shards. Example i of a split is drawn
from its own generator, np.random.default_rng([seed, split, i]), so the same seed gives
byte-identical files and an example does not depend on how many others are drawn. `--n` train
examples are followed by `--n-val` and `--n-test` (default n // 10 each); test examples of the
recall tasks use lags up to `test_lag_factor` x the longest training lag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..tasks import TASK_FORMATS, TaskExample
from .copying import SelectiveCopy
from .passkey import Passkey
from .recall import AssociativeRecall
from .styles import TwoStyle

SPLIT_KEYS = {"train": 0, "val": 1, "test": 2}

GENERATORS = {
    "mqar": lambda **kw: AssociativeRecall(**kw),
    "diffuse-mqar": lambda **kw: AssociativeRecall(**({**AssociativeRecall.DIFFUSE} | kw)),
    "two-style": lambda **kw: TwoStyle(**kw),
    "two-style-4k": lambda **kw: TwoStyle(**(TwoStyle.lengths_around(4096) | kw)),
    "two-style-16k": lambda **kw: TwoStyle(**(TwoStyle.lengths_around(16384) | kw)),
    "passkey": lambda **kw: Passkey(**kw),
    "selective-copy": lambda **kw: SelectiveCopy(**kw),
}


def make_generator(name: str, **knobs):
    """The generator `name` with `knobs` overriding its defaults; ValueError lists the known names."""
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic task {name!r}; known: {', '.join(GENERATORS)}")
    return GENERATORS[name](**knobs)


def generate(name: str, n: int, seed: int, n_val: int | None = None, n_test: int | None = None,
             **knobs) -> Iterator[dict]:
    """n train, then n_val val and n_test test examples (default n // 10 each) of task `name`."""
    gen = make_generator(name, **knobs)
    counts = {"train": n, "val": n // 10 if n_val is None else n_val, "test": n // 10 if n_test is None else n_test}
    for split, count in counts.items():
        for i in range(count):
            rng = np.random.default_rng([seed, SPLIT_KEYS[split], i])
            example = gen.example(rng, split)
            yield {"prompt": example.pop("prompt"), "answer": example.pop("answer"), "split": split, **example}


def knobs_of(gen) -> dict:
    return {f.name: getattr(gen, f.name) for f in dataclasses.fields(gen)}


# ---- command line -----------------------------------------------------------------------------

def add_synth_parser(commands) -> None:
    s = commands.add_parser("synth", help="generate a synthetic long-range task (task file or shards)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = s.add_subparsers(dest="task", required=True, metavar="NAME")
    for name in GENERATORS:
        gen = make_generator(name)
        p = names.add_parser(name, help=type(gen).__doc__.splitlines()[0], description=type(gen).__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--out", required=True,
                       help="a .jsonl/.tsv/.csv task file, or a directory to write shards into")
        p.add_argument("--n", type=int, required=True, help="training examples")
        p.add_argument("--seed", type=int, default=0, help="example seed (default 0)")
        p.add_argument("--n-val", type=int, default=None, help="validation examples (default n // 10)")
        p.add_argument("--n-test", type=int, default=None, help="test examples (default n // 10)")
        g = p.add_argument_group("shards (when --out is a directory)")
        g.add_argument("--tokenizer", default="chars", help="default chars (one token per character)")
        g.add_argument("--seq-len", type=int, default=None,
                       help="default: the longest example (+ separator and end-of-text), rounded up to 64")
        g.add_argument("--separator", default="\n", help="between prompt and answer (default newline)")
        g.add_argument("--pack", choices=("none", "greedy", "stream"), default="none")
        g.add_argument("--loss-on", choices=("answer", "all"), default="answer")
        g.add_argument("--overwrite", action="store_true")
        k = p.add_argument_group("task knobs")
        for f in dataclasses.fields(gen):
            default = getattr(gen, f.name)
            k.add_argument(f"--{f.name.replace('_', '-')}", dest=f"knob_{f.name}", type=_parser_for(default),
                           default=None, metavar="VALUE", help=f"{f.metadata.get('help', '')} (default {_show(default)})")


def run_synth(args, summary) -> int:
    knobs = {k.removeprefix("knob_"): v for k, v in vars(args).items() if k.startswith("knob_") and v is not None}
    gen = make_generator(args.task, **knobs)  # validates the knobs before anything is written
    examples = generate(args.task, args.n, args.seed, args.n_val, args.n_test, **knobs)
    out = Path(args.out)
    if any(suffix.lower() in TASK_FORMATS for suffix in out.suffixes):
        from ..tasks import write_task_file
        write_task_file(out, examples)
        sidecar = out.with_name(out.name + ".synth.json")
        sidecar.write_text(json.dumps({"synthetic": args.task, "seed": args.seed, "n": args.n, "n_val": args.n_val,
                                       "n_test": args.n_test, "knobs": knobs_of(gen)}, indent=2) + "\n")
        print(f"wrote {out} (and {sidecar.name}): {args.task} (seed {args.seed}); prepare it with\n"
              f"  python -m data_pipeline prepare --source {out} --format task --prompt-field prompt "
              f"--answer-field answer --split-field split --tokenizer chars --seq-len L --out DIR")
        return 0
    manifest = write_shards(args.task, list(examples), out, tokenizer=args.tokenizer, seq_len=args.seq_len,
                            separator=args.separator, pack=args.pack, loss_on=args.loss_on,
                            overwrite=args.overwrite, source={"seed": args.seed, "knobs": knobs_of(gen)})
    summary(str(out), manifest)
    return 0


def write_shards(name: str, examples: list[dict], out, *, tokenizer: str = "chars", seq_len: int | None = None,
                 separator: str = "\n", pack: str = "none", loss_on: str = "answer", overwrite: bool = False,
                 source: dict | None = None, **kw) -> dict:
    """Generated examples straight into shards (one example per sample by default)."""
    from ..prepare import TaskSpec, prepare_examples
    from ..tasks import encode_example
    from ..tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer)
    if seq_len is None:
        longest = max(len(encode_example(tok, e["prompt"], e["answer"], separator)[0]) for e in examples)
        seq_len = -(-(longest - 1) // 64) * 64
    task = TaskSpec("prompt", "answer", separator, loss_on, "split")
    items = (TaskExample(e["prompt"], e["answer"], f"{name} {e['split']} example {i}", e["split"])
             for i, e in enumerate(examples))
    return prepare_examples(items, tok, seq_len, out, task=task, pack=pack, overwrite=overwrite,
                            sources=[{"synthetic": name, **(source or {})}], **{"progress": False} | kw)


def _parser_for(default):
    if isinstance(default, tuple):
        item = type(default[0]) if default else str
        return lambda text: tuple(item(x) for x in text.split(",") if x)
    if isinstance(default, bool):
        return lambda text: text.lower() in ("1", "true", "yes")
    return type(default)


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)
