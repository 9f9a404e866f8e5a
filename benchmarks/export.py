"""Checkpoint export: peak RSS against model size.

For each model size, writes a one-process megatron torch_dist checkpoint of a randomly initialised
SessaLM (no training), then runs `python -m checkpoints export --to hf --no-verify` in a fresh
process and reports that process's peak RSS, the model's fp32 size, and the largest output shard.
A converter that holds the whole model needs at least the model size on top of the ~0.5 GB of
Python + torch + transformers; the streaming exporter's peak grows with the shard size instead.

    python benchmarks/export.py                          # table
    python benchmarks/export.py --sizes 512x4 1024x16 --max-shard-size 200MB --json
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
    from pretrain import cpu_compat

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["256x4", "1024x8", "1024x24", "2048x12"],
                        help="HIDDENxLAYERS per model")
    parser.add_argument("--max-shard-size", default="100MB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    baseline = float(subprocess.run([sys.executable, "-c", BASELINE.format(repo=str(REPO), peak=PEAK)], check=True,
                                    capture_output=True, text=True).stdout.split()[-1])
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
