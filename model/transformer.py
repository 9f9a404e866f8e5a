"""The Transformer++ baseline for scaling comparisons: megatron-core's GPTModel, local spec with a
fused attention core.

Pre-norm decoder with RMSNorm, RoPE (rotate-half, base `rope_base`, `rope_scaling` as in
model/attention.py: the table's angles and YaRN's factor on the softmax scale), grouped-query attention, a
SwiGLU MLP of width `ffn_hidden_size` and no biases anywhere; tied embeddings per the config. It
reads the same `ModelConfig` (with `arch: transformer`) so both arms of a sweep share width, depth,
heads, vocabulary, dtype and initialisation std, and it presents the interface the trainer uses
for `SessaLM`: forward(tokens, labels, caches, *, doc_ids, position_ids) -> per-token loss [B, T],
`sharded_state_dict`, `load_global_state_dict`, `num_parameters`.

Attention runs in `SDPAttention`, megatron's core-attention slot (the local spec's
DotProductAttention replaced): torch's scaled_dot_product_attention (flash / memory-efficient /
cuDNN on GPU, the fused flash kernel on CPU), so causal attention never holds a T x T tensor.
Packed documents (doc_ids) attend block-causally: flex_attention's block-sparse mask on CUDA, SDPA
with a boolean mask elsewhere (model/documents.py). Decoding keeps keys and values in megatron's
StaticInferenceContext (`empty_caches`, used by `model.generation.generate`).

    model = TransformerLM(config)            # single process: megatron state set up for world size 1
    init_transformer_weights(model, seed=0)  # layout independent, like model.init.init_weights
"""
import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from kernels.attention import context_parallel_attention

from .attention import rope_angles, rope_attention_factor, scale_inv_freq
from .config import ModelConfig
from .documents import check_doc_ids, document_attention
from .lm import load_strictly
from .parallel import (context_layout, context_parallel_group, ensure_model_parallel, local_positions,
                       megatron_config as make_megatron_config)


def transformer_megatron_config(config: ModelConfig, **overrides):
    """The megatron TransformerConfig of the Transformer++ arm (on top of `model.parallel.megatron_config`)."""
    fields = dict(
        ffn_hidden_size=config.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=config.norm_eps,
        gated_linear_unit=True,  # SwiGLU: fc1 holds the gate and the up projection
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=config.init_std,
    )
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "yarn":
        # YaRN's sqrt(1/t) on q and k is (sqrt(1/t))^2 on the logits
        fields["softmax_scale"] = rope_attention_factor(config.rope_scaling) ** 2 / math.sqrt(config.head_size)
    return make_megatron_config(config, **(fields | overrides))


class ScaledRotaryEmbedding(RotaryEmbedding):
    """megatron's RotaryEmbedding (rotate-half) with model.rope_scaling's frequencies and angles from
    model/attention.py, so both arms scale RoPE with one implementation."""

    def __init__(self, config: ModelConfig, use_cpu_initialization: bool, cp_group):
        super().__init__(kv_channels=config.head_size, rotary_percent=1.0, rotary_base=config.rope_base,
                         use_cpu_initialization=use_cpu_initialization, cp_group=cp_group)
        self.scaling = config.rope_scaling
        self.inv_freq = scale_inv_freq(self.inv_freq, self.scaling)  # megatron's theta_i, YaRN's under yarn

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        positions = torch.arange(max_seq_len, device=self.inv_freq.device) + offset
        return rope_angles(positions, self.inv_freq, self.scaling)


