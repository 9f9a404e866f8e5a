"""The one name/layout table between our native parameters, the Hugging Face export and the
public reference layer (SESSA.md §3). It drives export (native -> target) and import (target ->
native) alike.

Native names are the global names of `SessaLM.sharded_state_dict` without the `model.` prefix
(`layers.{n}.mixer.q_proj.weight`, n = global layer number). Every rule says:
  - `native`: our tensors, concatenated along dim 0 in this order when there are several (the
    reference fuses W_in = [in_proj; gate_proj] and proj_fb = [fb_q_proj; fb_k_proj]);
  - `tp`: how the training layout splits them across tensor-parallel ranks (0: rows, column-
    parallel; 1: columns, row-parallel; None: replicated). The torch_dist reader reassembles the
    global tensor from the checkpoint's own shard metadata; `check_tp_layout` checks that the
    pieces the ranks wrote are split exactly like this;
  - `vocab`: the rows are the (padded) vocabulary: padding is stripped on export, re-added (zeros)
    on import.

The Transformer arm (`model.arch: transformer`) exports to Hugging Face Llama (`LlamaForCausalLM`,
no remote code). Its megatron checkpoints stack every layer parameter along a leading layer dim
(`decoder.layers.self_attention.linear_qkv.weight` [L, ...], pipeline stages owning slices of it);
a rule with `stacked` takes layer n of it and, with `part`, one piece of a fused tensor (q/k/v of
linear_qkv, gate/up of linear_fc1). Export only: importing a Llama checkpoint is not supported.
"""
from dataclasses import asdict, dataclass

from model.config import ModelConfig, RopeScaling
from model.reference import REFERENCE_LAYOUT, ROPE_BUFFER

HF_LAYER_PREFIX = "model.layers.{n}."


@dataclass(frozen=True)
class Rule:
    target: str  # HF name ({n} = layer); for a layer rule, the part after the prefix is the reference name
    native: tuple[str, ...]  # our names ({n} = layer), fused along dim 0 in this order
    tp: int | None  # tensor-parallel split dim in training (None = replicated)
    vocab: bool = False  # rows are the padded vocabulary
    layer: bool = False
    block: str | None = "S"  # a layer rule applies to the blocks of this layer_pattern character; None: all
    stacked: bool = False  # the native tensor holds every layer along dim 0 (megatron GPTModel checkpoints)
    part: str | None = None  # q/k/v of a fused linear_qkv, gate/up of a fused linear_fc1


_TP_DIM = {  # our layer parameter -> tensor-parallel split dimension
    "norm.weight": None, "norm.bias": None,
    "in_proj.weight": 0, "in_proj.bias": 0, "gate_proj.weight": 0, "gate_proj.bias": 0,
    "mixer.q_proj.weight": 0, "mixer.q_proj.bias": 0, "mixer.k_proj.weight": 0, "mixer.k_proj.bias": 0,
    "mixer.v_proj.weight": 0, "mixer.v_proj.bias": 0,
    "mixer.fb_q_proj.weight": 0, "mixer.fb_q_proj.bias": 0, "mixer.fb_k_proj.weight": 0, "mixer.fb_k_proj.bias": 0,
    "mixer.out_proj.weight": 1, "mixer.gamma_bias": None, "mixer.gamma_ctx.weight": None,
    "out_proj.weight": 1, "out_proj.bias": None,
}


