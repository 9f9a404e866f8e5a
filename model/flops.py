"""The FLOP ledger: analytic FLOPs per token for both architectures, per component.

Conventions (`FlopLedger.per_token(convention)`):
  "6N"                 6 x parameters (embeddings included; tied embeddings counted once).
  "6N_non_embedding"   6 x parameters without the embedding / untied output matrices (Kaplan et al.).
  "model"              every matmul of the mathematics, 2 FLOPs per multiply-add, with attention
                       counted causally: a query at position t sees t + 1 keys in the forward
                       branch and t keys (the strict past) in Sessa's feedback branch. Training
                       = 3 x forward (backward = 2 x forward). This is what MFU divides by.
  "hardware"           what the implementation executes: matmuls of the chunked solve with its
                       [C, t] tiles and C x C diagonal solves, the feedback logits recomputed in
                       backward (and on every tensor-parallel rank), flash-style attention (SDPA) counted
                       causally with a 2.5 x backward (scores recomputed), or megatron's local
                       attention over the full T x T square (attention_kernel="dense"),
                       and one more forward of every layer under full activation recomputation.
Elementwise work (softmax, norms, GELU/SiLU, RoPE) is left out of every convention, as in
`torch.utils.flop_counter`, which the tests compare the hardware numbers with (exactly, after
registering `flop_counter_formulas()` for the ops it has no formula for).

Hybrid stacks (model.layer_pattern) sum the blocks of each type; the Transformer arm is "*-" per layer.
Mamba-2 blocks (`M`): their projections are weight matmuls ("projections"), their depthwise convs
elementwise work (left out, like norms); the SSD scan is "ssm_scan" (model: the recurrence, 4 N P per head and token; hardware: the chunked
scan of kernels/ssd/chunk.py as executed, its within-chunk C.B scores, shared by all heads and computed on
every tensor-parallel rank, as "ssm_scores").

Components: projections (every weight matmul of the mixing layers: Sessa's W_in, q/k/v, W_o,
feedback q_b/k_b, gamma, W_out; the qkv and output projections of the Transformer and of `*`
blocks), mlp (the SwiGLU of the Transformer and of `-` blocks), attention (causal forward attention), feedback_logits (q_b . k_b),
feedback_sum (the probability-weighted sum over past s), feedback_solve (the diagonal-block
solves), ssm_scan and ssm_scores (`M` blocks), lm_head, and recompute (hardware only).
"""
from dataclasses import dataclass, field

import torch

from kernels.feedback_solve import block_rows
from model.config import ModelConfig

CONVENTIONS = ("6N", "6N_non_embedding", "model", "hardware")
ATTENTION_KERNELS = ("flash", "dense")  # flash: causal tiles only (SDPA); dense: full T x T, masked
RECOMPUTE = ("none", "full")


