"""Hugging Face model of a Sessa language model (arXiv 2604.18580), pure PyTorch.

Self-contained (only torch and transformers): copied next to the weights of an export and loaded
with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Parameter names inside a
layer are the public reference layer's (`ln`, `W_in`, `mixer.q_proj`, `mixer.proj_fb`, ...).

Layer:  a, g = W_in(LN(x));  s = Mixer(GELU(a));  y = x + W_out(s * g)
Mixer:  f = W_o(causal attention with interleaved RoPE);  s solves s[t] = f[t] + gamma[t] *
        sum_{j<t} softmax_{j<t}(q_b[t] . k_b[j] / sqrt(D)) s[j]  (one head over the full width).
The solve is chunked (never forms T x T): per chunk of C rows, the logits against all earlier keys
(C x t), the contribution of earlier chunks' s, then the C x C unit-lower-triangular block solve.
It runs in fp32 whatever the model dtype. `generate()` decodes step by step from `SessaCache`.
Padded batches (`attention_mask` with zeros, left or right): every padding position is a document
of its own, the real tokens of a row one document, so a real token sees (in attention and in the
solve) only the row's earlier real tokens; RoPE positions count the real tokens. Each row then
gives what its prompt gives alone (Mamba-2 blocks reset their state at a document start, so their
real tokens must be contiguous: left or right padding).
μP (`query_multiplier`, `feedback_query_multiplier`, `logits_multiplier`, 1.0 without it): the queries of
the forward branch and `*` blocks, the feedback q_b and the LM head's input are multiplied as trained.
Hybrid stacks (`layer_pattern`): `S` Sessa, `*` attention, `-` SwiGLU MLP and `M` Mamba-2 blocks,
as the training recipe's model/blocks.py and model/mamba.py.
RoPE scaling (`sessa_rope_scaling`, as trained): "linear" divides the positions by the factor s; "yarn"
is YaRN as published (NTK-by-parts frequencies, ramped on the wavelength ratio; q and k times
0.1 ln s + 1).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

try:
    from .configuration_sessa import ModelConfig
except ImportError:  # imported as a top-level module
    from configuration_sessa import ModelConfig


def documents_from_mask(attention_mask):
    """attention_mask [B, L] (1 = token, 0 = padding) -> (doc_ids [B, L], positions [B, L]).

    Real tokens share document 0, padding position t is document -1 - t (alone); positions count
    the row's earlier real tokens. A position sees earlier positions of its own document only."""
    real = attention_mask.bool()
    index = torch.arange(real.shape[1], device=real.device)
    doc_ids = torch.where(real, 0, -1 - index)
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    return doc_ids, positions


def chunked_feedback_solve(q_b, k_b, f, gamma, chunk_size: int, doc_ids=None):
    """q_b, k_b [B, T, D]; f [B, T, V]; gamma [B, T] -> s [B, T, V] (fp32 arithmetic).

    doc_ids [B, T]: row t feeds back only from earlier rows of its own document."""
    out_dtype = f.dtype
    q_b, k_b, f, gamma = q_b.float(), k_b.float(), f.float(), gamma.float()
    B, T, D = q_b.shape
    scale = D ** -0.5
    s = torch.empty_like(f)
    for c0 in range(0, T, chunk_size):
        c1 = min(c0 + chunk_size, T)
        logits = torch.einsum("bik,bjk->bij", q_b[:, c0:c1], k_b[:, :c1]) * scale  # [B, C, c1]
        rows = torch.arange(c0, c1, device=f.device)[:, None]
        strict_past = torch.arange(c1, device=f.device)[None, :] < rows  # j < t
        if doc_ids is not None:
            strict_past = strict_past & (doc_ids[:, c0:c1, None] == doc_ids[:, None, :c1])  # [B, C, c1]
        logits = logits.masked_fill(~strict_past, float("-inf"))
        alpha = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # row t = 0 has no past: all zeros
        g = gamma[:, c0:c1, None]
        rhs = f[:, c0:c1] + g * (alpha[:, :, :c0] @ s[:, :c0])  # earlier chunks
        block = torch.eye(c1 - c0, device=f.device) - g * alpha[:, :, c0:c1]  # unit lower triangular
        s[:, c0:c1] = torch.linalg.solve_triangular(block, rhs, upper=False, unitriangular=True)
    return s.to(out_dtype)


