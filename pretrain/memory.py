"""Per-device memory estimate for a recipe: weights, gradients, optimizer states, activations.

    python -m pretrain.memory configs/1.3b.yaml --seq-len 8192
    python -m pretrain.memory configs/7b-128k.yaml --seq-len 131072 --dp 4   # with each recompute mode
    python -m pretrain.memory configs/campaign/1.3b-long.yaml --seq-len 8192,32768,131072 --world 64  # each stage
"""
import argparse
import dataclasses

from model.config import ModelConfig
from model.flops import count_params

from .config import ConfigError, RunConfig, load_config
from .stages import resolve_stages

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def layer_activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, tensor_parallel: int = 1,
                           sequence_parallel: bool = False, compute_bytes: int = 2) -> dict[str, float]:
    """Bytes one Sessa layer keeps for backward on one tensor-parallel rank ("saved"), and the chunked
    solve's largest temporary ("transient"), for a micro-batch of `micro_batch` x `seq_len` tokens.

    Per token, counted from what autograd saves (tests/scaling/test_memory.py measures it at TP 1
    and 2): full width D on every rank, whatever the tensor-parallel size: the norm input (a 1/tp
    sequence shard under sequence parallelism), the norm output gathered for W_in, a (gathered for
    the mixer), GELU(a), and the feedback q_b and k_b (the solve mixes all D columns); 1/tp of D:
    g, s * g, W_o's input (a single head has no W_o), attention's q, k, v and output (k, v with the
    kv-heads' width), and the solve's output in fp32 (the same tensor as W_o's input in fp32);
    small: attention's and the solve's log-sum-exp, gamma. Per layer: the RoPE tables (megatron's
    rotation keeps a cos and a sin of T x d in fp32 for q and for k: 4 x T x d fp32). All in the compute dtype unless said.
    """
    D, tp, c = model.hidden_size, tensor_parallel, compute_bytes
    heads, kv_heads, d = model.num_heads / tp, model.num_kv_heads / tp, model.head_size
    feedback = model.arch == "sessa" and model.feedback
    full = (3 + (2 if feedback else 0)) * D * c + D * c / (tp if sequence_parallel else 1)
    sharded = ((3 + (model.num_heads > 1)) * D / tp + (2 * heads + 2 * kv_heads) * d) * c
    if feedback and c != 4:
        sharded += 4 * D / tp  # the solve's fp32 output
    small = 4 * heads + 3 * c + (4 if feedback else 0)
    tokens = micro_batch * seq_len
    saved = tokens * (full + sharded + small) + 4 * seq_len * d * 4
    transient = 4 * model.feedback_chunk_size * seq_len * micro_batch if feedback else 0.0
    # What the mixer (attention + feedback solve: train.recompute selective) keeps beyond its input:
    # q_b, k_b, attention's q, k, v, output and log-sum-exp, the solve's fp32 output and gamma.
    mixer = tokens * ((2 * D * c if feedback else 0) + (2 * heads + 2 * kv_heads) * d * c + 4 * heads
                      + (4 * D / tp + 4 if feedback else 0))
    block_input = tokens * D * c / (tp if sequence_parallel else 1)  # all that train.recompute full keeps
    return {"saved": saved, "transient": transient, "mixer": mixer, "input": block_input}


