"""The public reference layer's names, constructor arguments and RoPE buffer (SESSA.md §3), for the
`--to reference` export (checkpoints/layout.py, checkpoints/export.py).

The reference fuses W_in (rows [a; g]) and proj_fb (rows [q_b; k_b]); we keep the halves as
separate tensor-parallel linears so they shard and reshard independently.
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


def reference_layer_kwargs(config: ModelConfig) -> dict:
    """Keyword arguments of the public reference constructor for one layer of `config`:
    `SessaLayer(**reference_layer_kwargs(config))`. Raises ValueError for a model it cannot express."""
    if config.rope_base != REFERENCE_ROPE_BASE:
        raise ValueError(f"the reference layer fixes the RoPE base at {REFERENCE_ROPE_BASE:g} but this model uses "
                         f"rope_base {config.rope_base:g}; export --to hf or --to safetensors instead")
    if config.rope_scaling is not None:
        raise ValueError(f"the reference layer has plain RoPE but this model uses rope_scaling "
                         f"{config.rope_scaling.rope_type!r}; export --to hf or --to safetensors instead")
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