def rope_inv_freq(theta, scaling, d, device):
    """[d/2] fp32 frequencies theta_i = theta^(-2i/d); yarn: (1 - gamma_i) theta_i / s + gamma_i theta_i with
    gamma_i = clamp((r_i - beta_slow) / (beta_fast - beta_slow), 0, 1), r_i = L theta_i / (2 pi)."""
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    if not scaling or scaling["rope_type"] != "yarn":
        return inv_freq
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)
    turns = scaling["original_max_position_embeddings"] * inv_freq.double() / (2 * math.pi)
    kept = ((turns - beta_slow) / (beta_fast - beta_slow)).clamp(0, 1)
    return ((1 - kept) * inv_freq.double() / scaling["factor"] + kept * inv_freq.double()).float()


def rope_positions(positions, scaling):
    """Positions as RoPE sees them: divided by the factor under linear scaling (position interpolation)."""
    return positions.float() / scaling["factor"] if scaling and scaling["rope_type"] == "linear" else positions


def rope_attention_factor(scaling):
    """YaRN multiplies q and k by sqrt(1/t) = 0.1 ln s + 1."""
    return 0.1 * math.log(scaling["factor"]) + 1.0 if scaling and scaling["rope_type"] == "yarn" else 1.0


def apply_interleaved_rope(x, positions, inv_freq):
    """Rotate pairs (2i, 2i+1) of x [B, H, T, d] by positions[t] * inv_freq[i] (in fp32); positions [T] or [B, T]."""
    angles = positions.float()[..., None] * inv_freq.float()
    if angles.dim() == 3:
        angles = angles[:, None]  # [B, 1, T, d/2]
    cos, sin = angles.cos(), angles.sin()
    x_even, x_odd = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2).to(x.dtype)


class SessaCache:
    """Per layer: Sessa blocks rotated forward keys/values [B, H_kv, t, d], feedback keys [B, t, D]
    and past s [B, t, D]; attention blocks keys/values; Mamba-2 blocks their conv inputs and SSD
    state; MLP blocks nothing. `seen` counts the cached positions."""

    def __init__(self, num_layers: int):
        self.layers = [None] * num_layers
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


