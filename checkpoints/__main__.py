"""Checkpoint conversion.

    python -m checkpoints export runs/NAME [--step N] --to hf|safetensors|reference --out DIR \\
        [--dtype bf16|fp32] [--max-shard-size 5GB] [--no-verify] [--dry-run] [--tokenizer SPEC]
    python -m checkpoints import HF_DIR --config configs/X.yaml --out runs/NAME [--model.FIELD value ...]
    python -m checkpoints.deepspeed_format to-universal|consolidate ...   (DeepSpeed checkpoint tools)

Errors exit 1 with a message naming the tensor or file and what to do.
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="training checkpoint -> hf | safetensors | reference")
    ex.add_argument("source", help="run directory, its checkpoints/ folder, or one iter_NNNNNNN directory")
    ex.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    ex.add_argument("--to", required=True, choices=("hf", "safetensors", "reference"), help="output format")
    ex.add_argument("--out", required=True, help="output directory (new or empty)")
    ex.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="dtype of the written weights")
    ex.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    ex.add_argument("--no-verify", action="store_true", help="skip the native-vs-export logit check (hf)")
    ex.add_argument("--dry-run", action="store_true", help="print the name mapping, write nothing")
    ex.add_argument("--tokenizer", help="tokenizer spec when the training data is not available")
    im = sub.add_parser("import", help="HF export -> weights-only torch_dist checkpoint a run starts from")
    im.add_argument("source", help="directory written by `export --to hf`")
    im.add_argument("--config", required=True, help="recipe YAML for continued pretraining")
    im.add_argument("--out", required=True, help="run directory to create, e.g. runs/NAME")
    args, overrides = parser.parse_known_args(argv)

    from .errors import CheckpointError

    try:
        if args.command == "export":
            if overrides:
                parser.error(f"unknown arguments {overrides}")
            from .export import export

            export(args.source, args.to, args.out, step=args.step, dtype=args.dtype,
                   max_shard_size=args.max_shard_size, verify=not args.no_verify, dry_run=args.dry_run,
                   tokenizer_spec=args.tokenizer)
        else:
            from .importer import import_hf

            import_hf(args.source, args.config, args.out, overrides)
    except (CheckpointError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
