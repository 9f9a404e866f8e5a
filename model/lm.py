"""SessaLM: token embedding (no absolute positions) -> N blocks -> final norm -> LM head.

The blocks follow `model.layer_pattern` (model/blocks.py): Sessa layers by default ("S" * N), or a
hybrid of Sessa, attention (`*`), SwiGLU MLP (`-`) and Mamba-2 (`M`, model/mamba.py) blocks. The final norm is a LayerNorm when the
stack has a Sessa block, an RMSNorm (the Transformer arm's) otherwise."""
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_tp_sharded_tensor_for_checkpoint, sharded_state_dict_default
from torch import nn

from .blocks import AttentionBlock, MLPBlock, block_weight_elements
from .config import ModelConfig
from .documents import check_doc_ids
from .init import init_weights, uninitialised
from .layer import LayerCache, SessaLayer, SessaSubmodules
from .mamba import MambaBlock
from .mup import output_multiplier
from .parallel import ensure_model_parallel, megatron_config as make_megatron_config


def build_block(config: ModelConfig, megatron_config, layer_number: int, submodules=None):
    """Block `layer_number` of the stack (uninitialised: the caller draws or loads the weights)."""
    kind = config.block_types[layer_number]
    if kind == "S":
        return SessaLayer(config, megatron_config, submodules, layer_number=layer_number, init_seed=None)
    block = {"*": AttentionBlock, "-": MLPBlock, "M": MambaBlock}[kind]
    return block(config, megatron_config, layer_number, init_seed=None)


