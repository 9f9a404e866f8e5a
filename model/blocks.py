"""Hybrid stacks (`model.layer_pattern`): the blocks besides Sessa's, on megatron-core tensor-parallel layers.

One character per block (megatron's hybrid convention, extended for Sessa):
  `S`  SessaLayer (model/layer.py), with or without its feedback branch (`model.feedback`);
  `*`  AttentionBlock: x + W_o(attention(RoPE(q), RoPE(k), v)), q/k/v from RMSNorm(x): pre-norm GQA
       self-attention with rotate-half RoPE (base `rope_base`) and no biases, as in the Transformer arm;
  `-`  MLPBlock: x + W_down(SiLU(W_gate h) * W_up h), h = RMSNorm(x): SwiGLU of width `ffn_hidden_size`;
  `M`  MambaBlock (model/mamba.py): pre-norm Mamba-2 mixer with the chunked PyTorch SSD scan.
Activations are [T, B, D] (T / tp each under sequence parallelism). q/k/v and gate/up are
column-parallel (heads / ffn columns sharded), out_proj is row-parallel: one reduction per block.
`doc_ids` / `position_ids` [B, T] mask attention per packed document and give RoPE positions.
Under context parallelism (docs/context_parallel.md) x holds this CP rank's positions
(`model.parallel.local_positions`), doc_ids / position_ids stay full length: `*` runs the `S`
blocks' all-gathered K/V attention, `M` passes its conv inputs and SSD state across ranks.
Parameter names follow model.init's rules (`norm.weight` ones, `out_proj.weight` the residual scale),
so `init_weights` draws every block independently of the layout. model/lm.py builds the stack
(`build_block`); `PreNormBlock` here is the base of these blocks and of MambaBlock.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from torch import nn
from torch.profiler import record_function

from kernels.attention import causal_attention, context_parallel_attention

from .attention import apply_rope, rope_config, rope_inv_freq, split_heads
from .config import ModelConfig
from .documents import document_attention
from .init import init_weights, uninitialised
from .mup import query_multiplier
from .parallel import context_layout, context_parallel_group, local_positions
from .profile_ranges import FORWARD_ATTENTION, MLP


@dataclass
class KVCache:
    """Decoding state of an attention block: rotated keys and values, growing along time."""

    keys: torch.Tensor  # [B, H_kv / tp, t, d]
    values: torch.Tensor  # [B, H_kv / tp, t, d]

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class PreNormBlock(MegatronModule):
    """Shared plumbing: RMSNorm on this rank's positions, then the full sequence for the column linears."""

    def __init__(self, config: ModelConfig, megatron_config, layer_number: int):
        super().__init__(megatron_config)
        self.sessa = config
        self.layer_number = layer_number  # global index: init seeds and checkpoint keys
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps, dtype=megatron_config.params_dtype)
        for param in self.norm.parameters():  # partial gradients per sequence shard: summed over TP
            param.sequence_parallel = megatron_config.sequence_parallel
        self.full_sequence_config = (dataclasses.replace(megatron_config, sequence_parallel=False)
                                     if megatron_config.sequence_parallel else megatron_config)

    def column(self, in_features, out_features):  # input gradients reduced once, in _normed_input
        return ColumnParallelLinear(in_features, out_features, config=self.full_sequence_config,
                                    init_method=uninitialised, bias=False, gather_output=False,
                                    disable_grad_reduce=True)

    def row(self, in_features, out_features):  # reduce (or reduce-scatter under sequence parallelism)
        return RowParallelLinear(in_features, out_features, config=self.config, init_method=uninitialised,
                                 bias=False, input_is_parallel=True, skip_bias_add=False)

    def _normed_input(self, x):
        x_ln = self.norm(x)
        if self.config.sequence_parallel:
            return gather_from_sequence_parallel_region(x_ln)  # [T, B, D]; reduce-scatter backward
        return copy_to_tensor_model_parallel_region(x_ln)  # identity; all-reduce backward