class SDPAttention(MegatronModule):
    """megatron core attention (the DotProductAttention slot of a layer spec) on torch's fused kernels.

    forward(query [sq, b, np, hn], key / value [sk, b, ng, hn], attention_mask) -> [sq, b, np * hn]
    for this rank's heads (TP splits heads; under sequence parallelism the inputs are already
    full-length). Grouped-query attention without repeating keys (`enable_gqa`). `attention_mask`
    is None (causal, or no mask for a decoding step, by `attn_mask_type`) or the packed batch's
    document ids [b, sk] (int), which `TransformerLM.forward` passes in megatron's mask argument:
    block-causal within documents. No parameters, so checkpoints equal the local spec's.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = {
            "attention_dropout > 0": dropout > 0,
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
            f"softmax_type {config.softmax_type!r}": config.softmax_type != "vanilla",
            "window_size": config.window_size is not None,
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"SDPAttention (model/transformer.py) does not support {', '.join(bad)} in the "
                             "megatron config of the Transformer arm; leave these at their defaults")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale  # None: 1 / sqrt(head size); set for YaRN (transformer_megatron_config)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes no attention_bias or packed_seq_params: pass doc_ids to "
                             "TransformerLM.forward for packed documents")
        sq, b, heads, head_size = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        cp_group = context_parallel_group()
        if cp_group is not None and (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal:
            raise ValueError("SDPAttention under context parallelism is causal only (decode with context_parallel_size 1)")
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.dtype.is_floating_point or attention_mask.dtype == torch.bool:
                raise ValueError("SDPAttention reads attention_mask as document ids [batch, seq_len] (int); got "
                                 f"{attention_mask.dtype} {list(attention_mask.shape)}: pass doc_ids to TransformerLM")
        if cp_group is not None:  # a context-parallel piece: the all-gathered K/V attention of the Sessa blocks
            out = context_parallel_attention(q, k, v, cp_group, attention_mask, layout=context_layout(),
                                             scale=self.softmax_scale)
        elif attention_mask is not None:
            out = document_attention(q, k, v, attention_mask, scale=self.softmax_scale)
        else:
            causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
            if causal and sq != k.shape[2]:
                raise ValueError(f"causal attention needs as many queries as keys, got {sq} and {k.shape[2]}")
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=heads != k.shape[1],
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_size)


class RMSNorm(torch.nn.RMSNorm):
    """The local spec's torch RMSNorm, also under sequence parallelism (which megatron's wrapper
    refuses): each rank normalises its T / tp positions, and the weight is marked `sequence_parallel`
    so its partial gradients are summed over the TP group (megatron's finalize_model_grads)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def transformer_layer_spec():
    """megatron's local GPT layer spec with `SDPAttention` as its core attention and `RMSNorm`."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


class TransformerLM(GPTModel):
    """megatron GPTModel (local spec, `SDPAttention` core) with SessaLM's calling convention.

    Args mirror SessaLM: `config` with arch "transformer", an optional megatron config (built from
    `config` when omitted), pre_process / post_process for pipeline stages; `layer_spec` replaces
    `transformer_layer_spec()` (the tests pass megatron's unfused local spec as the reference).
    `max_sequence_length` bounds RoPE positions.
    """

    def __init__(self, config: ModelConfig, megatron_config=None, *, pre_process: bool = True,
                 post_process: bool = True, max_sequence_length: int = 1 << 16, vp_stage: int | None = None,
                 layer_spec=None):
        if config.arch != "transformer":
            raise ValueError(f"TransformerLM needs model.arch == 'transformer', got {config.arch!r}")
        if megatron_config is None:
            ensure_model_parallel()
            megatron_config = transformer_megatron_config(config)
        if not tensor_parallel.get_cuda_rng_tracker().is_initialized():
            # megatron's attention forks the model-parallel RNG (for dropout, which is 0 here)
            tensor_parallel.model_parallel_cuda_manual_seed(0)
        super().__init__(
            config=megatron_config,
            transformer_layer_spec=TransformerBlockSubmodules(  # this stage's layers; the final norm as theirs
                layer_specs=[transformer_layer_spec() if layer_spec is None else layer_spec]
                * get_num_layers_to_build(megatron_config, vp_stage=vp_stage),
                layer_norm=RMSNorm),
            vocab_size=config.padded_vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=config.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=config.rope_base,
            vp_stage=vp_stage,
        )
        if config.rope_scaling is not None:
            self.rotary_pos_emb = ScaledRotaryEmbedding(config, megatron_config.use_cpu_initialization, None)
        # under context parallelism _preprocess indexes the whole table at this rank's positions (either
        # layout), so megatron's own slice of the table (its zigzag) is never wanted
        self.rotary_pos_emb.cp_group = None
        self.sessa = config  # the trainer and init read the hyper-parameters here, as on SessaLM

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                caches: StaticInferenceContext | None = None, *, doc_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs):
        """tokens [B, T] -> per-token loss [B, T] with labels, else logits [B, T, V / tp].

        doc_ids [B, T] (packed documents, model/documents.py): position t attends only to earlier
        positions of its own document; every pipeline stage gets the full-length ids. position_ids
        [B, T]: RoPE positions (None = 0..T-1). With `caches` (`empty_caches`): decoding, returns
        (logits [B, T or 1, V / tp], caches) with the new keys and values appended.
        """
        if caches is not None:
            if doc_ids is not None or position_ids is not None or labels is not None:
                raise ValueError("TransformerLM.forward with caches decodes one document per row from position "
                                 "caches.sequence_len_offset: pass no labels, doc_ids or position_ids")
            if self.config.sequence_parallel:
                raise ValueError("decoding with caches needs sequence_parallel=False (one token cannot be split)")
            # megatron's decoding path runs in eval mode (dropout is 0 here, so the numbers are the same)
            # and gathers the vocabulary; keep SessaLM's vocab-parallel logits
            training = self.training
            self.eval()
            try:
                logits = super().forward(tokens, None, None, inference_context=caches, runtime_gather_output=True,
                                         **kwargs)
            finally:
                self.train(training)
            caches.sequence_len_offset += tokens.shape[1]
            return tensor_parallel.scatter_to_tensor_model_parallel_region(logits), caches
        if self.pre_process:
            batch, length = tokens.shape
        else:
            length, batch = self.decoder.input_tensor.shape[:2]  # set by the pipeline schedule
            length *= self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        length *= self.config.context_parallel_size  # doc_ids / position_ids are the whole sequence's
        for name, ids in (("doc_ids", doc_ids), ("position_ids", position_ids)):
            if ids is not None:
                check_doc_ids(ids, batch, length, name)
        # doc_ids travel in megatron's attention-mask argument to SDPAttention (None: causal)
        return super().forward(tokens, position_ids, doc_ids, labels=labels, **kwargs)

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        """GPTModel's embedding and RoPE table, the table indexed at `position_ids` [B, T] when given;
        under context parallelism at this rank's positions (`model.parallel.local_positions`, not
        megatron's own zigzag slice of the table)."""
        out = super()._preprocess(input_ids, None, *args, **kwargs)
        cp = context_parallel_group() is not None
        if position_ids is None and not cp:
            return out
        table = self.rotary_pos_emb(self.max_sequence_length)[:, 0, 0]  # [S, dim], cached by megatron
        if cp:
            hidden = out[0] if self.pre_process else self.decoder.input_tensor  # [T_local (/ tp under SP), B, D]
            here = local_positions(hidden.shape[0] * (self.config.tensor_model_parallel_size
                                                      if self.config.sequence_parallel else 1), table.device)
            if position_ids is None:
                return (out[0], table[here][:, None, None], *out[2:])  # [T, 1, 1, dim]
            position_ids = position_ids[:, here]
        return (out[0], table[position_ids.transpose(0, 1)].unsqueeze(2), *out[2:])  # [T, B, 1, dim]

    def empty_caches(self, batch_size: int, max_length: int) -> StaticInferenceContext:
        """Key/value caches for decoding up to `max_length` positions (prompt + new tokens)."""
        return StaticInferenceContext(batch_size, max_length)

    def load_global_state_dict(self, state_dict: dict, prefix: str = "") -> None:
        """Load a full (single-stage) state dict keyed as `state_dict()` on a one-stage model."""
        offset = self.decoder.layers[0].layer_number - 1 if len(self.decoder.layers) else 0
        local = {}
        for key, value in state_dict.items():
            key = key[len(prefix):]
            if key.startswith("decoder.layers."):
                _, _, number, rest = key.split(".", 3)
                number = int(number) - offset
                if not 0 <= number < len(self.decoder.layers):
                    continue  # another pipeline stage's layer
                key = f"decoder.layers.{number}.{rest}"
            elif key.startswith("embedding.") and not self.pre_process:
                continue
            elif key.startswith(("output_layer.", "decoder.final_layernorm.")) and not self.post_process:
                continue
            local[key] = value
        load_strictly(self, local)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the full model (all shards counted once)."""
        return count_transformer_parameters(self.sessa, exclude_embeddings)


def count_transformer_parameters(config: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Transformer++ parameters (padded vocabulary; tied embeddings counted once)."""
    D, F_, kv = config.hidden_size, config.ffn_hidden_size, config.num_kv_heads * config.head_size
    layer = D + D * (D + 2 * kv) + D * D + D + 2 * D * F_ + F_ * D  # norm, qkv, proj, norm, fc1 (gate+up), fc2
    embeddings = config.padded_vocab_size * D * (1 if config.tie_embeddings else 2)
    return config.num_layers * layer + D + (0 if exclude_embeddings else embeddings)


def megatron_config_for(config: ModelConfig, **overrides):
    """The megatron TransformerConfig for either architecture (`model.arch`)."""
    if config.arch == "transformer":
        return transformer_megatron_config(config, **overrides)
    return make_megatron_config(config, **overrides)


def build_model(config: ModelConfig, megatron_config, pre_process: bool = True, post_process: bool = True,
                layer_numbers: list[int] | None = None, vp_stage: int | None = None):
    """One model chunk of either architecture: the trainer's single constructor call.

    The Transformer arm takes megatron's own pipeline split (even, from the parallel state), so
    `layer_numbers` must match it when given.
    """
    if config.arch == "sessa":
        from .lm import SessaLM

        return SessaLM(config, megatron_config, pre_process=pre_process, post_process=post_process,
                       layer_numbers=layer_numbers)
    model = TransformerLM(config, megatron_config, pre_process=pre_process, post_process=post_process,
                          vp_stage=vp_stage)
    own = [layer.layer_number - 1 for layer in model.decoder.layers]
    if layer_numbers is not None and list(layer_numbers) != own:
        raise ValueError(f"model.arch 'transformer' splits layers evenly across pipeline stages ({own} here); "
                         f"parallel.pipeline_layout {list(layer_numbers)} is not supported for it")
    return model


def init_model_weights(model, seed: int = 0) -> None:
    """Layout-independent initialisation for either architecture."""
    if isinstance(model, TransformerLM):
        init_transformer_weights(model, seed)
    else:
        from .init import init_weights

        init_weights(model, seed)


def _global_name(model: TransformerLM, name: str) -> str:
    if name.startswith("decoder.layers."):
        _, _, local, rest = name.split(".", 3)
        name = f"decoder.layers.{model.decoder.layers[int(local)].layer_number - 1}.{rest}"
    return name


@torch.no_grad()
def init_transformer_weights(model: TransformerLM, seed: int = 0) -> None:
    """Layout-independent init: norms 1, weights normal(init_std), residual outputs (linear_proj,
    fc2) normal(init_std / sqrt(2 L)); each full tensor drawn from a (seed, global name) generator."""
    cfg = model.sessa
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        name = _global_name(model, name)
        if name == "output_layer.weight" and cfg.tie_embeddings:
            name = "embedding.word_embeddings.weight"
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= tp_size
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        if "layernorm" in name or name.endswith("norm.weight"):
            full = torch.ones(shape)
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            full = torch.empty(shape).normal_(0.0, cfg.init_std / math.sqrt(2 * cfg.num_layers), generator=gen)
        else:
            full = torch.empty(shape).normal_(0.0, cfg.init_std, generator=gen)
        if getattr(param, "tensor_model_parallel", False):
            if name.endswith("linear_fc1.weight") and tp_size > 1:
                # megatron interleaves gate and up per rank: [gate_r; up_r] of each half
                gate, up = full.chunk(2, dim=0)
                full = torch.cat([torch.cat((g, u)) for g, u in zip(gate.chunk(tp_size), up.chunk(tp_size))])
            size = param.shape[param.partition_dim]
            full = full.narrow(param.partition_dim, tp_rank * size, size)
        param.copy_(full.to(param.dtype))


def llama_config_dict(config: ModelConfig) -> dict:
    """The Hugging Face `LlamaConfig` fields of the Transformer arm (the same architecture: RMSNorm,
    rotate-half RoPE, GQA, SwiGLU, no biases), for an export that `LlamaForCausalLM` loads."""
    if config.rope_scaling is not None:
        raise ValueError(f"model.rope_scaling {config.rope_scaling.rope_type!r}: the Llama export of the Transformer "
                         "arm carries plain RoPE only (Hugging Face's yarn ramps over rounded dimension indices, not "
                         "over the wavelength ratio as published and trained here); export --to safetensors instead")
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_size, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_base, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
    }


def split_qkv(weight: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's full linear_qkv weight -> (q [H d, D], k [G d, D], v [G d, D]): it holds per query
    group g [the group's H/G query heads; its key head; its value head]."""
    H, G, d = config.num_heads, config.num_kv_heads, config.head_size
    q, k, v = weight.view(G, (H // G + 2) * d, -1).split([H // G * d, d, d], dim=1)
    return q.reshape(H * d, -1), k.reshape(G * d, -1), v.reshape(G * d, -1)
