"""The Sessa block and mixer (SESSA.md §1-2), on megatron-core tensor-parallel layers.

Activations are sequence-first, [T, B, D], as everywhere in megatron-core. Tensor parallelism
(SESSA.md §6) is a property of the layers used here, not of this code:
  - in_proj is column-parallel and gathers `a` (every rank needs all of a_bar for the contractions);
    gate_proj is column-parallel and keeps its slice of g;
  - with sequence parallelism the norm and residual see T / tp positions: the normed input is
    all-gathered along the sequence once and out_proj reduce-scatters it; the mixer sees all of T;
  - column-parallel linears that share an input (in_proj + gate_proj; the mixer's five) skip
    their own input-gradient all-reduce: one reduction per shared input instead of one per linear;
  - q/k/v are column-parallel by heads; attention and the feedback solve run on the local heads'
    feature columns (the solve is per column and commutes with W_o);
  - the feedback q_b/k_b are column-parallel and gathered (B*T*2D per layer, never T x T);
  - packed documents (`doc_ids`, full length [B, T] on every rank) mask the attention and the
    solve per document; `position_ids` give the RoPE positions (model/documents.py);
  - context parallelism (megatron's CP group, size > 1): x holds this CP rank's piece of the
    sequence (contiguous or zigzag: model.parallel.context_layout); the attention all-gathers K/V (kernels/attention/context_parallel.py) and the feedback
    solve pipelines over the pieces (kernels/feedback_solve/context_parallel.py); doc_ids and
    position_ids stay full length; parameter gradients are partial sums over the CP group;
  - mixer.out_proj (W_o) and out_proj (W_out) are row-parallel: one reduction each.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn
from torch.profiler import record_function

from kernels.attention import causal_attention, context_parallel_attention
from kernels.feedback_solve import feedback_solve
from kernels.feedback_solve.context_parallel import feedback_solve_context_parallel

from .attention import apply_rope, rope_config, rope_inv_freq, split_heads
from .config import ModelConfig
from .documents import document_attention
from .init import init_weights, uninitialised
from .mup import feedback_query_multiplier, query_multiplier
from .parallel import context_layout, context_parallel_group, local_positions
from .profile_ranges import FEEDBACK_SOLVE, FORWARD_ATTENTION


@dataclass
class LayerCache:
    """Per-layer decoding state (SESSA.md §4); every field grows along time."""

    keys: torch.Tensor  # [B, H_kv, t, d] rotated forward-branch keys
    values: torch.Tensor  # [B, H_kv, t, d]
    feedback_keys: torch.Tensor | None  # [B, t, D] k_b; None without the feedback branch
    feedback_states: torch.Tensor | None  # [B, t, V] past solve outputs s (before W_o); None likewise

    @property
    def length(self) -> int:
        return self.keys.shape[2]


@dataclass
class SessaSubmodules:
    """Swap points for backends (e.g. Transformer Engine linears), megatron ModuleSpec style."""

    column_linear: type = ColumnParallelLinear
    row_linear: type = RowParallelLinear
    norm: type = nn.LayerNorm
    mixer: ModuleSpec | type | None = None  # defaults to SessaMixer


class SessaMixer(MegatronModule):
    """Forward causal attention f, then the feedback solve (I - diag(gamma) alpha) s = f
    (with `config.feedback` false: s = f, and no feedback parameters)."""

    def __init__(self, config: ModelConfig, megatron_config, submodules: SessaSubmodules):
        super().__init__(megatron_config)
        self.sessa = config
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        D, d = config.hidden_size, config.head_size
        self.local_heads = config.num_heads // tp_size
        self.local_kv_heads = config.num_kv_heads // tp_size

        def column(out_features, gather_output):  # input gradients reduced once, in forward()
            return submodules.column_linear(
                D, out_features, config=megatron_config, init_method=uninitialised,
                bias=True, gather_output=gather_output, disable_grad_reduce=True,
            )

        # Forward branch: heads sharded across tensor-parallel ranks.
        self.q_proj = column(config.num_heads * d, gather_output=False)
        self.k_proj = column(config.num_kv_heads * d, gather_output=False)
        self.v_proj = column(config.num_kv_heads * d, gather_output=False)
        # Feedback branch: one head over the full width, gathered on every rank.
        if config.feedback:
            self.fb_q_proj = column(D, gather_output=True)
            self.fb_k_proj = column(D, gather_output=True)
            self.gamma_ctx = nn.Linear(D, 1, bias=False, dtype=megatron_config.params_dtype)
            self.gamma_bias = nn.Parameter(torch.ones((), dtype=megatron_config.params_dtype))
        # W_o is the identity when there is a single head (the reference has no out_proj then).
        self.out_proj = (
            submodules.row_linear(
                config.num_heads * d, D, config=megatron_config, init_method=uninitialised,
                bias=False, input_is_parallel=True, skip_bias_add=False,
            )
            if config.num_heads > 1 else None
        )
        self.register_buffer("rope_inv_freq", rope_inv_freq(d, config.rope_base, config.rope_scaling),
                             persistent=False)
        # pairs (2i, 2i+1), as the reference
        self.rope_config = rope_config(megatron_config, interleaved=True, scaling=config.rope_scaling)

    def forward(self, a_bar: torch.Tensor, cache: LayerCache | None = None, *,
                doc_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """a_bar [T, B, D] -> (s [T, B, D / tp], updated cache or None).

        doc_ids [B, T]: position t sees only earlier positions of its own document (no cache).
        position_ids [B, T]: RoPE positions; None = past + 0..T-1.
        Under context parallelism a_bar is this rank's piece of the sequence and doc_ids /
        position_ids are the whole sequence's.
        """
        T, B, _ = a_bar.shape
        past = cache.length if cache is not None else 0
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids with a decoding cache: decoding runs one document per row; "
                             "pass doc_ids only without caches")
        cp_group = context_parallel_group()
        if cp_group is not None:
            if cache is not None:
                raise ValueError("a decoding cache under context parallelism: decode with context_parallel_size 1")
            here = local_positions(T, a_bar.device)  # this rank's positions (contiguous or zigzag)
            positions = here if position_ids is None else position_ids[:, here]
        else:
            positions = torch.arange(past, past + T, device=a_bar.device) if position_ids is None else position_ids

        # The five column-parallel projections each see all of a_bar and return partial input
        # gradients: copy_to_... is the identity forward and sums them with one all-reduce backward.
        a_shared = copy_to_tensor_model_parallel_region(a_bar)
        q = apply_rope(split_heads(self.q_proj, a_shared, self.local_heads), positions, self.rope_inv_freq,
                       self.rope_config)
        k = apply_rope(split_heads(self.k_proj, a_shared, self.local_kv_heads), positions, self.rope_inv_freq,
                       self.rope_config)
        v = split_heads(self.v_proj, a_shared, self.local_kv_heads)
        if self.sessa.mup:  # μP: logits q.k sqrt(d0) / d
            q = q * query_multiplier(self.sessa)
        if cache is not None:
            k = torch.cat((cache.keys, k), dim=2)
            v = torch.cat((cache.values, v), dim=2)
        with record_function(FORWARD_ATTENTION):
            if cp_group is not None:
                f = context_parallel_attention(q, k, v, cp_group, doc_ids, layout=context_layout())
            elif doc_ids is None:
                f = causal_attention(q, k, v, past)  # [B, H_l, T, d]
            else:
                f = document_attention(q, k, v, doc_ids)
        f = f.transpose(1, 2).reshape(B, T, -1)  # [B, T, H_l * d]: this rank's feature columns

        if not self.sessa.feedback:
            s = f  # the ablation without the feedback branch
            if cache is not None:
                cache = LayerCache(k, v, None, None)
        else:
            with record_function(FEEDBACK_SOLVE):
                s, cache = self._feedback(a_bar, a_shared, f, k, v, cache, doc_ids, cp_group)
        s = s.transpose(0, 1)  # [T, B, H_l * d]
        if self.out_proj is not None:
            s, _ = self.out_proj(s)  # all heads mixed: [T, B, D], reduced across ranks
            s = scatter_to_tensor_model_parallel_region(s)  # back to this rank's slice of D for the gate
        return s, cache

    def _feedback(self, a_bar, a_shared, f, k, v, cache, doc_ids, cp_group=None):
        """s [B, T, H_l * d] solving (I - diag(gamma) alpha) s = f, and the updated cache."""
        # Each rank solves only its own columns, so the gradients reaching the replicated feedback
        # inputs are partial sums: copy_to_... is the identity forward and all-reduces them backward.
        q_b = copy_to_tensor_model_parallel_region(self.fb_q_proj(a_shared)[0]).transpose(0, 1)  # [B, T, D]
        k_b = copy_to_tensor_model_parallel_region(self.fb_k_proj(a_shared)[0]).transpose(0, 1)
        if self.sessa.mup:  # μP: feedback logits q_b.k_b sqrt(D0) / D
            q_b = q_b * feedback_query_multiplier(self.sessa)
        # gamma_ctx is replicated and its input gradient already complete: it reads a_bar itself.
        gate_logit = self.gamma_bias + self.gamma_ctx(a_bar).squeeze(-1)  # [T, B]
        gamma = copy_to_tensor_model_parallel_region(self.sessa.gamma_max * torch.tanh(gate_logit)).transpose(0, 1)

        if cache is not None:
            return self._decode_feedback(q_b, k_b, f, gamma, k, v, cache)
        if cp_group is not None:
            return feedback_solve_context_parallel(q_b, k_b, f, gamma, cp_group, self.sessa.feedback_chunk_size,
                                                   doc_ids=doc_ids, layout=context_layout(),
                                                   impl=self.sessa.feedback_impl), None
        return feedback_solve(q_b, k_b, f, gamma, self.sessa.feedback_impl, self.sessa.feedback_chunk_size,
                              doc_ids=doc_ids), None

    def _decode_feedback(self, q_b, k_b, f, gamma, keys, values, cache: LayerCache):
        """Token-by-token recurrence over the cache: s[t] = f[t] + gamma[t] softmax(q_b[t] K_b[:t]) S[:t]."""
        fb_keys, states = cache.feedback_keys, cache.feedback_states
        if fb_keys.shape[1] == 0:  # prefill from an empty cache: one chunked solve
            s = feedback_solve(q_b, k_b, f, gamma, self.sessa.feedback_impl, self.sessa.feedback_chunk_size)
            fb_keys, states = k_b, s
        else:
            scale = q_b.shape[-1] ** -0.5
            outputs = []
            for t in range(f.shape[1]):
                logits = torch.einsum("bk,bjk->bj", q_b[:, t].float(), fb_keys.float()) * scale
                context = torch.einsum("bj,bjv->bv", torch.softmax(logits, dim=-1), states.float())
                s_t = (f[:, t].float() + gamma[:, t, None].float() * context).to(f.dtype)
                outputs.append(s_t)
                fb_keys = torch.cat((fb_keys, k_b[:, t : t + 1]), dim=1)
                states = torch.cat((states, s_t[:, None]), dim=1)
            s = torch.stack(outputs, dim=1)
        return s, LayerCache(keys, values, fb_keys, states)


class SessaLayer(MegatronModule):
    """x + W_out((Mixer(GELU(a)) * g)), with [a, g] = W_in(LayerNorm(x)); no separate MLP.

    Built with `init_seed` (default 0), every parameter is drawn by `model.init.init_weights`:
    the same values as layer `layer_number` of a SessaLM initialised with that seed, whatever the
    layout. `init_seed=None`, or megatron's `perform_initialization=False`, leaves them to the
    caller (SessaLM initialises all layers at once; a checkpoint load overwrites them).
    """

    def __init__(self, config: ModelConfig, megatron_config=None, submodules: SessaSubmodules | None = None,
                 layer_number: int = 0, *, init_seed: int | None = 0):
        if megatron_config is None:
            from .parallel import ensure_model_parallel, megatron_config as make_megatron_config

            ensure_model_parallel()
            megatron_config = make_megatron_config(config)
        super().__init__(megatron_config)
        submodules = submodules or SessaSubmodules()
        self.sessa = config
        self.layer_number = layer_number  # global index, used for init seeds and checkpoint keys
        D = config.hidden_size
        self.norm = submodules.norm(D, eps=config.norm_eps, dtype=megatron_config.params_dtype)
        for param in self.norm.parameters():  # partial gradients per sequence shard: summed over TP
            param.sequence_parallel = megatron_config.sequence_parallel
        # forward() hands the linears below the full sequence (gathered once), so they must not
        # gather it again; the row-parallel out_proj keeps the config and reduce-scatters.
        full_sequence_config = (dataclasses.replace(megatron_config, sequence_parallel=False)
                                if megatron_config.sequence_parallel else megatron_config)
        # W_in is split into its two halves so each shards (and reshards) on its own.
        self.in_proj, self.gate_proj = (
            submodules.column_linear(D, D, config=full_sequence_config, init_method=uninitialised, bias=True,
                                     gather_output=False, disable_grad_reduce=True)
            for _ in range(2)
        )
        self.mixer = build_module(
            submodules.mixer or SessaMixer, config, megatron_config=full_sequence_config, submodules=submodules
        )
        self.out_proj = submodules.row_linear(
            D, D, config=megatron_config, init_method=uninitialised, bias=True,
            input_is_parallel=True, skip_bias_add=False,
        )
        if init_seed is not None and megatron_config.perform_initialization:
            init_weights(self, init_seed)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, *,
                doc_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """x [T, B, D] -> (y [T, B, D], cache); T / tp positions each under sequence parallelism.

        doc_ids / position_ids [B, T]: full length on every rank (see SessaMixer.forward).
        """
        x_ln = self.norm(x)
        # One collective for both halves of W_in: backward sums their partial input gradients.
        if self.config.sequence_parallel:
            x_ln = gather_from_sequence_parallel_region(x_ln)  # [T, B, D]; reduce-scatter backward
        else:
            x_ln = copy_to_tensor_model_parallel_region(x_ln)  # identity; all-reduce backward
        a, _ = self.in_proj(x_ln)
        a = gather_from_tensor_model_parallel_region(a)  # [T, B, D] on every rank
        g, _ = self.gate_proj(x_ln)  # the gate has no activation
        s, cache = self.mixer(F.gelu(a), cache, doc_ids=doc_ids, position_ids=position_ids)  # exact (erf) GELU
        y, _ = self.out_proj(s * g)
        return x + y, cache
