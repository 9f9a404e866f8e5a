"""`M` of model.layer_pattern: a pre-norm Mamba-2 block (Dao & Gu 2024; megatron-core's MambaMixer)
on megatron column/row-parallel linears, with the chunked PyTorch SSD scan of kernels/ssd/chunk.py.

    h = RMSNorm(x);  z, u, B, C, dt_raw = z/x/B/C/dt_proj(h)     (five linears, no biases)
    u, B, C = SiLU(causal depthwise conv(u, B, C))                (kernel mamba_conv_kernel, with bias)
    dt = softplus(dt_raw + dt_bias);  A = -exp(A_log)             (per head)
    y = SSD(u, dt, A, B, C) + D * u                               (heads of P = mamba_head_size, state N)
    out = x + out_proj(RMSNorm_per_head(y * SiLU(z)))

One B/C group (ngroups = 1) shared by every head. Tensor parallelism: z, u, dt, u's conv, A_log,
dt_bias, D and the gated norm are sharded by heads; B and C (and their convs) by state rows: each
rank projects and convolves its rows, then all-gathers them (B·T·2N per block), like Sessa's
feedback keys. out_proj is row-parallel. The gated norm normalises each head on its own (megatron's
RMSNormGated with one group per head), so it never spans ranks and TP=2 equals TP=1 exactly.
Packed documents (doc_ids [B, T]): the conv sees only its own document and the SSD state resets at
each document start. The scan runs in fp32 (at least) whatever the model dtype. Under context
parallelism (x this CP rank's positions, doc_ids full length) each piece's conv reads the previous
piece's last K - 1 inputs and the SSD state crosses pieces by kernels/ssd/context_parallel.py;
resets at document starts are the same as in one process.

mamba-ssm's Triton scan and causal-conv1d's CUDA conv (and megatron's MambaMixer, which needs them)
are not used: their CUDA builds are not installable here, and this PyTorch path is the one the
hybrid-stack issue allows when they are absent.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import nn
from torch.profiler import record_function

from kernels.attention.context_parallel import gather_sequence
from kernels.feedback_solve.context_parallel import context_segments
from kernels.ssd import ssd
from kernels.ssd.context_parallel import ssd_context_parallel

from .blocks import PreNormBlock
from .config import ModelConfig
from .init import init_weights
from .parallel import context_layout, context_parallel_group
from .profile_ranges import MAMBA_SCAN


@dataclass
class MambaCache:
    """Decoding state of an `M` block: the last K - 1 inputs of each conv and the SSD state."""

    conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # u, B, C: [B, K - 1, channels / tp]
    state: torch.Tensor  # [B, heads / tp, N, P], fp32 or wider


def _sharded(*shape, dtype) -> nn.Parameter:
    """A parameter split along dim 0 across tensor-parallel ranks (model.init slices it)."""
    param = nn.Parameter(torch.empty(*shape, dtype=dtype))
    set_tensor_model_parallel_attributes(param, True, 0, 1)
    return param


class CausalConv(nn.Module):
    """Depthwise causal conv over time: out[t] = bias + sum_k weight[:, k] * u[t - K + 1 + k]."""

    def __init__(self, channels: int, kernel: int, dtype):
        super().__init__()
        self.weight = _sharded(channels, kernel, dtype=dtype)  # [channels / tp, K]
        self.bias = _sharded(channels, dtype=dtype)

    def forward(self, u, past, doc_ids, past_doc_ids=None):
        """u [B, T, C], past [B, K - 1, C] (the inputs before u; zeros at a sequence start),
        doc_ids [B, T] or None (a position reads only inputs of its own document), past_doc_ids
        [B, K - 1]: the documents of `past` (None: past is zeros or a decoding cache, never masked)
        -> (out [B, T, C], the last K - 1 inputs)."""
        K, T = self.weight.shape[1], u.shape[1]
        full = torch.cat((past, u), dim=1)  # [B, K - 1 + T, C]
        if doc_ids is not None and past_doc_ids is not None:
            full_ids = torch.cat((past_doc_ids, doc_ids), dim=1)
        # K shifted multiply-adds rather than a conv kernel: autograd keeps only `full` (an unfolded
        # [B, T, C, K] einsum keeps K copies), and per-lag masks handle packed documents.
        out = self.bias
        for k in range(K):
            lag = K - 1 - k
            tap = full[:, k:k + T] * self.weight[:, k]
            if doc_ids is not None and lag:
                if past_doc_ids is None:
                    same = torch.ones_like(doc_ids, dtype=torch.bool)  # before the sequence: zeros
                    same[:, lag:] = doc_ids[:, lag:] == doc_ids[:, :-lag]
                else:
                    same = doc_ids == full_ids[:, k:k + T]
                tap = tap * same[..., None].to(tap.dtype)
            out = out + tap
        return out, full[:, full.shape[1] - (K - 1):]


def context_parallel_conv(conv: CausalConv, u, doc_ids, group, layout: str):
    """`conv` over this context-parallel rank's pieces of u [B, L, C] (sequence positions as in
    kernels.feedback_solve.context_parallel.context_segments): each piece reads the last K - 1
    inputs of the piece before it, all-gathered (B (K - 1) C per piece; gradients reduce-scattered
    back); doc_ids full length [B, CP * L] or None."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    segments = context_segments(u.shape[1] * size, size, rank, layout)
    piece, reach = segments[0][1] - segments[0][0], conv.weight.shape[1] - 1
    if reach > piece:
        raise ValueError(f"model.mamba_conv_kernel {reach + 1} reaches past a whole context-parallel piece of "
                         f"{piece} positions: use longer sequences or a smaller parallel.context")
    tails = torch.cat([u[:, (j + 1) * piece - reach : (j + 1) * piece] for j in range(len(segments))], dim=1)
    all_tails = gather_sequence(tails, group, 1, layout) if reach else tails  # [B, pieces (K - 1), C]
    outs = []
    for j, (start, end) in enumerate(segments):
        i = start // piece  # the piece's index in the sequence
        # zeros before the sequence, taken from the gathered tails so that every rank's gather is in
        # its graph (the backward reduce-scatter is a collective every rank must call)
        past = all_tails[:, (i - 1) * reach : i * reach] if i else all_tails[:, :reach] * 0
        ids = past_ids = None
        if doc_ids is not None:
            ids, past_ids = doc_ids[:, start:end], (doc_ids[:, start - reach : start] if i else None)
        outs.append(conv(u[:, j * piece : (j + 1) * piece], past, ids, past_ids)[0])
    return torch.cat(outs, dim=1)


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's P channels (in fp32 at least), weight [heads * P / tp]."""

    def __init__(self, width: int, head_size: int, eps: float, dtype):
        super().__init__()
        self.head_size, self.eps = head_size, eps
        self.weight = _sharded(width, dtype=dtype)

    def forward(self, y):
        """y [..., heads / tp, P] -> the same shape."""
        compute = torch.promote_types(y.dtype, torch.float32)
        y32 = y.to(compute)
        normed = y32 * torch.rsqrt(y32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(compute).view(-1, self.head_size)).to(y.dtype)


