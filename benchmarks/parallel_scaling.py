"""Tensor/pipeline parallel scaling on gloo: bytes communicated per layer and step time per layout.

    python benchmarks/parallel_scaling.py                 # CPU: TP in {1, 2}, PP in {1, 2}
    python benchmarks/parallel_scaling.py --tp 1 2 4 8    # on a GPU node (NCCL)

Part 1 runs one Sessa layer and one megatron-core Transformer layer (local spec: attention + MLP,
same width and heads) at TP=2, forward + backward, and records every collective the ranks issue
(torch.distributed calls, counted by wrapping them): bytes are those of the full tensor each
collective produces or reduces, per layer and batch. It repeats at 2T: the ratio must be 2.0,
i.e. no collective carries a T x T tensor.
Part 2 trains the tiny recipe with the real trainer for each (TP, PP) layout (DP = 1) and reports
the median step time.
"""
import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLLECTIVES = {  # name -> kind; megatron binds its gather/scatter functions at import time
    "all_reduce": "all-reduce", "all_gather_into_tensor": "all-gather", "_all_gather_base": "all-gather",
    "all_gather": "all-gather", "reduce_scatter_tensor": "reduce-scatter", "_reduce_scatter_base": "reduce-scatter",
    "dist_all_gather_func": "all-gather", "dist_reduce_scatter_func": "reduce-scatter", "broadcast": "broadcast",
}


@contextlib.contextmanager
def count_collectives():
    """Counter of bytes per collective kind (and "calls") issued inside the block: torch.distributed's
    functions and megatron's module-level aliases of them are wrapped, then restored."""
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    counter = collections.Counter()

    def tensor_bytes(value):
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        return sum(t.numel() * t.element_size() for t in value)  # a list of tensors

    originals = []
    for module in (dist, mappings):
        for name, kind in COLLECTIVES.items():
            if not hasattr(module, name):
                continue
            original = getattr(module, name)

            def wrapped(tensor, *args, _original=original, _kind=kind, **kwargs):
                counter[_kind] += tensor_bytes(tensor)  # the output of a gather, the input of a reduce
                counter["calls"] += 1
                return _original(tensor, *args, **kwargs)

            originals.append((module, name, original))
            setattr(module, name, wrapped)
    try:
        yield counter
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def comm_worker(seq_len: int, hidden: int, heads: int, out: str) -> None:
    """Under torchrun: bytes per layer (forward + backward) for a Sessa and a Transformer layer."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from model import ModelConfig, SessaLayer, megatron_config
    from model import cpu_compat

    dist.init_process_group("gloo")
    cpu_compat.enable()
    parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    model_parallel_cuda_manual_seed(0)  # megatron's attention forks the model-parallel RNG (dropout)
    config = ModelConfig(vocab_size=256, hidden_size=hidden, num_layers=1, num_heads=heads, num_kv_heads=heads,
                         feedback_impl="chunked", feedback_chunk_size=64)
    mconfig = megatron_config(config, ffn_hidden_size=4 * hidden, add_bias_linear=False, gated_linear_unit=True)
    layers = {
        "sessa": lambda: SessaLayer(config, mconfig),
        "transformer (SwiGLU MLP)": lambda: TransformerLayer(mconfig, get_gpt_layer_local_spec().submodules),
    }
    results = {}
    for name, build in layers.items():
        layer = build()
        with torch.no_grad():
            for param in layer.parameters():
                param.normal_(0.0, 0.02)
        x = torch.randn(seq_len, 1, hidden, requires_grad=True)
        with count_collectives() as counter:
            y, _ = layer(x) if name == "sessa" else layer(x, attention_mask=None)
            y.sum().backward()
        results[name] = dict(counter)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def run_comm(tp: int, seq_len: int, hidden: int, heads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comm.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
                        __file__, "--worker", str(seq_len), str(hidden), str(heads), str(out)],
                       check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        return json.loads(out.read_text())


def run_training(tp: int, pp: int, data: Path, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        launcher = ([sys.executable, "-m", "pretrain"] if tp * pp == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * pp}",
                     "-m", "pretrain"])
        subprocess.run([*launcher, "--config", "configs/tiny.yaml", "--data.path", str(data), "--runs_dir", tmp,
                        "--train.max_steps", str(steps), "--schedule.warmup_steps", "1", "--data.num_workers", "1",
                        "--parallel.tensor", str(tp), "--parallel.pipeline", str(pp), "--logging.wandb", "disabled",
                        "--logging.progress_bar", "false", "--logging.interval", "1", "--checkpoint.interval_steps", "0",
                        "--checkpoint.save_on_exit", "false", "--eval.sample_tokens", "0", "--eval.batches", "1"],
                       check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        records = [json.loads(line) for line in (Path(tmp) / "tiny" / "metrics.jsonl").read_text().splitlines()]
        return statistics.median(r["perf/step_s"] for r in records if "perf/step_s" in r and r["step"] > 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        seq_len, hidden, heads, out = args.worker
        comm_worker(int(seq_len), int(hidden), int(heads), out)
        return

    print(f"## Bytes communicated per layer, forward + backward, TP=2, batch 1, D={args.hidden}")
    print("| layer | T | all-reduce MB | all-gather MB | reduce-scatter MB | collectives | MB / (T x D x 4 B) |")
    print("|---|---|---|---|---|---|---|")
    totals = {}
    for seq_len in (args.seq_len, 2 * args.seq_len):
        for name, counts in run_comm(2, seq_len, args.hidden, args.heads).items():
            reduce, gather, scatter = (counts.get(k, 0) for k in ("all-reduce", "all-gather", "reduce-scatter"))
            calls = counts.get("calls", 0)
            total = reduce + gather + scatter
            totals[name, seq_len] = total
            print(f"| {name} | {seq_len} | {reduce / 1e6:.2f} | {gather / 1e6:.2f} | {scatter / 1e6:.2f} | {calls} "
                  f"| {total / (seq_len * args.hidden * 4):.1f} |")
    for name in {n for n, _ in totals}:
        print(f"{name}: bytes at 2T / bytes at T = {totals[name, 2 * args.seq_len] / totals[name, args.seq_len]:.3f}")

    from data_pipeline.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pydocs256"
        prepare("builtin", "pydocs4k", 256, data, num_workers=1, progress=False)
        print("\n## configs/tiny.yaml training step (DP = 1, gloo, CPU), median over steps 3..N")
        print("| TP | PP | processes | step time s |")
        print("|---|---|---|---|")
        for tp in args.tp:
            for pp in args.pp:
                print(f"| {tp} | {pp} | {tp * pp} | {run_training(tp, pp, data, args.steps):.3f} |", flush=True)


if __name__ == "__main__":
    main()