class AttentionBlock(PreNormBlock):
    """`*`: pre-norm grouped-query self-attention with RoPE (heads sharded across TP ranks)."""

    def __init__(self, config: ModelConfig, megatron_config, layer_number: int = 0, *, init_seed: int | None = 0):
        super().__init__(config, megatron_config, layer_number)
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        D, d = config.hidden_size, config.head_size
        self.local_heads, self.local_kv_heads = config.num_heads // tp_size, config.num_kv_heads // tp_size
        self.q_proj = self.column(D, config.num_heads * d)
        self.k_proj = self.column(D, config.num_kv_heads * d)
        self.v_proj = self.column(D, config.num_kv_heads * d)
        self.out_proj = self.row(config.num_heads * d, D)
        self.register_buffer("rope_inv_freq", rope_inv_freq(d, config.rope_base, config.rope_scaling),
                             persistent=False)
        # halves (i, i + d/2), as Llama
        self.rope_config = rope_config(megatron_config, interleaved=False, scaling=config.rope_scaling)
        if init_seed is not None and megatron_config.perform_initialization:
            init_weights(self, init_seed)

    def empty_cache(self, batch_size: int, dtype, device) -> KVCache:
        shape = (batch_size, self.local_kv_heads, 0, self.sessa.head_size)
        return KVCache(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, *, doc_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """x [T, B, D] -> (x + attention, updated cache or None)."""
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids with a decoding cache: pass doc_ids only without caches")
        h = self._normed_input(x)
        T, B = h.shape[:2]
        past = cache.length if cache is not None else 0
        cp_group = context_parallel_group()
        if cp_group is not None:
            if cache is not None:
                raise ValueError("a decoding cache under context parallelism: decode with context_parallel_size 1")
            here = local_positions(T, h.device)  # this rank's positions (contiguous or zigzag)
            positions = here if position_ids is None else position_ids[:, here]
        else:
            positions = torch.arange(past, past + T, device=h.device) if position_ids is None else position_ids
        inv_freq, rope = self.rope_inv_freq, self.rope_config
        q = apply_rope(split_heads(self.q_proj, h, self.local_heads), positions, inv_freq, rope)
        k = apply_rope(split_heads(self.k_proj, h, self.local_kv_heads), positions, inv_freq, rope)
        v = split_heads(self.v_proj, h, self.local_kv_heads)
        if self.sessa.mup:  # μP: logits q.k sqrt(d0) / d
            q = q * query_multiplier(self.sessa)
        if cache is not None:
            k, v = torch.cat((cache.keys, k), dim=2), torch.cat((cache.values, v), dim=2)
            cache = KVCache(k, v)
        with record_function(FORWARD_ATTENTION):
            if cp_group is not None:  # the all-gathered K/V attention of the `S` blocks
                out = context_parallel_attention(q, k, v, cp_group, doc_ids, layout=context_layout())
            elif doc_ids is None:
                out = causal_attention(q, k, v, past)
            else:
                out = document_attention(q, k, v, doc_ids)
        out = out.permute(2, 0, 1, 3).reshape(T, B, -1)  # [T, B, H_l * d]
        y, _ = self.out_proj(out)
        return x + y, cache


class MLPBlock(PreNormBlock):
    """`-`: pre-norm SwiGLU MLP of width `ffn_hidden_size` (columns sharded across TP ranks)."""

    def __init__(self, config: ModelConfig, megatron_config, layer_number: int = 0, *, init_seed: int | None = 0):
        super().__init__(config, megatron_config, layer_number)
        D, F_ = config.hidden_size, config.ffn_hidden_size
        self.gate_proj = self.column(D, F_)
        self.up_proj = self.column(D, F_)
        self.out_proj = self.row(F_, D)
        if init_seed is not None and megatron_config.perform_initialization:
            init_weights(self, init_seed)

    def empty_cache(self, batch_size: int, dtype, device) -> None:
        return None  # position-wise: nothing to remember

    def forward(self, x: torch.Tensor, cache=None, *, doc_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """x [T, B, D] -> (x + SwiGLU(RMSNorm(x)), None); doc_ids/position_ids are not needed."""
        h = self._normed_input(x)
        with record_function(MLP):
            gate, _ = self.gate_proj(h)
            up, _ = self.up_proj(h)
            y, _ = self.out_proj(F.silu(gate) * up)
        return x + y, None


def block_weight_elements(config: ModelConfig, kind: str) -> tuple[int, int]:
    """(matrix weights, vector elements) of one block of `kind` (a model.layer_pattern character)."""
    D, kv = config.hidden_size, config.num_kv_heads * config.head_size
    if kind == "*":
        return D * (D + 2 * kv) + D * D, D
    if kind == "-":
        return 3 * D * config.ffn_hidden_size, D
    if kind == "M":  # z, x, B, C, dt projections and out_proj; the depthwise convs are elementwise work
        E, N, H = config.mamba_inner_size, config.mamba_state_size, config.mamba_heads
        conv = (config.mamba_conv_kernel + 1) * (E + 2 * N)  # weights and biases over x, B, C
        return D * (2 * E + 2 * N + H) + E * D, D + conv + 3 * H + E  # norm, convs, A_log/dt_bias/D, gated norm
    if kind == "S":
        feedback = config.feedback  # q_b, k_b, gamma_ctx, gamma_bias exist only with the feedback branch
        matrices = (
            2 * D * D  # W_in: a and g halves
            + D * D + 2 * D * kv  # q, k, v
            + (2 * D * D + D if feedback else 0)  # feedback q_b, k_b and gamma_ctx
            + (D * D if config.num_heads > 1 else 0)  # W_o (identity for a single head)
            + D * D  # W_out
        )
        vectors = 2 * D + 2 * D + D + 2 * kv + (2 * D + 1 if feedback else 0) + D  # norm, W_in, q, k/v, fb, W_out
        return matrices, vectors
    raise ValueError(f"unknown block type {kind!r} in model.layer_pattern")