_HYBRID_BLOCKS = {  # attention and MLP blocks of model.layer_pattern: parameter -> tensor-parallel dim
    "*": {"norm.weight": None, "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0, "out_proj.weight": 1},
    "-": {"norm.weight": None, "gate_proj.weight": 0, "up_proj.weight": 0, "out_proj.weight": 1},
    "M": {"norm.weight": None, **dict.fromkeys(("z_proj.weight", "x_proj.weight", "B_proj.weight", "C_proj.weight",
                                                "dt_proj.weight", "conv_x.weight", "conv_x.bias", "conv_B.weight",
                                                "conv_B.bias", "conv_C.weight", "conv_C.bias", "A_log", "dt_bias", "D",
                                                "out_norm.weight"), 0), "out_proj.weight": 1},  # model/mamba.py
}


_LLAMA_LAYER = {  # Llama layer name -> (megatron stacked name, part, tensor-parallel dim within a layer)
    "input_layernorm.weight": ("self_attention.linear_qkv.layer_norm_weight", None, None),
    "self_attn.q_proj.weight": ("self_attention.linear_qkv.weight", "q", 0),
    "self_attn.k_proj.weight": ("self_attention.linear_qkv.weight", "k", 0),
    "self_attn.v_proj.weight": ("self_attention.linear_qkv.weight", "v", 0),
    "self_attn.o_proj.weight": ("self_attention.linear_proj.weight", None, 1),
    "post_attention_layernorm.weight": ("mlp.linear_fc1.layer_norm_weight", None, None),
    "mlp.gate_proj.weight": ("mlp.linear_fc1.weight", "gate", 0),
    "mlp.up_proj.weight": ("mlp.linear_fc1.weight", "up", 0),
    "mlp.down_proj.weight": ("mlp.linear_fc2.weight", None, 1),
}
# megatron's stacked checkpoint names -> a one-process TransformerLM's `state_dict()` layer names
_MEGATRON_LAYER_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                         "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def layer_numbers(config: ModelConfig, rule: Rule) -> list:
    """The global layer numbers a rule expands over ([None] for a rule outside the layers)."""
    if not rule.layer:
        return [None]
    return [n for n, kind in enumerate(config.block_types) if rule.block in (None, kind)]


def _llama_rules(config: ModelConfig) -> list[Rule]:
    table = [Rule("model.embed_tokens.weight", ("embedding.word_embeddings.weight",), tp=0, vocab=True)]
    table += [Rule(HF_LAYER_PREFIX + hf, (f"decoder.layers.{ours}",), tp=tp, layer=True, block=None, stacked=True,
                   part=part) for hf, (ours, part, tp) in _LLAMA_LAYER.items()]
    table.append(Rule("model.norm.weight", ("decoder.final_layernorm.weight",), tp=None))
    if not config.tie_embeddings:
        table.append(Rule("lm_head.weight", ("output_layer.weight",), tp=0, vocab=True))
    return table


def rules(config: ModelConfig) -> list[Rule]:
    """Every tensor of the model, in export order (embedding, layers 0..N-1, final norm, head)."""
    if config.arch == "transformer":
        return _llama_rules(config)
    table = [Rule("model.embed_tokens.weight", ("embedding.weight",), tp=0, vocab=True)]
    for ref, parts in REFERENCE_LAYOUT.items():
        if ref == "mixer.out_proj.weight" and config.num_heads == 1:
            continue  # W_o is the identity for a single head
        dims = {_TP_DIM[p] for p in parts}
        table.append(Rule(HF_LAYER_PREFIX + ref, tuple(f"layers.{{n}}.{p}" for p in parts), tp=dims.pop(), layer=True))
    for block, names in _HYBRID_BLOCKS.items():  # model/blocks.py: the same names in the HF modeling file
        table += [Rule(HF_LAYER_PREFIX + name, (f"layers.{{n}}.{name}",), tp=tp, layer=True, block=block)
                  for name, tp in names.items()]
    table.append(Rule("model.norm.weight", ("final_norm.weight",), tp=None))
    if "S" in config.block_types:  # a LayerNorm; stacks without Sessa blocks end in an RMSNorm
        table.append(Rule("model.norm.bias", ("final_norm.bias",), tp=None))
    if not config.tie_embeddings:
        table.append(Rule("lm_head.weight", ("output_layer.weight",), tp=0, vocab=True))
    return table


@dataclass(frozen=True)
class Entry:
    """One concrete target tensor: where it comes from and what shape it has."""
    target: str
    native: tuple[str, ...]
    shape: tuple[int, ...]
    vocab: bool
    layer: int | None
    stacked: bool = False
    part: str | None = None


def _part_rows(config: ModelConfig, part: str | None, rows: int) -> int:
    """Rows of one piece of a fused megatron tensor (see model.transformer.split_qkv)."""
    if part is None:
        return rows
    if part in ("gate", "up"):
        return rows // 2
    return (config.num_heads if part == "q" else config.num_kv_heads) * config.head_size


def entries(config: ModelConfig, native_shapes: dict[str, tuple[int, ...]]) -> list[Entry]:
    """The table expanded over layers, with target shapes from the native shapes."""
    out = []
    for rule in rules(config):
        for n in layer_numbers(config, rule):
            native = tuple(p.format(n=n) for p in rule.native)
            missing = [p for p in native if p not in native_shapes]
            if missing:
                raise KeyError(f"the checkpoint has no tensor model.{missing[0]} (needed for {rule.target.format(n=n)}); "
                               f"was it saved by this recipe's SessaLM with this config?")
            shapes = [native_shapes[p][1:] if rule.stacked else native_shapes[p] for p in native]
            shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]
            if rule.vocab:
                shape = (config.vocab_size, *shape[1:])
            if rule.part is not None:
                shape = (_part_rows(config, rule.part, shape[0]), *shape[1:])
            out.append(Entry(rule.target.format(n=n), native, tuple(shape), rule.vocab, n, rule.stacked, rule.part))
    # Layer-major (embedding, layer 0, layer 1, ..., final norm, head): a shard reads few layers.
    stage = {"model.embed_tokens.weight": 0}
    return sorted(out, key=lambda e: (stage.get(e.target, 1 if e.layer is not None else 2), e.layer or 0))


