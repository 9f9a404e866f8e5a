"""What the attention-bearing blocks share: heads out of a column-parallel projection and RoPE.

RoPE is megatron-core's (`rope_utils.apply_rotary_pos_emb`, unfused), as in the Transformer arm;
only the angles are built here, from explicit positions ([T], or [B, T] for packed documents).
Sessa's mixer rotates interleaved pairs (2i, 2i+1), as the public reference does; the `*`
attention block rotates halves (i, i + d/2), as Llama and the Transformer arm do.
"""
import dataclasses

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb


def rope_inv_freq(head_size: int, base: float) -> torch.Tensor:
    """[head_size / 2] fp32 frequencies base^(-2i / head_size)."""
    return base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)


def rope_config(megatron_config, interleaved: bool):
    """The megatron config `apply_rope` reads: pair layout set, unfused (positions are explicit)."""
    return dataclasses.replace(megatron_config, rotary_interleaved=interleaved, apply_rope_fusion=False)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, config) -> torch.Tensor:
    """x [B, H, T, d] rotated by angles positions[t] * inv_freq[i], computed in at least fp32;
    positions [T] or [B, T]; `config` from `rope_config` (its pair layout)."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    angles = positions.to(compute_dtype)[..., None] * inv_freq.to(compute_dtype)  # [(B,) T, d/2]
    if angles.dim() == 3:
        angles = angles[:, None]  # [B, 1, T, d/2]: the same positions for every head
    # megatron's freqs hold each angle once per element of its pair
    freqs = angles.repeat_interleave(2, dim=-1) if config.rotary_interleaved else torch.cat((angles, angles), dim=-1)
    return apply_rotary_pos_emb(x.to(compute_dtype), freqs, config).to(x.dtype)


def split_heads(projection, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A column-parallel projection of x [T, B, D] as heads [B, heads, T, d]."""
    out, _ = projection(x)  # [T, B, heads * d]
    T, B = out.shape[:2]
    return out.view(T, B, num_heads, -1).permute(1, 2, 0, 3)