# --- parameters -------------------------------------------------------------------------------
def count_params(config: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Parameters of either architecture (tensor-parallel shards counted once, padded vocabulary)."""
    if config.arch == "transformer":
        from model.transformer import count_transformer_parameters

        return count_transformer_parameters(config, exclude_embeddings)
    from model.lm import count_parameters

    return count_parameters(config, exclude_embeddings)


def layer_weight_elements(config: ModelConfig, kind: str | None = None) -> dict[str, int]:
    """Matrix-weight elements of one layer (a Transformer layer; or a block of `kind`, a
    model.layer_pattern character, default "S"), by component (what a token multiplies through)."""
    from model.blocks import block_weight_elements

    D, kv = config.hidden_size, config.num_kv_heads * config.head_size
    if config.arch == "transformer":
        F = config.ffn_hidden_size
        return {"projections": D * (D + 2 * kv) + D * D, "mlp": 2 * D * F + F * D}
    kind = kind or "S"
    matrices, _ = block_weight_elements(config, kind)
    return {"projections": 0 if kind == "-" else matrices, "mlp": matrices if kind == "-" else 0}


def block_counts(config: ModelConfig) -> dict[str, int]:
    """Blocks per model.layer_pattern character; the Transformer arm is "*-" per layer."""
    types = "*-" * config.num_layers if config.arch == "transformer" else config.block_types
    return {kind: types.count(kind) for kind in dict.fromkeys(types)}


# --- the chunked feedback solve, as executed ----------------------------------------------------
def chunked_solve_flops(T: int, K: int, V: int, chunk_size: int) -> dict[str, dict[str, int]]:
    """FLOPs of one sequence's chunked solve (kernels/feedback_solve/chunk.py), forward and backward.

    Rows are processed in chunks of n <= C queries against keys [0, c1): logits [n, K] @ [K, c1],
    past context [n, c0] @ [c0, V], a unit-lower n x n solve with V right-hand sides (n (n - 1) V).
    Backward recomputes the logits, solves the transposed blocks, accumulates the later chunks'
    terms ([c0, n] @ [n, V]), the context and lambda . s ([n, c1] x V each), dq and dk ([n, c1] x K each).
    """
    fwd = {"feedback_logits": 0, "feedback_sum": 0, "feedback_solve": 0}
    bwd = dict(fwd)
    for c0 in range(0, T, chunk_size):
        c1 = min(c0 + chunk_size, T)
        n = c1 - c0
        fwd["feedback_logits"] += 2 * n * K * c1
        fwd["feedback_sum"] += 2 * n * c0 * V
        fwd["feedback_solve"] += n * (n - 1) * V
        bwd["feedback_logits"] += 3 * 2 * n * K * c1  # recomputed logits, dq, dk
        bwd["feedback_sum"] += 2 * c0 * n * V + 2 * 2 * n * c1 * V  # later terms, context, lambda . s
        bwd["feedback_solve"] += n * (n - 1) * V
    return {"forward": fwd, "backward": bwd}


def ssd_chunked_flops(T: int, heads: int, groups: int, N: int, P: int, chunk_size: int) -> dict[str, dict[str, int]]:
    """FLOPs of one sequence's chunked SSD scan (kernels/ssd/chunk.py, from a zero state), forward and backward.

    Per chunk of n positions: C.B per group (2 n^2 N), scores @ x (2 n^2 P per head), the carried
    state read by C (2 n N P per head, from the second chunk on) and the state update (2 n N P per
    head). Backward: two matmuls per forward one, but none for the last chunk's update (the final
    state is not part of a training loss)."""
    fwd = {"ssm_scores": 0, "ssm_scan": 0}
    bwd = dict(fwd)
    for c0 in range(0, T, chunk_size):
        n = min(c0 + chunk_size, T) - c0
        carried, update = (2 * n * heads * N * P if c0 else 0), 2 * n * heads * N * P
        fwd["ssm_scores"] += 2 * n * n * N * groups
        fwd["ssm_scan"] += 2 * n * n * heads * P + carried + update
        bwd["ssm_scores"] += 2 * 2 * n * n * N * groups
        bwd["ssm_scan"] += 2 * (2 * n * n * heads * P + carried + (update if c0 + n < T else 0))
    return {"forward": fwd, "backward": bwd}


def causal_pairs(s_q: int, s_k: int) -> int:
    """(query, key) pairs a causal mask keeps, queries aligned to the end of the keys."""
    past = s_k - s_q
    return sum(min(past + i + 1, s_k) for i in range(s_q)) if past else s_q * (s_q + 1) // 2


# --- the ledger ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlopLedger:
    """FLOPs per token of one model at one sequence length, per component and convention."""

    arch: str
    seq_len: int
    params: int
    params_non_embedding: int
    forward: dict[str, float] = field(default_factory=dict)  # "model" convention, forward pass
    hardware_forward: dict[str, float] = field(default_factory=dict)
    hardware_backward: dict[str, float] = field(default_factory=dict)  # includes "recompute"

    def per_token(self, convention: str = "model", training: bool = True) -> float:
        if convention == "6N":
            return (6 if training else 2) * self.params
        if convention == "6N_non_embedding":
            return (6 if training else 2) * self.params_non_embedding
        if convention == "model":
            return (3 if training else 1) * sum(self.forward.values())
        if convention == "hardware":
            return sum(self.hardware_forward.values()) + (sum(self.hardware_backward.values()) if training else 0)
        raise ValueError(f"FLOP convention must be one of {CONVENTIONS}, got {convention!r}")

    def per_token_visible(self, visible_fraction: float, training: bool = True) -> float:
        """"model" FLOPs per token when packed documents see only themselves: attention and feedback
        count only the visible (query, key) pairs, `visible_fraction` of the causal pairs of a
        seq_len sequence (model/documents.py: visible_pair_fraction); the rest is per token."""
        pairwise = sum(v for k, v in self.forward.items() if k.startswith(("attention", "feedback")))
        return (3 if training else 1) * (sum(self.forward.values()) - (1.0 - visible_fraction) * pairwise)

    def all_conventions(self, training: bool = True) -> dict[str, float]:
        return {name: self.per_token(name, training) for name in CONVENTIONS}

    def table(self) -> str:
        """Per-component forward FLOPs per token (model and hardware) and backward (hardware)."""
        names = list(dict.fromkeys([*self.forward, *self.hardware_forward, *self.hardware_backward]))
        lines = [f"{'component':<16} {'model fwd':>14} {'hw fwd':>14} {'hw bwd':>14}"]
        for name in names:
            lines.append(f"{name:<16} {self.forward.get(name, 0):>14.4g} {self.hardware_forward.get(name, 0):>14.4g} "
                         f"{self.hardware_backward.get(name, 0):>14.4g}")
        for convention, value in self.all_conventions().items():
            lines.append(f"training FLOPs/token [{convention}] = {value:.4g}")
        return "\n".join(lines)


def ledger(config: ModelConfig, seq_len: int, *, tensor_parallel: int = 1, recompute: str = "none",
           attention_kernel: str | None = None, chunk_size: int | None = None) -> FlopLedger:
    """The ledger of `config` trained on sequences of `seq_len` tokens.

    Args:
        tensor_parallel: the feedback logits and `M` blocks' C.B scores are computed on every
            tensor-parallel rank (hardware).
        recompute: "full" adds one forward of every layer to the hardware backward.
        attention_kernel: "flash" (causal tiles: SDPA, in every architecture; the default) or "dense"
            (full square, masked: megatron's local DotProductAttention).
        chunk_size: the feedback solve's chunk (default: the config's; with feedback_impl "chunked",
            the rows per block it executes, kernels.feedback_solve.block_rows).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    attention_kernel = attention_kernel or "flash"
    if attention_kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {attention_kernel!r}")
    T, D = seq_len, config.hidden_size
    width = config.num_heads * config.head_size  # query heads x head size
    counts = block_counts(config)  # blocks per type: S (Sessa), * (attention), - (MLP)
    if config.arch == "transformer":
        weights = {"projections": 0.0, "mlp": 0.0}
        for name, n in layer_weight_elements(config).items():
            weights[name] += config.num_layers * n
    else:
        weights = {"projections": 0.0, "mlp": 0.0}
        for kind, count in counts.items():
            for name, n in layer_weight_elements(config, kind).items():
                weights[name] += count * n
    L = counts.get("S", 0) + counts.get("*", 0)  # blocks that attend
    L_feedback = counts.get("S", 0) if config.arch == "sessa" and config.feedback else 0
    L_mamba = counts.get("M", 0)

    forward = {name: 2.0 * n for name, n in weights.items()}
    forward["attention"] = L * 2 * 2 * width * (T + 1) / 2  # scores and values, t + 1 keys on average
    if L_feedback:
        forward["feedback_logits"] = L_feedback * 2 * D * (T - 1) / 2  # strict past: t keys
        forward["feedback_sum"] = L_feedback * 2 * D * (T - 1) / 2
        forward["feedback_solve"] = 0.0  # the sum over the past *is* the recurrence
    if L_mamba:
        forward["ssm_scan"] = L_mamba * 4 * config.mamba_heads * config.mamba_state_size * config.mamba_head_size
    forward["lm_head"] = 2.0 * config.padded_vocab_size * D

    hw_fwd = {name: value for name, value in forward.items() if not name.startswith(("attention", "feedback", "ssm"))}
    hw_bwd = {name: 2 * value for name, value in hw_fwd.items()}  # input and weight gradients
    if attention_kernel == "flash":
        hw_fwd["attention"] = L * 4 * width * causal_pairs(T, T) / T
        hw_bwd["attention"] = 2.5 * hw_fwd["attention"]  # scores recomputed
    else:
        hw_fwd["attention"] = L * 4 * width * T
        hw_bwd["attention"] = 2 * hw_fwd["attention"]
    if L_feedback:
        if chunk_size is None:  # impl "chunked" raises the chunk toward 256 rows where T allows
            chunk_size = (block_rows(T, config.feedback_chunk_size) if config.feedback_impl == "chunked"
                          else config.feedback_chunk_size)
        solve = chunked_solve_flops(T, D, D, chunk_size)
        for name in solve["forward"]:
            replicas = tensor_parallel if name == "feedback_logits" else 1
            hw_fwd[name] = L_feedback * replicas * solve["forward"][name] / T
            hw_bwd[name] = L_feedback * replicas * solve["backward"][name] / T
    if L_mamba:  # one B/C group: every rank computes all of C.B for its own heads
        scan = ssd_chunked_flops(T, config.mamba_heads, 1, config.mamba_state_size, config.mamba_head_size,
                                 config.mamba_chunk_size)
        for name in scan["forward"]:
            replicas = tensor_parallel if name == "ssm_scores" else 1
            hw_fwd[name] = L_mamba * replicas * scan["forward"][name] / T
            hw_bwd[name] = L_mamba * replicas * scan["backward"][name] / T
    hw_bwd["recompute"] = (sum(hw_fwd.values()) - hw_fwd["lm_head"]) if recompute == "full" else 0.0
    return FlopLedger(
        arch=config.arch, seq_len=T,
        params=count_params(config), params_non_embedding=count_params(config, exclude_embeddings=True),
        forward=forward, hardware_forward=hw_fwd, hardware_backward=hw_bwd,
    )


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True, convention: str = "model") -> float:
    """Training (or forward) FLOPs per token; the trainer's MFU uses the "model" convention."""
    return ledger(config, seq_len).per_token(convention, training)