def block_activation_bytes(model: ModelConfig, kind: str, seq_len: int, micro_batch: int, tensor_parallel: int = 1,
                           sequence_parallel: bool = False, compute_bytes: int = 2) -> dict[str, float]:
    """`layer_activation_bytes` for one block of a model.layer_pattern (model/blocks.py). Attention
    (`*`): the norm input (1/tp under sequence parallelism), the normed input (full width), q, k, v
    and the attention output (1/tp of the heads), attention's log-sum-exp, the RoPE tables. MLP
    (`-`): the norm input and normed input, gate, up, SiLU(gate) and their product (1/tp of the
    width each). Mamba-2 (`M`): the norm input and normed input, the z/x/B/C/dt projections, the convs'
    inputs and outputs and SiLU outputs (B and C gathered), the scan's fp32 inputs, within-chunk
    scores (C.B and two [Q, Q] per local head) and output, and the gate and per-head norm (1/tp of the
    heads each); selective recompute leaves it alone (mixer 0). None has a transient beyond its saved
    tensors."""
    if kind == "S":
        return layer_activation_bytes(model, seq_len, micro_batch, tensor_parallel, sequence_parallel, compute_bytes)
    D, tp, c, tokens = model.hidden_size, tensor_parallel, compute_bytes, micro_batch * seq_len
    full = D * c + D * c / (tp if sequence_parallel else 1)
    block_input = tokens * D * c / (tp if sequence_parallel else 1)
    if kind == "*":
        d, heads, kv_heads = model.head_size, model.num_heads / tp, model.num_kv_heads / tp
        attention = (2 * heads + 2 * kv_heads) * d * c + 4 * heads
        return {"saved": tokens * (full + attention) + 4 * seq_len * d * 4, "transient": 0.0,
                "mixer": tokens * attention, "input": block_input}
    if kind == "M":
        sp = tp if sequence_parallel else 1
        E, H, N, f = model.mamba_inner_size / tp, model.mamba_heads / tp, model.mamba_state_size, max(c, 4)
        P, K, Q = model.mamba_head_size, model.mamba_conv_kernel, min(model.mamba_chunk_size, seq_len)
        per_token = (
            (D * (c + f) + 4) / sp + D * c  # norm input, its fp32 intermediate and inverse rms; normed (gathered)
            + (E + 2 * N / tp) * c * (2 + (K - 1) / seq_len)  # conv inputs (with the K - 1 before) and outputs
            + f * (E + 2 * N + 6 * H)  # the scan's inputs: x (fp32), B and C (gathered); dt, decays
            + f * Q * (1 + 3 * H)  # within-chunk C.B and the per-head decays and scores
            + f * (2 * E + H)  # the state update's scaled inputs
            + f * H * N * (1 + 2 * P / Q) * (1 - Q / seq_len)  # the carried state, read and decayed (chunks 2..)
            + 3 * E * c + f * (2 * E + H) + E * c  # gate (y, z, SiLU(z)), per-head norm (fp32), out_proj input
        )
        return {"saved": tokens * per_token, "transient": 0.0, "mixer": 0.0, "input": block_input}
    return {"saved": tokens * (full + 4 * model.ffn_hidden_size / tp * c), "transient": 0.0, "mixer": 0.0,
            "input": block_input}


def recomputed_activation_bytes(blocks: list[dict], recompute: str, pipeline: int = 1) -> float:
    """Activations one pipeline stage keeps with train.recompute, from `block_activation_bytes` of its
    blocks: "none" every block's saved tensors; "selective" all but the mixers' (attention + feedback
    solve), plus one mixer recomputed at a time in the backward; "full" only each block's input, plus
    one block recomputed at a time. Each adds the largest solve temporary."""
    per_stage = 1 / pipeline  # the stage holds num_layers / pipeline blocks: the pattern's average one
    transient = max(b["transient"] for b in blocks)
    if recompute == "full":
        return sum(b["input"] for b in blocks) * per_stage + max(b["saved"] for b in blocks) + transient
    if recompute == "selective":
        kept = sum(b["saved"] - b["mixer"] for b in blocks) * per_stage
        return kept + max(b["mixer"] for b in blocks) + transient
    return sum(b["saved"] for b in blocks) * per_stage + transient


