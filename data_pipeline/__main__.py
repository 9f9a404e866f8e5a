"""Command line: prepare shards, train a tokenizer, inspect a prepared directory.

    python -m data_pipeline prepare --source builtin --tokenizer pydocs4k --seq-len 1024 --out data/pydocs
    python -m data_pipeline prepare --source corpus.jsonl.gz --text-field content --tokenizer o200k_base \
        --seq-len 8192 --out data/web --on-error skip
    python -m data_pipeline prepare --source builtin --tokenizer pydocs4k --seq-len 1024,8192 \
        --out data/pydocs   # one tokenisation pass -> data/pydocs/seq1024 and data/pydocs/seq8192
    python -m data_pipeline prepare --source web/ --tokenizer o200k_base --seq-len 8192 --out data/web \
        --part 3/16         # one of 16 machines -> data/web/part-00003-of-00016 (parts.py)
    python -m data_pipeline merge data/web   # after all parts: data/web/manifest.json over them (merge.py)
    python -m data_pipeline train-tokenizer --source builtin --vocab-size 4096 --name pydocs4k \
        --out data_pipeline/tokenizers/pydocs4k.tiktoken
    python -m data_pipeline prepare --source task.tsv --format task --prompt-field Text --answer-field Answer \
        --tokenizer chars --seq-len 1024 --out data/task --split-field split
    python -m data_pipeline synth diffuse-mqar --out data/dmqar --n 20000 --seed 0   # shards (chars)
    python -m data_pipeline synth two-style --out two_style.jsonl --n 20000 --seed 0  # a task file
    python -m data_pipeline synth two-style --help                                  # its knobs
    python -m data_pipeline inspect data/pydocs --verify --show 1
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .parts import DEFAULT_PIECE_BYTES


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (launch.slurm --prepare checks prepare's arguments with it)."""
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="tokenise, pack and shard a corpus")
    p.add_argument("--source", action="append", required=True,
                   help="'builtin', a .jsonl[.gz|.xz|.bz2] / .parquet / text file, or a directory; repeatable")
    p.add_argument("--tokenizer", required=True,
                   help="gpt2 | r50k_base | cl100k_base | o200k_base | pydocs4k | path/to/file.tiktoken")
    p.add_argument("--seq-len", type=_seq_lens, required=True,
                   help="tokens per sample (each stores seq_len + 1); several, comma-separated (1024,8192), "
                        "tokenise once and write OUT/seq1024, OUT/seq8192, ...")
    p.add_argument("--out", required=True,
                   help="output directory (manifest.json, train/, val/); with several --seq-len values, "
                        "the parent of one seq<L> directory per length")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    p.add_argument("--shard-mb", type=float, default=128, help="target shard size in MB")
    p.add_argument("--entry-kb", type=float, default=512, help="target tokens per tar entry in KiB")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="bad documents: stop with an error naming file and line, or skip and count them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--format", choices=("text", "task"), default="text",
                   help="text: documents; task: prompt/answer examples from a TSV/CSV (header row) or JSONL file")
    p.add_argument("--prompt-field", help="task: field/column holding the prompt")
    p.add_argument("--answer-field", help="task: field/column holding the answer")
    p.add_argument("--separator", default="\n",
                   help="task: text between prompt and answer (a special token name such as <|sep|> "
                        "is that one id; default newline)")
    p.add_argument("--loss-on", choices=("answer", "all"), default="answer",
                   help="task: which tokens are prediction targets (answer = answer + end-of-text)")
    p.add_argument("--pack", choices=("stream", "greedy", "none"), default=None,
                   help="stream: documents cut into samples (text default); greedy: whole examples, as "
                        "many as fit per sample; none: one example per sample, padded (task default)")
    p.add_argument("--split-field", help="task: field naming each example's split (train/val/test)")
    p.add_argument("--val-source", action="append", help="task: validation file(s); repeatable")
    p.add_argument("--test-source", action="append", help="task: test file(s); repeatable")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="seed of the per-split document order (Megatron-style shuffle; default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep documents in source order")
    p.add_argument("--part", type=_part, metavar="I/N",
                   help="prepare part I of N (from 0) of the text sources into OUT/part-0000I-of-0000N "
                        "(per length with several --seq-len); `merge OUT` joins the parts (data_pipeline/parts.py)")
    p.add_argument("--piece-mb", type=float, default=DEFAULT_PIECE_BYTES / 1e6,
                   help="size of the pieces the sources are cut into for --part, in MB; the validation count "
                        "restarts at each piece, so keep it equal for all parts "
                        f"(default {DEFAULT_PIECE_BYTES / 1e6:g})")

    m = commands.add_parser("merge", help="join the parts of prepare --part I/N into one dataset")
    m.add_argument("dir", help="the --out of the parts (holds part-*-of-N/, or seq<L>/part-*-of-N/)")
    m.add_argument("--verify", action="store_true", help="then check every shard's sha256 and every entry")

    t = commands.add_parser("train-tokenizer", help="train a byte-level BPE (rustbpe) as a .tiktoken file")
    t.add_argument("--source", action="append", required=True, help="as for prepare; repeatable")
    t.add_argument("--vocab-size", type=int, required=True, help="ids including <|endoftext|>")
    t.add_argument("--name", required=True, help="tokenizer name (first part of its id)")
    t.add_argument("--out", required=True, help="output .tiktoken path (a .json sidecar is written too)")
    t.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    t.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="as for prepare")

    from .synthetic import add_synth_parser
    add_synth_parser(commands)

    i = commands.add_parser("inspect", help="summarise (and check) a prepared directory")
    i.add_argument("dir", help="prepared data directory")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256 and every entry")
    i.add_argument("--show", type=int, default=0, metavar="N", help="decode the first N train samples")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "merge":
        return _merge(args)
    if args.command == "synth":
        from .synthetic import run_synth
        return run_synth(args, _summary)
    if args.command == "train-tokenizer":
        from .train_tokenizer import train_tokenizer
        tid = train_tokenizer(args.source, args.out, args.vocab_size, args.name, args.text_field, args.on_error)
        print(f"wrote {args.out} (+ .json), tokenizer id {tid}")
        return 0
    return _inspect(args)