class SessaMixer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        D, H, H_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_size = H, H_kv, D // H
        self.gamma_max, self.chunk_size = config.gamma_max, config.feedback_chunk_size
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, H_kv * self.head_size)
        self.v_proj = nn.Linear(D, H_kv * self.head_size)
        self.proj_fb = nn.Linear(D, 2 * D)  # rows [q_b; k_b]
        self.out_proj = nn.Linear(D, D, bias=False) if H > 1 else None  # identity for one head
        self.gamma_bias = nn.Parameter(torch.ones(()))
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        self.rope_theta, self.rope_scaling = config.rope_theta, config.sessa_rope_scaling
        self.query_multiplier, self.feedback_query_multiplier = config.query_multiplier, config.feedback_query_multiplier

    def _heads(self, x, n):  # [B, T, n*d] -> [B, n, T, d]
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_size).transpose(1, 2)

    def forward(self, a_bar, past=None, doc_ids=None, positions=None):
        """a_bar [B, T, D] -> (s [B, T, D], this layer's new cache entry).

        doc_ids [B, past + T] (see documents_from_mask) and positions [B, T]: padded batches."""
        B, T, D = a_bar.shape
        start = 0 if past is None else past[0].shape[2]
        if positions is None:
            positions = torch.arange(start, start + T, device=a_bar.device)
        # Computed here rather than held as a buffer: transformers materialises models from the meta
        # device and would leave a non-persistent buffer uninitialised.
        d = self.head_size
        inv_freq = rope_inv_freq(self.rope_theta, self.rope_scaling, d, a_bar.device)
        positions, factor = rope_positions(positions, self.rope_scaling), rope_attention_factor(self.rope_scaling)
        q = apply_interleaved_rope(self._heads(self.q_proj(a_bar), self.num_heads), positions, inv_freq) * factor
        if self.query_multiplier != 1.0:  # μP
            q = q * self.query_multiplier
        k = apply_interleaved_rope(self._heads(self.k_proj(a_bar), self.num_kv_heads), positions, inv_freq) * factor
        v = self._heads(self.v_proj(a_bar), self.num_kv_heads)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        if start == 0 and doc_ids is None:
            f = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            visible = torch.ones(T, start + T, dtype=torch.bool, device=a_bar.device).tril(start)
            if doc_ids is not None:  # [B, 1, T, start + T]; the diagonal stays: no empty row
                visible = visible & (doc_ids[:, start:, None] == doc_ids[:, None, :])[:, None]
            f = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
        f = f.transpose(1, 2).reshape(B, T, D)
        q_b, k_b = self.proj_fb(a_bar).chunk(2, dim=-1)
        if self.feedback_query_multiplier != 1.0:  # μP
            q_b = q_b * self.feedback_query_multiplier
        gamma = self.gamma_max * torch.tanh(self.gamma_bias + self.gamma_ctx(a_bar).squeeze(-1))  # [B, T]
        if past is None or past[2].shape[1] == 0:
            s = chunked_feedback_solve(q_b, k_b, f, gamma, self.chunk_size, doc_ids)
            fb_keys, states = k_b, s
        else:  # token by token against the cache: s[t] = f[t] + gamma[t] softmax(q_b[t] K_b) S
            fb_keys, states, outputs = past[2], past[3], []
            for t in range(T):
                logits = torch.einsum("bk,bjk->bj", q_b[:, t].float(), fb_keys.float()) * D ** -0.5
                if doc_ids is not None:  # this row's own document only; none visible: context 0
                    row = start + t
                    same = doc_ids[:, :row] == doc_ids[:, row:row + 1]
                    logits = logits.masked_fill(~same, float("-inf"))
                alpha = torch.softmax(logits, dim=-1)
                context = torch.einsum("bj,bjv->bv", alpha.nan_to_num(0.0) if doc_ids is not None else alpha,
                                       states.float())
                s_t = (f[:, t].float() + gamma[:, t, None].float() * context).to(f.dtype)
                outputs.append(s_t)
                fb_keys = torch.cat((fb_keys, k_b[:, t:t + 1]), dim=1)
                states = torch.cat((states, s_t[:, None]), dim=1)
            s = torch.stack(outputs, dim=1)
        if self.out_proj is not None:  # W_o commutes with the solve (it acts on features)
            s = self.out_proj(s)
        return s, (k, v, fb_keys, states)


class SessaLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.hidden_size
        self.ln = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.W_in = nn.Linear(D, 2 * D)  # rows [a; g]
        self.mixer = SessaMixer(config)
        self.W_out = nn.Linear(D, D)

    def forward(self, x, past=None, doc_ids=None, positions=None):
        a, g = self.W_in(self.ln(x)).chunk(2, dim=-1)
        s, entry = self.mixer(F.gelu(a), past, doc_ids, positions)  # exact (erf) GELU; the gate has no activation
        return x + self.W_out(s * g), entry


