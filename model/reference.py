"""Conversion between our layer parameters and the public reference's names (SESSA.md §3).

The reference fuses W_in (rows [a; g]) and proj_fb (rows [q_b; k_b]); we keep the halves as
separate tensor-parallel linears so they shard and reshard independently. Tensor-parallel size 1.
"""
import torch

from .config import ModelConfig

# reference name -> our parameter names, concatenated along dim 0 in this order.
REFERENCE_LAYOUT: dict[str, tuple[str, ...]] = {
    "ln.weight": ("norm.weight",),
    "ln.bias": ("norm.bias",),
    "W_in.weight": ("in_proj.weight", "gate_proj.weight"),
    "W_in.bias": ("in_proj.bias", "gate_proj.bias"),
    "mixer.q_proj.weight": ("mixer.q_proj.weight",),
    "mixer.q_proj.bias": ("mixer.q_proj.bias",),
    "mixer.k_proj.weight": ("mixer.k_proj.weight",),
    "mixer.k_proj.bias": ("mixer.k_proj.bias",),
    "mixer.v_proj.weight": ("mixer.v_proj.weight",),
    "mixer.v_proj.bias": ("mixer.v_proj.bias",),
    "mixer.proj_fb.weight": ("mixer.fb_q_proj.weight", "mixer.fb_k_proj.weight"),
    "mixer.proj_fb.bias": ("mixer.fb_q_proj.bias", "mixer.fb_k_proj.bias"),
    "mixer.out_proj.weight": ("mixer.out_proj.weight",),  # absent when num_heads == 1
    "mixer.gamma_bias": ("mixer.gamma_bias",),
    "mixer.gamma_ctx.weight": ("mixer.gamma_ctx.weight",),
    "W_out.weight": ("out_proj.weight",),
    "W_out.bias": ("out_proj.bias",),
}
ROPE_BUFFER = "mixer.rope_inv_freq"
REFERENCE_ROPE_BASE = 10000.0  # fixed in the reference layer: its constructor has no argument for it
# The public reference constructor: SessaLayer(D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5,
# use_flash=False, use_forward_rope=True, gamma_max=0.999).
REFERENCE_LAYER_ARGS = ("D", "n_heads", "n_kv_heads", "max_len", "ln_eps", "use_flash", "use_forward_rope", "gamma_max")


def reference_layer_kwargs(config: ModelConfig) -> dict:
    """Keyword arguments of the public reference constructor for one layer of `config`:
    `SessaLayer(**reference_layer_kwargs(config))`. Raises ValueError for a model it cannot express."""
    if config.rope_base != REFERENCE_ROPE_BASE:
        raise ValueError(f"the reference layer fixes the RoPE base at {REFERENCE_ROPE_BASE:g} but this model uses "
                         f"rope_base {config.rope_base:g}; export --to hf or --to safetensors instead")
    others = sorted(set(config.block_types) - {"S"})
    if others:
        raise ValueError(f"the reference format holds only Sessa layers but model.layer_pattern "
                         f"{config.layer_pattern!r} has {others} blocks (attention '*', MLP '-'); "
                         "export --to hf or --to safetensors instead")
    if not config.feedback:
        raise ValueError("the reference layer always has the feedback branch but this model has feedback: false; "
                         "export --to hf or --to safetensors instead")
    return {"D": config.hidden_size, "n_heads": config.num_heads, "n_kv_heads": config.num_kv_heads,
            "ln_eps": config.norm_eps, "gamma_max": config.gamma_max}


def reference_inv_freq(head_size: int) -> torch.Tensor:
    """The reference layer's RoPE buffer, as it computes it: 10000^(-2i/d), i < d/2 (fp32)."""
    return REFERENCE_ROPE_BASE ** (-2 * torch.arange(head_size // 2, dtype=torch.float32) / head_size)


def _expected_names(config: ModelConfig) -> list[str]:
    return [name for name in REFERENCE_LAYOUT if config.num_heads > 1 or name != "mixer.out_proj.weight"]


def to_reference_state_dict(layer) -> dict[str, torch.Tensor]:
    """One SessaLayer (tensor-parallel size 1) -> the reference's state dict for that layer."""
    ours = {name: p.detach() for name, p in layer.named_parameters()}
    result = {ref: torch.cat([ours[part] for part in parts]) if len(parts) > 1 else ours[parts[0]].clone()
              for ref, parts in REFERENCE_LAYOUT.items() if parts[0] in ours}
    result[ROPE_BUFFER] = layer.mixer.rope_inv_freq.clone()
    return result


def from_reference_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The reference's state dict of one layer -> our layer's parameters (for `load_state_dict(strict=False)`)."""
    missing = [name for name in _expected_names(config) if name not in state_dict]
    if missing:
        raise ValueError(f"reference state dict lacks {missing}; was it saved for another config (num_heads)?")
    D = config.hidden_size
    result = {}
    for ref in _expected_names(config):
        parts = REFERENCE_LAYOUT[ref]
        tensor = state_dict[ref]
        if len(parts) > 1 and tensor.shape[0] != len(parts) * D:
            raise ValueError(f"reference {ref} has {tensor.shape[0]} rows, expected {len(parts) * D} "
                             f"for hidden_size {D}")
        for part, piece in zip(parts, tensor.chunk(len(parts)) if len(parts) > 1 else (tensor,)):
            result[part] = piece.clone()
    return result
