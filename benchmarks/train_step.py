"""Training throughput of a recipe: tokens/s, model TFLOP/s, MFU and peak memory per device.

    python benchmarks/train_step.py --config configs/tiny.yaml --data data/builtin
    python benchmarks/train_step.py --config configs/1.3b.yaml --data data/cl100k-8k --steps 10 \
        --peak-tflops 989        # on a GPU; prepare 8k data with python -m data_pipeline prepare first
Runs the real Trainer (megatron DDP, optimizer, schedule) for --warmup + --steps steps; only the
last --steps are timed. Prints a table, or one JSON object with --json.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--data", default="data/builtin")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--json", action="store_true")
    args, overrides = parser.parse_known_args()

    import torch

    from pretrain.config import load_config
    from model.flops import count_params, flops_per_token
    from pretrain.loop import Trainer, _TimedIterator

    total = args.warmup + args.steps
    config = load_config(args.config, [
        "--data.path", args.data, "--runs_dir", tempfile.mkdtemp(), "--train.max_steps", str(total + 1),
        "--schedule.warmup_steps", "1", "--checkpoint.resume", "false", "--logging.wandb", "disabled",
        "--logging.progress_bar", "false", *overrides,
    ])
    trainer = Trainer(config)
    try:
        timed = _TimedIterator(trainer.train_loader)
        for _ in range(args.warmup):
            trainer.engine.train_step(timed)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, wait_before = time.perf_counter(), timed.wait_seconds
        for _ in range(args.steps):
            loss = trainer.engine.train_step(timed).loss
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens_per_s = args.steps * config.train.global_batch_tokens / elapsed
        tflops = flops_per_token(config.model, trainer.seq_len) * tokens_per_s / trainer.env.world_size / 1e12
        row = {
            "config": args.config, "device": str(trainer.device), "world_size": trainer.env.world_size,
            "params_m": round(count_params(config.model) / 1e6, 2), "seq_len": trainer.seq_len,
            "global_batch_tokens": config.train.global_batch_tokens, "step_s": round(elapsed / args.steps, 3),
            "tokens_per_s": round(tokens_per_s, 1), "model_tflops_per_device": round(tflops, 4),
            "mfu": round(tflops / args.peak_tflops, 4) if args.peak_tflops else None,
            "peak_memory_gb": round(trainer._memory_gb(), 3),
            "data_wait_share": round((timed.wait_seconds - wait_before) / elapsed, 4), "final_loss": round(loss, 4),
        }
    finally:
        trainer.close()
    if trainer.env.rank != 0:
        return
    if args.json:
        print(json.dumps(row))
    else:
        for key, value in row.items():
            print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