def estimate_memory_gb(config: RunConfig, seq_len: int, dp_size: int) -> dict:
    """A planning estimate (not a measurement) for one device of the configured layout.

    Weights in the model dtype, fp32 gradients (megatron reduces in fp32), and per parameter 12
    bytes of fp32 master weight + Adam moments, sharded over data-parallel ranks by the
    distributed optimizer (over data- and context-parallel ranks). Activations: every block of
    this pipeline stage keeps what `block_activation_bytes` counts (`layer_activation_bytes` for
    Sessa layers) for its seq_len / parallel.context positions, and one layer's solve adds its
    temporary; under context parallelism each Sessa and attention block also keeps the all-gathered
    keys and values of its attention (the whole sequence's; the feedback solve re-gathers k_b in its
    backward instead of keeping it).
    """
    model, parallel = config.model, config.parallel
    model_parallel = parallel.tensor * parallel.pipeline
    params = count_params(model) / model_parallel
    compute_bytes = 2 if model.dtype != "float32" or config.logging.peak_tflops else BYTES[model.dtype]
    weights = params * BYTES[model.dtype]
    grads = params * 4
    optimizer = params * 12 / (dp_size * parallel.context if config.optim.distributed else 1)
    local = seq_len // parallel.context
    blocks = [block_activation_bytes(model, kind, local, config.train.micro_batch_size, parallel.tensor,
                                     parallel.sequence_parallel, compute_bytes) for kind in model.block_types]
    if parallel.context > 1:
        gathered = (config.train.micro_batch_size * seq_len * compute_bytes
                    * 2 * model.num_kv_heads * model.head_size / parallel.tensor)
        blocks = [{**b, "saved": b["saved"] + gathered, "mixer": b["mixer"] + gathered} if kind in "S*" else b
                  for b, kind in zip(blocks, model.block_types)]
    recompute = config.train.recompute if config.engine == "megatron" else \
        {"none": "none", "feedback": "selective", "full": "full"}[config.deepspeed.activation_checkpointing]
    activations = recomputed_activation_bytes(blocks, recompute, parallel.pipeline)
    gb = {name: value / 2**30 for name, value in
          dict(weights=weights, grads=grads, optimizer=optimizer, activations=activations).items()}
    gb["total"] = sum(gb.values())
    return gb


def stage_layouts(config: RunConfig, seq_lens: list[int], world: int) -> list[tuple]:
    """(stage, seq_len, data-parallel size) for each stage of a recipe (one unnamed stage without stages):
    the world stays, each stage's data-parallel size is what its tensor x pipeline x context leave."""
    stages = resolve_stages(config)
    if len(seq_lens) != len(stages):
        raise ConfigError(f"--seq-len gives {len(seq_lens)} lengths for {len(stages)} stages: one per stage, "
                          f"comma-separated, e.g. --seq-len {','.join(['8192'] * len(stages))}")
    layouts = []
    for stage, seq_len in zip(stages, seq_lens):
        parallel = stage.config.parallel
        model_parallel = parallel.tensor * parallel.pipeline * parallel.context
        if world % model_parallel:
            raise ConfigError(f"stage {stage.name!r}: {world} devices are not divisible by parallel.tensor x "
                              f"parallel.pipeline x parallel.context = {model_parallel}")
        layouts.append((stage, seq_len, world // model_parallel))
    return layouts


def main():
    parser = argparse.ArgumentParser(description="Estimate per-device memory of a recipe (of each stage of a campaign)")
    parser.add_argument("config")
    parser.add_argument("--seq-len", required=True, help="tokens per sequence; with stages one per stage, "
                                                         "comma-separated")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (without stages)")
    parser.add_argument("--world", type=int, help="devices in all (default: --dp x tensor x pipeline x context); "
                                                  "each stage's data-parallel size follows from its layout")
    args, overrides = parser.parse_known_args()  # recipe overrides, e.g. --parallel.context 4
    config = load_config(args.config, overrides)
    parallel = config.parallel
    world = args.world or args.dp * parallel.tensor * parallel.pipeline * parallel.context
    print(f"{config.run_name}: {count_params(config.model) / 1e9:.3f}B parameters")
    for stage, seq_len, dp in stage_layouts(config, [int(n) for n in args.seq_len.split(",")], world):
        cfg = stage.config
        name = f"stage {stage.name!r} (steps {stage.first_step + 1}-{stage.last_step}): " if stage.name else ""
        print(f"{name}TP {cfg.parallel.tensor} PP {cfg.parallel.pipeline} CP {cfg.parallel.context} DP {dp}, "
              f"seq_len {seq_len}, micro-batch {cfg.train.micro_batch_size}, recompute {cfg.train.recompute}")
        for part, value in estimate_memory_gb(cfg, seq_len, dp).items():
            print(f"  {part:>12}: {value:8.2f} GB")
        others = {}
        for mode in ("none", "selective", "full"):  # what each train.recompute mode would need
            trial = dataclasses.replace(cfg, engine="megatron", train=dataclasses.replace(cfg.train, recompute=mode))
            others[mode] = estimate_memory_gb(trial, seq_len, dp)["total"]
        print("  total by train.recompute: " + ", ".join(f"{mode} {gb:.1f} GB" for mode, gb in others.items()))


if __name__ == "__main__":
    main()