def apply_half_rope(x, positions, inv_freq):
    """Rotate-half RoPE (pairs i, i + d/2) of x [B, H, T, d] (in fp32); positions [T] or [B, T]."""
    angles = positions.float()[..., None] * inv_freq.float()
    if angles.dim() == 3:
        angles = angles[:, None]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class AttentionBlock(nn.Module):
    """`*` of layer_pattern: x + o_proj(attention(RoPE(q), RoPE(k), v)) of RMSNorm(x); no biases."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, H, H_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_size = H, H_kv, D // H
        self.rope_theta, self.rope_scaling = config.rope_theta, config.sessa_rope_scaling
        self.query_multiplier = config.query_multiplier
        self.norm = nn.RMSNorm(D, eps=config.layer_norm_eps)
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, H_kv * self.head_size, bias=False)
        self.v_proj = nn.Linear(D, H_kv * self.head_size, bias=False)
        self.out_proj = nn.Linear(D, D, bias=False)

    def forward(self, x, past=None, doc_ids=None, positions=None):
        B, T, D = x.shape
        start = 0 if past is None else past[0].shape[2]
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device)
        d = self.head_size
        inv_freq = rope_inv_freq(self.rope_theta, self.rope_scaling, d, x.device)
        positions, factor = rope_positions(positions, self.rope_scaling), rope_attention_factor(self.rope_scaling)
        h = self.norm(x)
        q = apply_half_rope(self.q_proj(h).view(B, T, -1, d).transpose(1, 2), positions, inv_freq) * factor
        if self.query_multiplier != 1.0:  # μP
            q = q * self.query_multiplier
        k = apply_half_rope(self.k_proj(h).view(B, T, -1, d).transpose(1, 2), positions, inv_freq) * factor
        v = self.v_proj(h).view(B, T, -1, d).transpose(1, 2)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        visible = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        if doc_ids is not None:
            visible = visible & (doc_ids[:, start:, None] == doc_ids[:, None, :])[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
        return x + self.out_proj(out.transpose(1, 2).reshape(B, T, D)), (k, v)


class MLPBlock(nn.Module):
    """`-` of layer_pattern: x + down(SiLU(gate(h)) * up(h)), h = RMSNorm(x); no biases."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.norm = nn.RMSNorm(D, eps=config.layer_norm_eps)
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.out_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x, past=None, doc_ids=None, positions=None):
        h = self.norm(x)
        return x + self.out_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), None


def ssd_scan(x, dt, A, B, C, chunk_size: int, state=None, doc_ids=None):
    """Mamba-2's chunked SSD scan with one B/C group (fp32 arithmetic at least): x [b, T, h, P], dt [b, T, h],
    A [h], B / C [b, T, N], state [b, h, N, P] or None (zeros) -> (y [b, T, h, P], final state), both
    in the compute dtype.

    Per head S_t = exp(dt_t A) S_{t-1} + dt_t B_t^T x_t, y_t = C_t S_t; within a chunk the quadratic
    form, across chunks the carried state. doc_ids [b, T] (contiguous documents): the state resets
    at each document start; the initial state belongs to the document of position 0."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(compute) for t in (x, dt, A, B, C))
    state = None if state is None else state.to(compute)
    ys = []
    for c0 in range(0, x.shape[1], chunk_size):
        c1 = min(c0 + chunk_size, x.shape[1])
        xc, dtc, Bc, Cc = x[:, c0:c1], dt[:, c0:c1], B[:, c0:c1], C[:, c0:c1]
        cum = (dtc * A).cumsum(dim=1)  # [b, q, h]: log of the decay from the chunk start
        visible = torch.ones(c1 - c0, c1 - c0, dtype=torch.bool, device=x.device).tril()[None]
        if doc_ids is not None:
            docs = doc_ids[:, c0:c1]
            visible = visible & (docs[:, :, None] == docs[:, None, :])
            same_as_before = (docs == doc_ids[:, max(c0 - 1, 0), None]).to(compute)  # the carried state's document
        diff = (cum[:, :, None] - cum[:, None]).masked_fill(~visible[..., None], float("-inf"))
        scores = torch.einsum("bin,bjn->bij", Cc, Bc)[..., None] * torch.exp(diff) * dtc[:, None]  # [b, i, j, h]
        y = torch.einsum("bijh,bjhp->bihp", scores, xc)
        if state is not None:
            decayed = torch.exp(cum) * (same_as_before[..., None] if doc_ids is not None else 1.0)
            y = y + torch.einsum("bin,bih,bhnp->bihp", Cc, decayed, state)
        to_end = torch.exp(cum[:, -1:] - cum) * dtc
        carry = torch.exp(cum[:, -1])
        if doc_ids is not None:
            to_end = to_end * (docs == docs[:, -1:]).to(compute)[..., None]  # the last document only
            carry = carry * same_as_before[:, -1, None]
        update = torch.einsum("bjn,bjh,bjhp->bhnp", Bc, to_end, xc)
        state = update if state is None else carry[..., None, None] * state + update
        ys.append(y)
    return torch.cat(ys, dim=1), state


class CausalConv(nn.Module):
    """Depthwise causal conv over time with bias: out[t] = bias + sum_k weight[:, k] u[t - K + 1 + k]."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.bias = nn.Parameter(torch.empty(channels))

    def forward(self, u, past, window_docs=None):
        """u [B, T, C], past [B, K - 1, C]; window_docs [B, K - 1 + T] the documents of past and u:
        a position sees only inputs of its own document. -> (out [B, T, C], the last K - 1 inputs)."""
        K = self.weight.shape[1]
        full = torch.cat((past, u), dim=1)
        windows = full.unfold(1, K, 1)  # [B, T, C, K]
        if window_docs is not None:
            same = window_docs.unfold(1, K, 1) == window_docs[:, K - 1:, None]  # [B, T, K]
            windows = windows * same.to(u.dtype)[:, :, None]
        return torch.einsum("btck,ck->btc", windows, self.weight) + self.bias, full[:, full.shape[1] - (K - 1):]


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's channels (fp32 arithmetic at least)."""

    def __init__(self, width: int, head_size: int, eps: float):
        super().__init__()
        self.head_size, self.eps = head_size, eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, y):  # [..., heads, P]
        compute = torch.promote_types(y.dtype, torch.float32)
        y32 = y.to(compute)
        normed = y32 * torch.rsqrt(y32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(compute).view(-1, self.head_size)).to(y.dtype)