class SessaLM(MegatronModule):
    """A Sessa language model, or one pipeline stage of it.

    Args:
        config: the model hyper-parameters.
        megatron_config: the megatron TransformerConfig; built from `config` (and megatron's
            parallel state, initialised for a single process if needed) when omitted.
        pre_process / post_process: this stage holds the embedding / the final norm and LM head.
        layer_numbers: global indices of the blocks on this stage (default: all); block n is of
            type `config.block_types[n]`.
        init_seed: every parameter drawn by `model.init.init_weights(self, init_seed)` (layout
            independent); None, or megatron's `perform_initialization=False`, leaves the weights
            uninitialised for the caller to fill (init_weights with another seed, a checkpoint).
    """

    def __init__(self, config: ModelConfig, megatron_config=None, *, pre_process: bool = True,
                 post_process: bool = True, layer_numbers: list[int] | None = None,
                 submodules: SessaSubmodules | None = None, init_seed: int | None = 0):
        if megatron_config is None:
            ensure_model_parallel()
            megatron_config = make_megatron_config(config)
        super().__init__(megatron_config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.sessa = config
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = config.tie_embeddings
        self.input_tensor = None  # set by the pipeline schedule on non-first stages
        layer_numbers = list(range(config.num_layers)) if layer_numbers is None else list(layer_numbers)

        if pre_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                config.padded_vocab_size, config.hidden_size, init_method=uninitialised, config=megatron_config
            )
        bad = [n for n in layer_numbers if not 0 <= n < config.num_layers]
        if bad:
            raise ValueError(f"SessaLM: layer numbers {bad} outside the model's {config.num_layers} blocks")
        self.layers = nn.ModuleList(build_block(config, megatron_config, n, submodules) for n in layer_numbers)
        if post_process:
            norm = nn.LayerNorm if "S" in config.block_types else nn.RMSNorm
            self.final_norm = norm(config.hidden_size, eps=config.norm_eps, dtype=megatron_config.params_dtype)
            for param in self.final_norm.parameters():
                param.sequence_parallel = megatron_config.sequence_parallel
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, config.padded_vocab_size, config=megatron_config, init_method=uninitialised,
                bias=False, gather_output=False,
                skip_weight_param_allocation=pre_process and config.tie_embeddings,
            )
        if config.tie_embeddings and pre_process != post_process:
            # The first and last pipeline stages each hold a copy of the tied matrix. Both start equal
            # (init_weights draws them from the same seed); megatron's finalize_model_grads sums
            # their gradients over the embedding group, so every update keeps them equal.
            weight = self.shared_embedding_or_output_weight()
            weight.shared_embedding = True
            weight.shared = post_process  # counted once in the gradient norm: on the first stage
        if init_seed is not None and megatron_config.perform_initialization:
            init_weights(self, init_seed)

    def set_input_tensor(self, input_tensor):
        """Pipeline-parallel hook: the activation received from the previous stage."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The tied matrix on this stage (megatron's hook for syncing it across stages)."""
        if self.pre_process:
            return self.embedding.weight
        return self.output_layer.weight if self.post_process else None

    def output_weight(self) -> torch.Tensor | None:
        if self.pre_process and self.sessa.tie_embeddings:
            return self.embedding.weight
        return None  # the output layer owns its weight

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                caches: list[LayerCache] | None = None, *, doc_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """tokens [B, T] -> per-token loss [B, T] if labels are given, else logits [B, T, V / tp].

        With `caches` (one per layer, see `model.generation`) returns (logits, new caches).
        A stage without the LM head returns its hidden states [T, B, D] for the next stage.
        doc_ids [B, T] (packed documents, model/documents.py): position t sees only earlier
        positions of its own document, in attention and in the feedback solve; every pipeline
        stage gets the micro-batch's full-length ids. position_ids [B, T]: RoPE positions
        (None = 0..T-1; `positions_from_doc_ids` restarts them per document). Under context
        parallelism tokens / labels are this rank's piece of the sequence (rank r of the CP group:
        positions [r T/cp, (r+1) T/cp)), doc_ids / position_ids the whole sequence's.
        """
        if caches is not None and self.config.sequence_parallel:
            raise ValueError("decoding with caches needs sequence_parallel=False (one token cannot be split)")
        if caches is not None and doc_ids is not None:
            raise ValueError("SessaLM.forward: doc_ids with caches is not supported (decoding runs one document "
                             "per row); pass doc_ids only for full-sequence forwards")
        if self.pre_process:
            hidden = self.embedding(tokens).transpose(0, 1).contiguous()  # [T, B, D]
            if self.config.sequence_parallel:
                hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)  # [T / tp, B, D]
        else:
            hidden = self.input_tensor
        # this rank's positions: 1/tp of its piece under sequence parallelism, 1/cp of T under context parallelism
        full_length = (hidden.shape[0] * (self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
                       * max(1, parallel_state.get_context_parallel_world_size()))
        for name, ids in (("doc_ids", doc_ids), ("position_ids", position_ids)):
            if ids is not None:
                check_doc_ids(ids, hidden.shape[1], full_length, name)
        new_caches = []
        for i, layer in enumerate(self.layers):
            hidden, cache = layer(hidden, caches[i] if caches is not None else None, doc_ids=doc_ids,
                                  position_ids=position_ids)
            new_caches.append(cache)
        if not self.post_process:
            return hidden

        logits = self.lm_head(hidden)  # [T, B, V / tp]
        if labels is None:
            logits = logits.transpose(0, 1)  # [B, T, V / tp]
            return (logits, new_caches) if caches is not None else logits
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1)  # [B, T]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last block's output [T, B, D] -> logits [T, B, V / tp]: final norm, μP's 1/m (model.mup; the
        head has no bias, so scaling its input scales the logits), output layer."""
        hidden = self.final_norm(hidden)
        if self.sessa.mup:
            hidden = hidden * output_multiplier(self.sessa)
        logits, _ = self.output_layer(hidden, weight=self.output_weight())
        return logits

    # --- checkpointing -------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Checkpoint keys use global layer numbers, so a checkpoint reshards across pipeline stages."""
        state = {}
        for name, child in self.named_children():
            if name == "layers":
                for layer in child:
                    state.update(layer.sharded_state_dict(f"{prefix}layers.{layer.layer_number}.", sharded_offsets, metadata))
            else:  # tp_group given: else megatron marks replicated tensors as main replica on every TP rank
                state.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                                        tp_group=parallel_state.get_tensor_model_parallel_group()))
        if self.sessa.tie_embeddings and self.post_process and not self.pre_process:
            # The last stage's copy of the tied matrix is a replica of the embedding: not written
            # twice, and loaded from the embedding's data.
            state[f"{prefix}output_layer.weight"] = make_tp_sharded_tensor_for_checkpoint(
                self.output_layer.weight, f"{prefix}embedding.weight",
                replica_id=(1, 0, parallel_state.get_data_parallel_rank(with_context_parallel=True)),
                allow_shape_mismatch=True,
            )
        return state

    def load_global_state_dict(self, state_dict: dict, prefix: str = "") -> None:
        """Load a state dict keyed by global layer numbers (as saved by `sharded_state_dict`)."""
        local_of = {layer.layer_number: i for i, layer in enumerate(self.layers)}
        local = {}
        for key, value in state_dict.items():
            key = key[len(prefix):]
            if key.startswith("layers."):
                _, number, rest = key.split(".", 2)
                key = f"layers.{local_of[int(number)]}.{rest}"
            local[key] = value
        load_strictly(self, local)

    # --- accounting ---------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the full model (all tensor-parallel shards counted once)."""
        return count_parameters(self.sessa, exclude_embeddings)


def load_strictly(module: nn.Module, state_dict: dict) -> None:
    """load_state_dict that tolerates only megatron's optional `_extra_state` entries missing."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")


def count_parameters(config: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Parameters of the full model (tensor-parallel shards counted once, padded vocabulary)."""
    blocks = sum(sum(block_weight_elements(config, kind)) for kind in config.block_types)
    embeddings = config.padded_vocab_size * config.hidden_size * (1 if config.tie_embeddings else 2)
    final_norm = (2 if "S" in config.block_types else 1) * config.hidden_size  # LayerNorm or RMSNorm
    return blocks + final_norm + (0 if exclude_embeddings else embeddings)
