"""Checkpoint export: peak RSS against model size.

For each model size, writes a one-process megatron torch_dist checkpoint of a randomly initialised
SessaLM (no training), then runs `python -m checkpoints export --to hf --no-verify` in a fresh
process and reports that process's peak RSS, the model's fp32 size, and the largest output shard.
A converter that holds the whole model needs at least the model size on top of the ~0.5 GB of
Python + torch + transformers; the streaming exporter's peak grows with the shard size instead.

    python benchmarks/export.py                          # table
    python benchmarks/export.py --sizes 512x4 1024x16 --max-shard-size 200MB --json
    python benchmarks/export.py --deepspeed-zero3 --sizes 4096x2 --vocab 100277 --heads 32 --kv-heads 8 --data DIR

`--deepspeed-zero3` trains one step of the model with `engine: deepspeed`, ZeRO-3 on 2 ranks (gloo on a
CPU machine; DIR is a prepared dataset, e.g. `python -m data_pipeline prepare builtin pydocs4k 64 DIR`)
so the checkpoint is DeepSpeed's own, then reports the export's peak RSS next to the peak of
DeepSpeed's own whole-model consolidation (`checkpoints.deepspeed_format.consolidated_state_dict`,
what the exporter used before it streamed).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Peak RSS = VmHWM of the child's own address space: ru_maxrss would also count the pages of the
# (large) parent that fork copied before exec.
PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"

CHILD = r"""
import sys, time
sys.path.insert(0, {repo!r})
t0 = time.time()
from checkpoints.export import export
export({src!r}, "hf", {out!r}, verify=False, tokenizer_spec="pydocs4k", max_shard_size={shard!r}, log=lambda *_: None)
print({peak}, time.time() - t0)
"""

CONSOLIDATE = r"""
import sys, time
sys.path.insert(0, {repo!r})
t0 = time.time()
from checkpoints.deepspeed_format import consolidated_state_dict
state = consolidated_state_dict({src!r})
print({peak}, time.time() - t0)
"""

BASELINE = r"""
import sys
sys.path.insert(0, {repo!r})
import checkpoints.export, transformers, safetensors.torch, megatron.core
print({peak})
"""


def make_checkpoint(hidden: int, layers: int, directory: Path) -> int:
    """A torch_dist checkpoint of a fresh SessaLM; returns the number of parameters."""
    import torch
    from megatron.core import dist_checkpointing

    from data_pipeline.tokenizer import load_tokenizer
    from model import ModelConfig, SessaLM, init_weights
    from model import cpu_compat

    if not torch.cuda.is_available():
        cpu_compat.enable()  # megatron's save synchronises CUDA otherwise
    config = ModelConfig(vocab_size=4096, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                         feedback_impl="chunked")
    model = SessaLM(config)
    with torch.no_grad():
        init_weights(model, seed=0)
    state = {"model": model.sharded_state_dict(prefix="model."), "step": 0, "consumed_tokens": 0,
             "config": {"run_name": "bench", "model": config.to_dict(), "data": {"path": "-"}},
             "tokenizer_id": load_tokenizer("pydocs4k").id, "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1}}
    directory.mkdir(parents=True)
    dist_checkpointing.save(state, str(directory))
    return sum(p.numel() for p in model.parameters())


def make_deepspeed_checkpoint(hidden: int, layers: int, args, directory: Path) -> Path:
    """One training step with engine: deepspeed, ZeRO-3 at DP 2; returns the iter directory."""
    import yaml

    heads = args.heads or hidden // 64
    recipe = {"run_name": "bench", "runs_dir": str(directory),
              "model": {"vocab_size": args.vocab, "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
                        "num_kv_heads": args.kv_heads or heads, "feedback_impl": "chunked", "feedback_chunk_size": 64},
              "data": {"path": str(args.data), "num_workers": 0},
              "train": {"max_steps": 1, "global_batch_tokens": 256, "micro_batch_size": 2},
              "schedule": {"warmup_steps": 0}, "checkpoint": {"interval_steps": 0},
              "logging": {"interval": 1, "wandb": "disabled", "progress_bar": False},
              "eval": {"interval": 0, "sample_tokens": 0}}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", "--master-port=29533", "-m", "pretrain", "--config", str(path),
                           "--engine", "deepspeed", "--deepspeed.stage", "3"], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training the checkpoint failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return directory / "bench" / "checkpoints" / "iter_0000001"


def deepspeed_rows(args, baseline: float) -> list[dict]:
    import math

    from checkpoints.deepspeed_format import DeepSpeedCheckpoint

    rows = []
    for size in args.sizes:
        hidden, layers = map(int, size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            src = make_deepspeed_checkpoint(hidden, layers, args, Path(tmp))
            shapes = DeepSpeedCheckpoint(src).shapes
            row = {"size": size, "params_M": sum(math.prod(s) for s in shapes.values()) / 1e6,
                   "largest_tensor_MB": max(math.prod(s) for s in shapes.values()) * 4 / 1e6,
                   "checkpoint_MB": sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / 1e6}
            for name, script in (("export", CHILD), ("consolidate", CONSOLIDATE)):
                start = time.time()
                done = subprocess.run([sys.executable, "-c", script.format(
                    repo=str(REPO), src=str(src), out=str(Path(tmp) / "hf"), shard=args.max_shard_size, peak=PEAK)],
                    check=True, capture_output=True, text=True)
                row[f"{name}_peak_rss_MB"] = float(done.stdout.split()[-2])
                row[f"{name}_s"] = time.time() - start
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["256x4", "1024x8", "1024x24", "2048x12"],
                        help="HIDDENxLAYERS per model")
    parser.add_argument("--max-shard-size", default="100MB")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--deepspeed-zero3", action="store_true", help="a ZeRO-3 DP=2 checkpoint (see above)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocab_size (--deepspeed-zero3)")
    parser.add_argument("--heads", type=int, default=0, help="num_heads (--deepspeed-zero3; 0: hidden / 64)")
    parser.add_argument("--kv-heads", type=int, default=0, help="num_kv_heads (--deepspeed-zero3; 0: heads)")
    parser.add_argument("--data", type=Path, help="prepared dataset (--deepspeed-zero3)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    baseline = float(subprocess.run([sys.executable, "-c", BASELINE.format(repo=str(REPO), peak=PEAK)], check=True,
                                    capture_output=True, text=True).stdout.split()[-1])
    if args.deepspeed_zero3:
        if args.data is None:
            parser.error("--deepspeed-zero3 needs --data (a prepared dataset)")
        rows = deepspeed_rows(args, baseline)
        if args.json:
            print(json.dumps({"baseline_rss_MB": baseline, "rows": rows}, indent=2))
            return
        print(f"process baseline: {baseline:.0f} MB; max shard size {args.max_shard_size}; ZeRO-3, DP 2, vocab "
              f"{args.vocab}")
        print("| model (D x L) | params | largest tensor MB | checkpoint on disk MB | export peak RSS MB "
              "| whole-model consolidation peak RSS MB | export s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']} | {r['params_M']:.0f}M | {r['largest_tensor_MB']:.0f} | {r['checkpoint_MB']:.0f} "
                  f"| {r['export_peak_rss_MB']:.0f} | {r['consolidate_peak_rss_MB']:.0f} | {r['export_s']:.0f} |")
        return
    rows = []
    for size in args.sizes:
        hidden, layers = map(int, size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "ckpt" / "iter_0000000"
            params = make_checkpoint(hidden, layers, src)
            out = Path(tmp) / "hf"
            start = time.time()
            done = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), src=str(src), out=str(out),
                                                                      shard=args.max_shard_size, peak=PEAK)],
                                  check=True, capture_output=True, text=True)
            peak, seconds = map(float, done.stdout.split()[-2:])
            largest = max(p.stat().st_size for p in out.glob("*.safetensors"))
            rows.append({"size": size, "params_M": params / 1e6, "model_MB": params * 4 / 1e6, "peak_rss_MB": peak,
                         "above_baseline_MB": peak - baseline, "largest_shard_MB": largest / 1e6,
                         "shards": len(list(out.glob("*.safetensors"))), "seconds": time.time() - start})
    if args.json:
        print(json.dumps({"baseline_rss_MB": baseline, "rows": rows}, indent=2))
        return
    print(f"process baseline (python + torch + transformers + megatron imported): {baseline:.0f} MB; "
          f"max shard size {args.max_shard_size}")
    print("| model (D x L) | params | fp32 size MB | shards | largest shard MB | peak RSS MB | above baseline MB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['params_M']:.1f}M | {r['model_MB']:.0f} | {r['shards']} | {r['largest_shard_MB']:.0f} "
              f"| {r['peak_rss_MB']:.0f} | {r['above_baseline_MB']:.0f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
