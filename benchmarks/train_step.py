"""Training throughput of a recipe: tokens/s, model TFLOP/s, MFU and peak memory per device.

    python benchmarks/train_step.py --config configs/tiny.yaml --data data/builtin
    python benchmarks/train_step.py --config configs/1.3b.yaml --data data/cl100k-8k --steps 10 \
        --peak-tflops 989        # on a GPU; prepare 8k data with python -m data_pipeline prepare first
    python benchmarks/train_step.py --data /tmp/pydocs-4k --arch sessa,transformer \
        --train.micro_batch_size 1 --train.global_batch_tokens 4096   # both arms side by side
Runs the real Trainer (megatron DDP, optimizer, schedule) for --warmup + --steps steps; only the
last --steps are timed. Prints a table, or one JSON object with --json. `--arch a,b` runs each
architecture (model.arch) in its own process and prints one column per architecture. Peak memory:
torch's peak allocation on CUDA, the process's peak RSS (VmHWM, setup included) on the CPU.
"""
import argparse
import json
import resource
import subprocess
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
    parser.add_argument("--arch", default=None,
                        help="model.arch to measure (sessa | transformer); comma-separated: one process each")
    args, overrides = parser.parse_known_args()
    if args.arch and "," in args.arch:
        compare(args.arch.split(","), [a for a in sys.argv[1:] if not a.startswith("--arch")
                                       and a != args.arch and a != "--json"], args.json)
        return
    if args.arch:
        overrides += ["--model.arch", args.arch]

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
            "arch": config.model.arch, "peak_memory_gb": round(peak_memory_gb(trainer.device), 3),
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


def peak_memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def compare(archs: list[str], argv: list[str], as_json: bool) -> None:
    """Each architecture in a fresh process (own peak memory); one column each."""
    rows = []
    for arch in archs:
        done = subprocess.run([sys.executable, __file__, *argv, "--arch", arch, "--json"], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"--arch {arch} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if as_json:
        print(json.dumps(rows))
        return
    print(f"{'':>24}  " + "  ".join(f"{row['arch']:>14}" for row in rows))
    for key in rows[0]:
        if key != "arch":
            print(f"{key:>24}: " + "  ".join(f"{str(row[key]):>14}" for row in rows))


if __name__ == "__main__":
    main()
