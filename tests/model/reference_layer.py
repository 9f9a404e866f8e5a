"""An independent, plain-PyTorch transcription of the public reference layer (SESSA.md §1-3).

Written from the spec with the reference's parameter names: fused W_in and proj_fb, W_o applied
before the dense T x T triangular solve. The layer's constructor has the public reference's signature
(`SessaLayer(D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_flash=False,
use_forward_rope=True, gamma_max=0.999)`; RoPE base fixed at 10000), so a `--to reference` export's
config.json constructs it as it would the reference. Used only as a parity oracle in tests.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.reference import REFERENCE_LAYOUT, ROPE_BUFFER

# The public reference constructor's arguments, in order (ReferenceLayer below has its signature).
REFERENCE_LAYER_ARGS = ("D", "n_heads", "n_kv_heads", "max_len", "ln_eps", "use_flash", "use_forward_rope", "gamma_max")


def reference_state_dict(layer) -> dict[str, torch.Tensor]:
    """One SessaLayer (tensor-parallel size 1) -> ReferenceLayer's state dict (fused W_in and proj_fb)."""
    ours = {name: p.detach() for name, p in layer.named_parameters()}
    result = {ref: torch.cat([ours[part] for part in parts]) if len(parts) > 1 else ours[parts[0]].clone()
              for ref, parts in REFERENCE_LAYOUT.items() if parts[0] in ours}
    result[ROPE_BUFFER] = layer.mixer.rope_inv_freq.clone()
    return result


class ReferenceMixer(nn.Module):
    def __init__(self, D, H, H_kv, gamma_max, use_forward_rope=True, rope_base=10000.0):
        super().__init__()
        self.use_forward_rope = use_forward_rope
        self.D, self.H, self.H_kv, self.d, self.gamma_max = D, H, H_kv, D // H, gamma_max
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, H_kv * self.d)
        self.v_proj = nn.Linear(D, H_kv * self.d)
        self.proj_fb = nn.Linear(D, 2 * D)
        self.out_proj = nn.Linear(D, D, bias=False) if H > 1 else None
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        self.register_buffer("rope_inv_freq", rope_base ** (-torch.arange(0, self.d, 2).float() / self.d))

    def rope(self, x):  # x [B, heads, T, d], interleaved pairs
        T = x.shape[2]
        ang = torch.arange(T, dtype=torch.float64)[:, None] * self.rope_inv_freq.double()[None]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    def forward(self, a):  # a [B, T, D]
        B, T, D = a.shape
        q = self.q_proj(a).view(B, T, self.H, self.d).transpose(1, 2)
        k = self.k_proj(a).view(B, T, self.H_kv, self.d).transpose(1, 2)
        v = self.v_proj(a).view(B, T, self.H_kv, self.d).transpose(1, 2)
        if self.use_forward_rope:
            q, k = self.rope(q), self.rope(k)
        rep = self.H // self.H_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ k.transpose(-1, -2) / self.d**0.5
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        f = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
        f = f.transpose(1, 2).reshape(B, T, D)
        if self.out_proj is not None:
            f = self.out_proj(f)
        q_b, k_b = self.proj_fb(a).chunk(2, dim=-1)
        logits = q_b @ k_b.transpose(1, 2) / D**0.5
        strict = torch.ones(T, T, dtype=torch.bool).tril(-1)
        alpha = torch.nan_to_num(torch.softmax(logits.masked_fill(~strict, float("-inf")), -1))
        gamma = self.gamma_max * torch.tanh(self.gamma_bias + self.gamma_ctx(a).squeeze(-1))
        system = torch.eye(T, dtype=a.dtype) - gamma[..., None] * alpha
        return torch.linalg.solve_triangular(system, f, upper=False, unitriangular=True)


class ReferenceLayer(nn.Module):
    def __init__(self, D, n_heads=1, n_kv_heads=None, max_len=None, ln_eps=1e-5, use_flash=False,
                 use_forward_rope=True, gamma_max=0.999):
        super().__init__()  # max_len (preallocated masks) and use_flash (flash-attn on CUDA) change no result
        self.ln = nn.LayerNorm(D, eps=ln_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = ReferenceMixer(D, n_heads, n_kv_heads or n_heads, gamma_max, use_forward_rope)
        self.W_out = nn.Linear(D, D)

    def forward(self, x):  # [B, T, D]
        a, g = self.W_in(self.ln(x)).chunk(2, dim=-1)
        s = self.mixer(F.gelu(a))
        return x + self.W_out(s * g)