def check_tp_layout(config: ModelConfig, chunks: dict, tp_size: int) -> None:
    """The saved pieces of each tensor match the table: tp_size equal pieces along its split dim,
    or one full piece for a replicated tensor (megatron writes one replica only)."""
    for rule in rules(config):
        for n in layer_numbers(config, rule):
            for name in (p.format(n=n) for p in rule.native):
                if rule.stacked:  # the ranks' pieces of layer n, its dims counted without the layer dim
                    pieces = [(o[1:], z[1:]) for o, z in chunks[name] if o[0] <= n < o[0] + z[0]]
                else:
                    pieces = sorted(chunks[name])
                expected = tp_size if rule.tp is not None and tp_size > 1 else 1
                if rule.part in ("gate", "up"):
                    expected *= 2  # megatron saves the SwiGLU halves of each rank as separate pieces
                dims = {d for offsets, _ in pieces for d, o in enumerate(offsets) if o}
                if len(pieces) != expected or (expected > 1 and dims != {rule.tp}):
                    raise ValueError(f"model.{name} was saved as {len(pieces)} piece(s) split along dims "
                                     f"{sorted(dims)}, but the name table expects {expected} along dim {rule.tp} "
                                     f"at tensor-parallel size {tp_size}; update checkpoints/layout.py")


def native_names(config: ModelConfig) -> list[str]:
    """Every native tensor the model has (global names; a stacked tensor once)."""
    names = [p.format(n=n) for rule in rules(config) for n in layer_numbers(config, rule) for p in rule.native]
    stacked = {p for rule in rules(config) if rule.stacked for p in rule.native}
    return [name for i, name in enumerate(names) if name not in stacked or names.index(name) == i]


def unstacked_state_dict(state: dict, config: ModelConfig) -> dict:
    """A megatron Transformer-arm checkpoint's tensors (stacked layers) -> a one-process
    TransformerLM's `state_dict()` names (`decoder.layers.{n}....`)."""
    out = {}
    for name, tensor in state.items():
        rest = name.removeprefix("decoder.layers.")
        if rest == name or rest.split(".", 1)[0].isdigit():
            out[name] = tensor
            continue
        for n in range(config.num_layers):
            out[f"decoder.layers.{n}.{_MEGATRON_LAYER_NAMES.get(rest, rest)}"] = tensor[n]
    return out


def reference_name(target: str, layer: int) -> str:
    """HF layer name -> the public reference layer's parameter name."""
    return target.removeprefix(HF_LAYER_PREFIX.format(n=layer))


