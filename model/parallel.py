"""Bridges from ModelConfig to megatron-core: parallel state and the megatron config object."""
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from kernels.feedback_solve.context_parallel import CONTEXT_LAYOUTS, context_positions

from .config import ModelConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ensure_model_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """Initialise torch.distributed and megatron's parallel state if nobody has yet.

    A plain single process (no torchrun) gets a world of size 1 on an in-memory store, so the
    megatron layers run unchanged on CPU.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)


_context_layout = "contiguous"


def set_context_layout(layout: str) -> None:
    """Which positions each context-parallel rank holds (`parallel.context_layout`), for every block
    and for the batch split (pretrain.batches.context_piece): "contiguous" or "zigzag"
    (kernels/feedback_solve/context_parallel.py). Process-wide, like megatron's parallel state."""
    global _context_layout
    if layout not in CONTEXT_LAYOUTS:
        raise ValueError(f"context layout must be one of {CONTEXT_LAYOUTS}, got {layout!r}")
    _context_layout = layout


def context_layout() -> str:
    return _context_layout


def context_parallel_group():
    """megatron's context-parallel group when it has more than one rank, else None."""
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_context_parallel_world_size() > 1:
        return parallel_state.get_context_parallel_group()
    return None


def local_positions(length: int, device=None) -> torch.Tensor:
    """[length] int64: the sequence positions of this rank's `length` positions (0..length-1 without
    context parallelism; under it this CP rank's piece in the current layout)."""
    if context_parallel_group() is None:
        return torch.arange(length, device=device)
    size = parallel_state.get_context_parallel_world_size()
    return context_positions(length * size, size, parallel_state.get_context_parallel_rank(), _context_layout, device)


def megatron_config(config: ModelConfig, *, sequence_parallel: bool = False, **overrides) -> TransformerConfig:
    """The megatron TransformerConfig the parallel layers and schedules read.

    Weights are created on the CPU and drawn at construction by `model.init.init_weights`, every
    full tensor from a per-parameter seed so the initialisation does not depend on the layout;
    `perform_initialization=False` skips that draw for a caller that initialises or loads them.
    """
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    config.check_tensor_parallel(tp_size)
    dtype = TORCH_DTYPES[config.dtype]
    fields = dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        num_query_groups=config.num_kv_heads,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=max(1, parallel_state.get_context_parallel_world_size()),
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=True,
        cuda_graph_scope=[],  # megatron's default "full" is deprecated in favour of [] (the same: whole layer)
    )
    return TransformerConfig(**(fields | overrides))