class MambaBlock(PreNormBlock):
    """`M`: pre-norm Mamba-2 mixer and residual (heads sharded across TP ranks)."""

    def __init__(self, config: ModelConfig, megatron_config, layer_number: int = 0, *, init_seed: int | None = 0):
        super().__init__(config, megatron_config, layer_number)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        D, E, N, P = config.hidden_size, config.mamba_inner_size, config.mamba_state_size, config.mamba_head_size
        dtype, K = megatron_config.params_dtype, config.mamba_conv_kernel
        self.local_heads = config.mamba_heads // tp
        self.z_proj = self.column(D, E)
        self.x_proj = self.column(D, E)
        self.B_proj = self.column(D, N)
        self.C_proj = self.column(D, N)
        self.dt_proj = self.column(D, config.mamba_heads)
        self.conv_x = CausalConv(E // tp, K, dtype)
        self.conv_B = CausalConv(N // tp, K, dtype)
        self.conv_C = CausalConv(N // tp, K, dtype)
        self.A_log = _sharded(self.local_heads, dtype=dtype)
        self.dt_bias = _sharded(self.local_heads, dtype=dtype)
        self.D = _sharded(self.local_heads, dtype=dtype)
        self.out_norm = HeadRMSNorm(E // tp, P, config.norm_eps, dtype)
        self.out_proj = self.row(E, D)
        if init_seed is not None and megatron_config.perform_initialization:
            init_weights(self, init_seed)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """megatron's default saves plain parameters as replicated: the per-head vectors, convs and
        gated norm are split along dim 0 like the linears' rows."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        vectors = {name: param for name, param in self.named_parameters()
                   if getattr(param, "tensor_model_parallel", False) and not name.endswith("_proj.weight")}
        state.update(make_sharded_tensors_for_checkpoint(
            vectors, prefix, dict.fromkeys(vectors, 0), sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"]))
        return state

    def empty_cache(self, batch_size: int, dtype, device) -> MambaCache:
        K, N_local = self.sessa.mamba_conv_kernel, self.conv_B.weight.shape[0]
        conv = tuple(torch.zeros(batch_size, K - 1, channels, dtype=dtype, device=device)
                     for channels in (self.conv_x.weight.shape[0], N_local, N_local))
        state = torch.zeros(batch_size, self.local_heads, self.sessa.mamba_state_size, self.sessa.mamba_head_size,
                            dtype=torch.promote_types(dtype, torch.float32), device=device)
        return MambaCache(conv, state)

    def forward(self, x: torch.Tensor, cache: MambaCache | None = None, *, doc_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """x [T, B, D] -> (x + Mamba-2 mixer, updated cache or None); position_ids are not needed."""
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids with a decoding cache: pass doc_ids only without caches")
        h = self._normed_input(x)

        def project(linear):
            out, _ = linear(h)
            return out.transpose(0, 1)  # [B, T, width / tp]

        z, u, B, C, dt_raw = map(project, (self.z_proj, self.x_proj, self.B_proj, self.C_proj, self.dt_proj))
        cp_group = context_parallel_group()
        if cp_group is not None:
            if cache is not None:
                raise ValueError("a decoding cache under context parallelism: decode with context_parallel_size 1")
            u, B, C = (context_parallel_conv(conv, v, doc_ids, cp_group, context_layout())
                       for conv, v in zip((self.conv_x, self.conv_B, self.conv_C), (u, B, C)))
        else:
            if cache is None:
                zeros = [v.new_zeros(v.shape[0], self.sessa.mamba_conv_kernel - 1, v.shape[2]) for v in (u, B, C)]
                past, initial_state = zeros, None
            else:
                past, initial_state = cache.conv, cache.state
            (u, u_past), (B, B_past), (C, C_past) = (
                conv(v, p, doc_ids) for conv, v, p in zip((self.conv_x, self.conv_B, self.conv_C), (u, B, C), past))
        u, B, C = F.silu(u), F.silu(B), F.silu(C)
        # Every rank's heads read all of B and C: gather the rows, and (backward) sum the heads' partial gradients.
        B, C = (copy_to_tensor_model_parallel_region(gather_from_tensor_model_parallel_region(v)) for v in (B, C))

        batch, T = u.shape[:2]
        compute = torch.promote_types(u.dtype, torch.float32)
        heads = u.view(batch, T, self.local_heads, -1).to(compute)
        dt = F.softplus((dt_raw + self.dt_bias).to(compute))
        A = -torch.exp(self.A_log.to(compute))
        with record_function(MAMBA_SCAN):
            if cp_group is not None:
                y = ssd_context_parallel(heads, dt, A, B[:, :, None].to(compute), C[:, :, None].to(compute), cp_group,
                                         self.sessa.mamba_chunk_size, doc_ids, context_layout())
            else:
                y, state = ssd(heads, dt, A, B[:, :, None].to(compute), C[:, :, None].to(compute),
                               chunk_size=self.sessa.mamba_chunk_size, initial_state=initial_state, doc_ids=doc_ids)
        y = (y + heads * self.D.to(compute)[:, None]).to(u.dtype)
        y = self.out_norm(y * F.silu(z).view_as(y))
        out, _ = self.out_proj(y.reshape(batch, T, -1).transpose(0, 1))
        new_cache = MambaCache((u_past, B_past, C_past), state) if cache is not None else None
        return x + out, new_cache