class MambaBlock(nn.Module):
    """`M` of layer_pattern: x + out_proj(RMSNorm_per_head(y * SiLU(z))), y = SSD(u, dt, A, B, C) + D u,
    with u, B, C = SiLU(causal conv(...)) and z, u, B, C, dt from RMSNorm(x); one B/C group."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, P, N, K = config.hidden_size, config.mamba_head_size, config.mamba_state_size, config.mamba_conv_kernel
        E = config.mamba_expand * D
        self.head_size, self.chunk_size, self.kernel = P, config.mamba_chunk_size, K
        self.norm = nn.RMSNorm(D, eps=config.layer_norm_eps)
        self.z_proj = nn.Linear(D, E, bias=False)
        self.x_proj = nn.Linear(D, E, bias=False)
        self.B_proj = nn.Linear(D, N, bias=False)
        self.C_proj = nn.Linear(D, N, bias=False)
        self.dt_proj = nn.Linear(D, E // P, bias=False)
        self.conv_x, self.conv_B, self.conv_C = CausalConv(E, K), CausalConv(N, K), CausalConv(N, K)
        self.A_log = nn.Parameter(torch.zeros(E // P))
        self.dt_bias = nn.Parameter(torch.zeros(E // P))
        self.D = nn.Parameter(torch.ones(E // P))
        self.out_norm = HeadRMSNorm(E, P, config.layer_norm_eps)
        self.out_proj = nn.Linear(E, D, bias=False)

    def forward(self, x, past=None, doc_ids=None, positions=None):
        """x [B, T, D] -> (out, (conv inputs u, B, C [B, K - 1, channels], SSD state [B, h, N, P]));
        doc_ids [B, past + T] (see documents_from_mask)."""
        batch, T, _ = x.shape
        h = self.norm(x)
        z, u, B, C, dt = (proj(h) for proj in (self.z_proj, self.x_proj, self.B_proj, self.C_proj, self.dt_proj))
        if past is None:
            convs = [v.new_zeros(batch, self.kernel - 1, v.shape[-1]) for v in (u, B, C)]
            state = None
        else:
            convs, state = past[:3], past[3]
        window_docs = docs = None
        if doc_ids is not None:
            start = doc_ids.shape[1] - T
            docs = doc_ids[:, start:]
            lead = doc_ids[:, max(start - self.kernel + 1, 0):start]  # the cached inputs' documents
            filler = docs[:, :1].expand(-1, self.kernel - 1 - lead.shape[1])  # zero inputs: any document
            window_docs = torch.cat((filler, lead, docs), dim=1)
            if state is not None and start > 0:  # a document starting at the first new token forgets the state
                state = state * (doc_ids[:, start] == doc_ids[:, start - 1]).to(state.dtype)[:, None, None, None]
        (u, u_past), (B, B_past), (C, C_past) = (conv(v, p, window_docs) for conv, v, p in
                                                 zip((self.conv_x, self.conv_B, self.conv_C), (u, B, C), convs))
        u, B, C = F.silu(u), F.silu(B), F.silu(C)
        heads = u.view(batch, T, -1, self.head_size)
        compute = torch.promote_types(u.dtype, torch.float32)
        dt = F.softplus((dt + self.dt_bias).to(compute))
        y, state = ssd_scan(heads, dt, -torch.exp(self.A_log.to(compute)), B, C, self.chunk_size, state, docs)
        y = (y.to(compute) + heads.to(compute) * self.D.to(compute)[:, None]).to(u.dtype)
        y = self.out_norm(y * F.silu(z).view_as(y))
        return x + self.out_proj(y.reshape(batch, T, -1)), (u_past, B_past, C_past, state)


BLOCKS = {"S": SessaLayer, "*": AttentionBlock, "-": MLPBlock, "M": MambaBlock}


@dataclass
class SessaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: SessaCache | None = None
    hidden_states: tuple | None = None
    last_hidden_state: torch.Tensor | None = None


class SessaPreTrainedModel(PreTrainedModel):
    config_class = ModelConfig
    base_model_prefix = "model"
    _no_split_modules = ["SessaLayer", "AttentionBlock", "MLPBlock", "MambaBlock"]

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.RMSNorm, HeadRMSNorm)):
            nn.init.ones_(module.weight)
        elif isinstance(module, CausalConv):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MambaBlock):  # A = -1, dt = softplus(0), D = 1
            nn.init.zeros_(module.A_log)
            nn.init.zeros_(module.dt_bias)
            nn.init.ones_(module.D)
        elif isinstance(module, SessaMixer):
            nn.init.ones_(module.gamma_bias)


class SessaModel(SessaPreTrainedModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        pattern = getattr(config, "layer_pattern", "") or "S" * config.num_hidden_layers
        self.layers = nn.ModuleList(BLOCKS[kind](config) for kind in pattern)
        norm = nn.LayerNorm if "S" in pattern else nn.RMSNorm  # as the native model
        self.norm = norm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, cache=None, use_cache=False, output_hidden_states=False, inputs_embeds=None,
                attention_mask=None, **kwargs):
        """attention_mask [B, past + T] with zeros: a padded batch (see documents_from_mask)."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = SessaCache(len(self.layers))
        doc_ids = positions = None
        if attention_mask is not None and not bool(attention_mask.all()):
            past = 0 if cache is None else cache.get_seq_length()
            if attention_mask.shape != (hidden.shape[0], past + hidden.shape[1]):
                raise ValueError(f"attention_mask must be [batch, past + new tokens] = "
                                 f"[{hidden.shape[0]}, {past + hidden.shape[1]}], got {list(attention_mask.shape)}")
            doc_ids, positions = documents_from_mask(attention_mask)
            positions = positions[:, past:]
        all_hidden = [hidden] if output_hidden_states else None  # embedding output, then each layer's
        for i, layer in enumerate(self.layers):
            hidden, entry = layer(hidden, cache.layers[i] if cache is not None else None, doc_ids, positions)
            if cache is not None:
                cache.layers[i] = entry
            if output_hidden_states:
                all_hidden.append(hidden)
        if cache is not None:
            cache.seen += hidden.shape[1]
        return SessaOutput(last_hidden_state=self.norm(hidden), cache=cache if use_cache else None,
                           hidden_states=tuple(all_hidden) if output_hidden_states else None)


class SessaForCausalLM(SessaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = SessaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # SessaCache holds the feedback keys and past outputs too

    def prepare_inputs_for_generation(self, input_ids, cache=None, use_cache=True, attention_mask=None, **kwargs):
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]  # only the tokens not yet in the cache
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache, "attention_mask": attention_mask}

    def forward(self, input_ids=None, attention_mask=None, cache=None, labels=None, use_cache=None,
                output_hidden_states=None, return_dict=None, inputs_embeds=None, logits_to_keep=0, **kwargs):
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        outputs = self.model(input_ids, cache=cache, use_cache=bool(use_cache),
                             output_hidden_states=output_hidden_states, inputs_embeds=inputs_embeds,
                             attention_mask=attention_mask)
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if self.config.logits_multiplier != 1.0:  # μP: the trained model scales the head's input
            hidden = hidden * self.config.logits_multiplier
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return SessaOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)