def fuse(entry: Entry, tensors: dict[str, "torch.Tensor"], config: ModelConfig):
    import torch

    from model.transformer import split_qkv

    parts = [tensors[p][entry.layer] if entry.stacked else tensors[p] for p in entry.native]
    full = torch.cat(parts) if len(parts) > 1 else parts[0]
    if entry.vocab:
        full = full[: config.vocab_size]  # strip the vocabulary padding rows
    if entry.part in ("q", "k", "v"):
        full = split_qkv(full, config)["qkv".index(entry.part)]
    elif entry.part in ("gate", "up"):
        full = full.chunk(2)[("gate", "up").index(entry.part)]
    return full


def split(entry: Entry, tensor, config: ModelConfig) -> dict[str, "torch.Tensor"]:
    """Inverse of `fuse`: a target tensor -> our native tensors (vocabulary padded with zeros)."""
    import torch

    if entry.stacked:
        raise ValueError("importing a Llama (Transformer-arm) export is not supported; train from the megatron "
                         "checkpoint it was exported from")
    if tuple(tensor.shape) != entry.shape:
        raise ValueError(f"{entry.target} has shape {tuple(tensor.shape)}, the config expects {entry.shape}; "
                         f"export and config disagree (hidden_size, heads, vocab_size?)")
    if entry.vocab:
        pad = config.padded_vocab_size - config.vocab_size
        tensor = torch.cat((tensor, tensor.new_zeros(pad, *tensor.shape[1:]))) if pad else tensor
    if len(entry.native) == 1:
        return {entry.native[0]: tensor.clone()}
    return {p: piece.clone() for p, piece in zip(entry.native, tensor.chunk(len(entry.native)))}


# --- configs ---------------------------------------------------------------------------------------
MAMBA_FIELDS = ("mamba_state_size", "mamba_head_size", "mamba_expand", "mamba_conv_kernel", "mamba_chunk_size")


def hf_config_dict(config: ModelConfig, dtype, eos_id) -> dict:
    """The HF config.json of an export (field names of checkpoints/hf/configuration_sessa.py, or
    LlamaConfig's for the Transformer arm)."""
    import torch

    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    if config.arch == "transformer":
        from model.transformer import llama_config_dict

        return {**llama_config_dict(config), "bos_token_id": eos_id, "eos_token_id": eos_id, "dtype": dtype_name}
    return {
        "model_type": "sessa", "architectures": ["SessaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sessa.ModelConfig",
                     "AutoModel": "modeling_sessa.SessaModel",
                     "AutoModelForCausalLM": "modeling_sessa.SessaForCausalLM"},
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "gamma_max": config.gamma_max,
        "layer_norm_eps": config.norm_eps, "rope_theta": config.rope_base,
        "sessa_rope_scaling": None if config.rope_scaling is None else asdict(config.rope_scaling),
        "feedback_chunk_size": config.feedback_chunk_size, "tie_word_embeddings": config.tie_embeddings,
        "layer_pattern": config.layer_pattern, "intermediate_size": config.ffn_hidden_size,
        **{name: getattr(config, name) for name in MAMBA_FIELDS},
        "bos_token_id": eos_id, "eos_token_id": eos_id,
        "dtype": dtype_name,
    }


def model_fields_from_hf(hf: dict) -> dict:
    """The ModelConfig shape fields an HF config.json implies."""
    return {"vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
            "num_heads": hf["num_attention_heads"], "num_kv_heads": hf["num_key_value_heads"],
            "gamma_max": hf["gamma_max"], "norm_eps": hf["layer_norm_eps"], "rope_base": hf["rope_theta"],
            "rope_scaling": RopeScaling(**hf["sessa_rope_scaling"]) if hf.get("sessa_rope_scaling") else None,
            "tie_embeddings": hf["tie_word_embeddings"], "layer_pattern": hf.get("layer_pattern", ""),
            **({"ffn_hidden_size": hf["intermediate_size"]} if hf.get("intermediate_size") else {}),
            **{name: hf[name] for name in MAMBA_FIELDS if name in hf}}


__all__ = ["Rule", "Entry", "rules", "entries", "native_names", "unstacked_state_dict", "check_tp_layout",
           "reference_name", "fuse", "split",
           "ROPE_BUFFER", "hf_config_dict", "model_fields_from_hf"]