# --- formulas for torch.utils.flop_counter ------------------------------------------------------
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args,
                    out_shape=None, attn_mask=None, **kwargs) -> int:
    b, h, s_q, d_qk = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    pairs = causal_pairs(s_q, s_k) if is_causal else s_q * s_k
    return 2 * b * h * pairs * (d_qk + d_v)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, out_shape_, lse_shape,
                             dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d_qk = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    pairs = causal_pairs(s_q, s_k) if is_causal else s_q * s_k
    return 2 * b * h * pairs * (3 * d_qk + 2 * d_v)  # recomputed scores, dQ, dK (d_qk); dP, dV (d_v)


def _solve_triangular_flops(a_shape, b_shape, *args, upper=None, left=True, unitriangular=False,
                            out_shape=None, **kwargs) -> int:
    n = a_shape[-1]
    rhs = b_shape[-1] if left else b_shape[-2]
    batch = 1
    for size in out_shape[:-2]:
        batch *= size
    return batch * (n * (n - 1) if unitriangular else n * n) * rhs


def _triton_fwd_flops(q_shape, k_shape, f_shape, gamma_shape, chunk_size, panel_size, *, out_shape=None) -> int:
    B, T, K = q_shape
    return B * sum(chunked_solve_flops(T, K, f_shape[-1], chunk_size)["forward"].values())


