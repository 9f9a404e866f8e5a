"""Training throughput of a recipe: tokens/s, model TFLOP/s, MFU and peak memory per device.

    python benchmarks/train_step.py --config configs/tiny.yaml --data data/builtin
    python benchmarks/train_step.py --config configs/1.3b.yaml --data data/cl100k-8k --steps 10 \
        --peak-tflops 989        # on a GPU; prepare 8k data with python -m data_pipeline prepare first
    python benchmarks/train_step.py --data /tmp/pydocs-4k --arch sessa,transformer \
        --train.micro_batch_size 1 --train.global_batch_tokens 4096   # both arms side by side
    python benchmarks/train_step.py --data /tmp/pydocs-4k --arch sessa,transformer \
        --recompute none,selective,full --tensor-parallel 1,2 ...     # every combination
Runs the real Trainer (megatron DDP, optimizer, schedule) for --warmup + --steps steps; only the
last --steps are timed. Prints a table, or one JSON object with --json. Comma-separated `--arch`
(model.arch), `--recompute` (train.recompute) and `--tensor-parallel` (parallel.tensor, that many
processes under torchrun) run every combination, each in its own process(es), one column each.
Peak memory: torch's peak allocation on CUDA, the process's peak RSS (VmHWM, setup included) on the
CPU; under TP, rank 0's.
"""
import argparse
import itertools
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
    parser.add_argument("--arch", default=None, help="model.arch (sessa | transformer), comma-separated")
    parser.add_argument("--recompute", default=None, help="train.recompute (none | selective | full), comma-separated")
    parser.add_argument("--tensor-parallel", default=None, help="parallel.tensor sizes, comma-separated")
    args, overrides = parser.parse_known_args()
    grid = {"arch": args.arch, "recompute": args.recompute, "tensor_parallel": args.tensor_parallel}
    if any(value and "," in value for value in grid.values()):
        compare({k: v.split(",") for k, v in grid.items() if v}, overrides, args)
        return
    for field, option in (("arch", "--model.arch"), ("recompute", "--train.recompute"),
                          ("tensor_parallel", "--parallel.tensor")):
        if grid[field]:
            overrides += [option, grid[field]]

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
            "arch": config.model.arch, "recompute": config.train.recompute,
            "tensor_parallel": config.parallel.tensor, "peak_memory_gb": round(peak_memory_gb(trainer.device), 3),
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


def compare(grid: dict[str, list[str]], overrides: list[str], args) -> None:
    """Every combination of the grid's values in fresh processes (own peak memory); one column each."""
    common = ["--config", args.config, "--data", args.data, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--peak-tflops", str(args.peak_tflops), *overrides, "--json"]
    rows = []
    for values in itertools.product(*grid.values()):
        cell = dict(zip(grid, values))
        nproc = int(cell.get("tensor_parallel", 1))
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                    if nproc > 1 else [sys.executable])
        flags = [arg for key, value in cell.items() for arg in (f"--{key.replace('_', '-')}", value)]
        done = subprocess.run([*launcher, __file__, *common, *flags], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(flags)} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows))
        return
    names = [" ".join(str(row[key]) for key in grid) for row in rows]
    print(f"{'':>24}  " + "  ".join(f"{name:>22}" for name in names))
    for key in rows[0]:
        if key not in grid:
            print(f"{key:>24}: " + "  ".join(f"{str(row[key]):>22}" for row in rows))


if __name__ == "__main__":
    main()
