"""What the attention-bearing blocks share: heads out of a column-parallel projection and RoPE.

RoPE is megatron-core's (`rope_utils.apply_rotary_pos_emb`, unfused), as in the Transformer arm;
only the angles are built here, from explicit positions ([T], or [B, T] for packed documents).
Sessa's mixer rotates interleaved pairs (2i, 2i+1), as the public reference does; the `*`
attention block rotates halves (i, i + d/2), as Llama and the Transformer arm do.

`model.rope_scaling` (docs/model.md "RoPE base and scaling") is applied here, once, for every
block and for the Transformer arm (its RoPE table, model/transformer.py): "linear" divides the
positions by the factor; "yarn" changes the frequencies (`rope_inv_freq`) and scales the rotated
q and k by `rope_attention_factor`.
"""
import dataclasses
import math

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from .config import RopeScaling


def rope_inv_freq(head_size: int, base: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """[head_size / 2] fp32 frequencies theta_i = base^(-2i / head_size), then `scale_inv_freq`."""
    return scale_inv_freq(base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size), scaling)


def scale_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling | None) -> torch.Tensor:
    """Plain fp32 frequencies theta_i as they are, or with yarn scaling YaRN's NTK-by-parts frequencies
    (1 - gamma) theta_i / s + gamma theta_i, where gamma ramps linearly in r_i = L / wavelength_i =
    L theta_i / (2 pi) from 0 at r_i <= beta_slow to 1 at r_i >= beta_fast (computed in fp64)."""
    if scaling is None or scaling.rope_type != "yarn":
        return inv_freq
    theta = inv_freq.double()
    turns = scaling.original_max_position_embeddings * theta / (2 * math.pi)  # r_i
    kept = ((turns - scaling.beta_slow) / (scaling.beta_fast - scaling.beta_slow)).clamp(0, 1)  # gamma
    return ((1 - kept) * theta / scaling.factor + kept * theta).to(inv_freq.dtype)


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """What q and k are multiplied by after the rotation: YaRN's sqrt(1/t) = 0.1 ln s + 1, else 1."""
    return 0.1 * math.log(scaling.factor) + 1.0 if scaling is not None and scaling.rope_type == "yarn" else 1.0


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: RopeScaling | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., d/2] angles positions[..., t] * inv_freq[i] in `dtype`; linear scaling divides the positions
    by its factor first (position interpolation)."""
    positions = positions.to(dtype)
    if scaling is not None and scaling.rope_type == "linear":
        positions = positions / scaling.factor
    return positions[..., None] * inv_freq.to(dtype)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """What `apply_rope` needs besides the frequencies: megatron's config (pair layout, unfused) and the
    scaling (model.rope_scaling)."""
    megatron: object
    scaling: RopeScaling | None = None

    @property
    def rotary_interleaved(self) -> bool:
        return self.megatron.rotary_interleaved


def rope_config(megatron_config, interleaved: bool, scaling: RopeScaling | None = None) -> RopeConfig:
    """The configuration `apply_rope` reads: pair layout set, unfused (positions are explicit), scaling."""
    return RopeConfig(dataclasses.replace(megatron_config, rotary_interleaved=interleaved, apply_rope_fusion=False),
                      scaling)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, config: RopeConfig) -> torch.Tensor:
    """x [B, H, T, d] rotated by `rope_angles` (computed in at least fp32) and scaled by
    `rope_attention_factor`; positions [T] or [B, T]; `config` from `rope_config`."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    angles = rope_angles(positions, inv_freq, config.scaling, compute_dtype)  # [(B,) T, d/2]
    if angles.dim() == 3:
        angles = angles[:, None]  # [B, 1, T, d/2]: the same positions for every head
    # megatron's freqs hold each angle once per element of its pair
    freqs = angles.repeat_interleave(2, dim=-1) if config.rotary_interleaved else torch.cat((angles, angles), dim=-1)
    # megatron multiplies cos and sin by mscale (1.0 leaves plain RoPE bitwise as it was)
    return apply_rotary_pos_emb(x.to(compute_dtype), freqs, config.megatron,
                                mscale=rope_attention_factor(config.scaling)).to(x.dtype)


def split_heads(projection, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A column-parallel projection of x [T, B, D] as heads [B, heads, T, d]."""
    out, _ = projection(x)  # [T, B, heads * d]
    T, B = out.shape[:2]
    return out.view(T, B, num_heads, -1).permute(1, 2, 0, 3)
