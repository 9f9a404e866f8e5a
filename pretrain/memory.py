"""Per-device memory estimate for a recipe: weights, gradients, optimizer states, activations.

    python -m pretrain.memory configs/1.3b.yaml --seq-len 8192
"""
import argparse

from model.flops import count_params

from .config import RunConfig, load_config

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def estimate_memory_gb(config: RunConfig, seq_len: int, dp_size: int) -> dict:
    """A planning estimate (not a measurement) for one device of the configured layout.

    Weights in the model dtype, fp32 gradients (megatron reduces in fp32), and per parameter 12
    bytes of fp32 master weight + Adam moments, sharded over data-parallel ranks by the
    distributed optimizer. Activations kept for backward per token and layer: about 18 D values in
    the compute dtype (LayerNorm, W_in halves, q/k/v, attention output, feedback q_b/k_b, gated
    product) plus the solve's fp32 outputs; the chunked solve adds one [C, T] fp32 tile.
    """
    model, parallel = config.model, config.parallel
    model_parallel = parallel.tensor * parallel.pipeline
    params = count_params(model) / model_parallel
    compute_bytes = 2 if model.dtype != "float32" or config.logging.peak_tflops else BYTES[model.dtype]
    weights = params * BYTES[model.dtype]
    grads = params * 4
    optimizer = params * 12 / (dp_size if config.optim.distributed else 1)
    tokens = config.train.micro_batch_size * seq_len
    layers_here = model.num_layers / parallel.pipeline
    per_token_layer = 18 * model.hidden_size * compute_bytes / parallel.tensor + 4 * model.hidden_size / parallel.tensor
    activations = tokens * layers_here * per_token_layer + 4 * model.feedback_chunk_size * seq_len
    gb = {name: value / 2**30 for name, value in
          dict(weights=weights, grads=grads, optimizer=optimizer, activations=activations).items()}
    gb["total"] = sum(gb.values())
    return gb


def main():
    parser = argparse.ArgumentParser(description="Estimate per-device memory of a recipe")
    parser.add_argument("config")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    args = parser.parse_args()
    config = load_config(args.config)
    estimate = estimate_memory_gb(config, args.seq_len, args.dp)
    print(f"{config.run_name}: {count_params(config.model) / 1e9:.3f}B parameters, TP {config.parallel.tensor} "
          f"PP {config.parallel.pipeline} DP {args.dp}, seq_len {args.seq_len}, "
          f"micro-batch {config.train.micro_batch_size}")
    for name, value in estimate.items():
        print(f"  {name:>12}: {value:8.2f} GB")


if __name__ == "__main__":
    main()