def _triton_bwd_flops(q_shape, k_shape, gamma_shape, s_shape, lse_shape, grad_shape, chunk_size, panel_size,
                      *, out_shape=None) -> int:
    B, T, K = q_shape
    return B * sum(chunked_solve_flops(T, K, s_shape[-1], chunk_size)["backward"].values())


def _baddbmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    b, m, k = a_shape
    return 2 * b * m * k * b_shape[-1]  # as torch's formula for the out-of-place baddbmm


def flop_counter_formulas() -> dict:
    """`custom_mapping` for FlopCounterMode: the ops our models run that it has no formula for
    (CPU flash attention, the triangular solves, the Triton feedback ops when loaded)."""
    aten = torch.ops.aten  # keys are overload packets: FlopCounterMode looks ops up by packet
    formulas = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
        aten.linalg_solve_triangular: _solve_triangular_flops,
        aten.baddbmm_: _baddbmm_flops,  # the chunked solve's in-place accumulations (no formula of its own)
    }
    if hasattr(torch.ops, "sessa") and hasattr(torch.ops.sessa, "feedback_solve_triton_fwd"):
        formulas[torch.ops.sessa.feedback_solve_triton_fwd] = _triton_fwd_flops
        formulas[torch.ops.sessa.feedback_solve_triton_bwd] = _triton_bwd_flops
    return formulas
