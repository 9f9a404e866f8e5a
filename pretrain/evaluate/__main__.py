"""Evaluate a trained model.

    python -m pretrain.evaluate TARGET [--step N] --tasks NAME[,NAME...] [--out FILE.json]
    python -m pretrain.evaluate runs/NAME --tasks test.tsv --prompt-field Text --answer-field Answer
    python -m pretrain.evaluate table --runs runs/paper-* [--tasks two_style,diffuse_mqar] [--out T.md]
    python -m pretrain.evaluate lm-eval --model_args pretrained=DIR --tasks ... [any lm_eval flag]
    python -m pretrain.evaluate install-lm-eval   # makes `lm_eval --model sessa` work in this env

TARGET: a run directory (checkpoints/latest, or --step N), a checkpoint directory (torch_dist at
any layout, or DeepSpeed) or an HF export. A task is a built-in name or a task file (.tsv/.csv with
a header row, .jsonl): classification over its answers when they form a small closed set (or
--choices FILE), else greedy generation scored by exact match; with --text-field, documents scored
by loss per position bucket. The tokenizer, separator and field names default to the training
data's. Errors exit 1 with a message naming the file, line or field.
"""
import argparse
import json
import sys


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="run directory, checkpoint directory or HF export")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--tasks", required=True, help="comma-separated built-in names and/or task files")
    p.add_argument("--prompt-field", help="task file prompt column/key (default: the training data's, or 'prompt')")
    p.add_argument("--answer-field", help="task file answer column/key (default: the training data's, or 'answer')")
    p.add_argument("--text-field", help="score a JSONL of documents (this key) by loss per position instead")
    p.add_argument("--choices", help="file of candidate labels, one per line (forces classification)")
    p.add_argument("--separator", help="between prompt and answer (default: the training data's, or a newline)")
    p.add_argument("--split", choices=("train", "val", "test"), help="only rows of this split (with --split-field)")
    p.add_argument("--split-field", help="column/key holding each row's split")
    p.add_argument("--bucket-field", action="append", help="extra field to bucket metrics by (repeatable; "
                   "default: lag, length, position when present)")
    p.add_argument("--limit", type=int, help="first N examples of each task only")
    p.add_argument("--max-length", type=int, help="drop context tokens from the left beyond this (default: none)")
    p.add_argument("--tokenizer", help="tokenizer spec when the training data is gone (its id is still checked)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--wandb", choices=("disabled", "offline", "online"), default="disabled",
                   help="log eval/<task>/<metric> to wandb")
    p.add_argument("--wandb-project", default="sessa-pretrain")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def evaluate_main(argv) -> int:
    args = _eval_parser().parse_args(argv)
    from .evaluator import evaluate_target, load_tasks
    from .report import log_wandb, markdown, write_json
    from .targets import load_target

    target = load_target(args.target, step=args.step, tokenizer_spec=args.tokenizer, device=args.device)
    trained = target.info.get("task_format") or {}
    tasks = load_tasks(args.tasks, prompt_field=args.prompt_field or trained.get("prompt_field") or "prompt",
                       answer_field=args.answer_field or trained.get("answer_field") or "answer",
                       text_field=args.text_field, choices=args.choices,
                       separator=args.separator if args.separator is not None else trained.get("separator"),
                       split=args.split, split_field=args.split_field, bucket_fields=args.bucket_field,
                       limit=args.limit, trained_sources=target.info.get("sources") or ())
    print(f"target {target.info['path']} ({target.info['format']}, {target.config.arch}, step "
          f"{target.info['step']}); tokenizer {target.tokenizer.id}", file=sys.stderr)
    results = evaluate_target(target, tasks, max_length=args.max_length, progress=not args.no_progress)
    print(markdown(results))
    if args.out:
        write_json(results, args.out, target.info)
    if args.wandb != "disabled":
        log_wandb(results, target.info, mode=args.wandb, project=args.wandb_project)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "install-lm-eval":  # before the heavy imports: setup.sh runs it every time
        from .lm_eval_hook import install_plugin

        print(f"wrote {install_plugin()}: `lm_eval --model sessa --model_args pretrained=DIR` now works here")
        return 0
    from checkpoints.readers import CheckpointError
    from data_pipeline.errors import DataError

    try:
        if argv and argv[0] == "table":
            from .table import main as table_main

            return table_main(argv[1:])
        if argv and argv[0] == "lm-eval":
            from .harness import run_lm_eval

            return run_lm_eval(argv[1:])
        return evaluate_main(argv)
    except (CheckpointError, DataError, ValueError, FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