def _seq_lens(text: str) -> int | list[int]:
    """--seq-len: one integer, or several comma-separated (one dataset directory each)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _part(text: str) -> tuple[int, int]:
    from .parts import parse_part
    try:
        return parse_part(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _prepare(args) -> int:
    from .parts import PART_DIR
    from .prepare import TaskSpec, length_dirs, prepare
    task = None
    if args.format == "task":
        if not args.prompt_field or not args.answer_field:
            raise SystemExit("--format task needs --prompt-field NAME and --answer-field NAME")
        task = TaskSpec(args.prompt_field, args.answer_field, args.separator, args.loss_on, args.split_field)
    elif args.prompt_field or args.answer_field or args.split_field or args.val_source or args.test_source:
        raise SystemExit("--prompt-field/--answer-field/--split-field/--val-source/--test-source "
                         "need --format task")
    manifest = prepare(args.source, args.tokenizer, args.seq_len, args.out, text_field=args.text_field,
                       val_fraction=args.val_fraction, num_workers=args.workers,
                       shard_bytes=int(args.shard_mb * 1e6), entry_bytes=int(args.entry_kb * 1024),
                       on_error=args.on_error, overwrite=args.overwrite, progress=not args.no_progress,
                       format=args.format, task=task, val_sources=args.val_source,
                       test_sources=args.test_source, pack=args.pack,
                       shuffle_seed=None if args.no_shuffle else args.shuffle_seed, part=args.part,
                       piece_bytes=int(args.piece_mb * 1e6))
    outs = {args.seq_len: Path(args.out)} if isinstance(args.seq_len, int) else length_dirs(args.out, args.seq_len)
    manifests = {args.seq_len: manifest} if isinstance(args.seq_len, int) else manifest
    for seq_len, out in outs.items():
        if args.part:
            out = out / PART_DIR.format(index=args.part[0], count=args.part[1])
        _summary(str(out), manifests[seq_len])
    return 0


def _merge(args) -> int:
    from .merge import merge
    try:
        merged = merge(args.dir)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"merge: {e}") from None
    problems = []
    for data_dir, manifest in merged.items():
        print(f"merged {manifest['parts']['count']} parts:")
        _summary(str(data_dir), manifest)
        if args.verify:
            found = _verify(str(data_dir), manifest)
            print(f"  verify: {'OK' if not found else f'{len(found)} problem(s)'}")
            for problem in found:
                print(f"    {problem}")
            problems += found
    return 1 if problems else 0


def _summary(data_dir: str, manifest: dict) -> None:
    print(f"{data_dir}: tokenizer {manifest['tokenizer_id']} (vocab {manifest['vocab_size']}), "
          f"seq_len {manifest['seq_len']}, {manifest['samples_per_entry']} samples per tar entry, "
          f"pack {manifest.get('pack', 'stream')}")
    if "task" in manifest:
        task = manifest["task"]
        labels = task["labels"]
        print(f"  task: {task['prompt_field']!r} + {task['separator']!r} + {task['answer_field']!r}, "
              f"loss on {task['loss_on']}, "
              + (f"{len(labels)} labels" if labels else "open answers (no small label set)"))
    docs = manifest["documents"]
    print(f"  documents {docs['total']}, text {docs['text_bytes'] / 1e6:.1f} MB, tokens {docs['tokens']:,}"
          f"; skipped {manifest['skipped'] or 'none'}")
    for name, split in manifest["splits"].items():
        print(f"  {name:5s} {split['samples']:>9,} samples {split['tokens']:>13,} tokens "
              f"{len(split['shards']):>5} shards {split['documents']:>8,} documents")


def _inspect(args) -> int:
    from .manifest import read_manifest
    manifest = read_manifest(args.dir)
    _summary(args.dir, manifest)
    if args.verify:
        problems = _verify(args.dir, manifest)
        print(f"  verify: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"    {problem}")
        if problems:
            return 1
    if args.show:
        from .loader import build_dataloader
        from .tokenizer import load_tokenizer
        tok = load_tokenizer(manifest["tokenizer"]["spec"])
        loader = build_dataloader(args.dir, "train", 1, 0, 1, 0, seed=0, infinite=False,
                                  expected_tokenizer_id=manifest["tokenizer_id"], lanes=1)
        for _, batch in zip(range(args.show), loader):
            print(f"--- sample {int(batch['sample_index'][0])}: "
                  f"{int(batch['doc_ids'][0].max()) + 1} document(s)")
            print(tok.decode(batch["tokens"][0][batch["doc_ids"][0] >= 0].tolist()))
    return 0


def _verify(data_dir: str, manifest: dict) -> list[str]:
    from .errors import DataError
    from .shards import ShardReader, shard_specs
    problems = []
    for split in manifest["splits"]:
        for spec in shard_specs(manifest, split, data_dir, None):
            reader = ShardReader(manifest["sample_len"], manifest["samples_per_entry"],
                                 manifest["vocab_size"], True, set(), {}, manifest.get("loss_mask", False))
            try:
                for entry in range(spec.entries):
                    reader.read(spec, entry)
            except DataError as e:
                problems.append(str(e))
            reader.close()
    return problems


if __name__ == "__main__":
    sys.exit(main())
