"""Process-group and megatron parallel-state setup for one training process."""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_logger(self) -> bool:
        """The one rank that prints and writes metrics: last pipeline stage, first TP/DP rank."""
        return self.pp_rank == self.pp_size - 1 and self.tp_rank == 0 and self.dp_rank == 0


def init_distributed(parallel: ParallelConfig) -> DistEnv:
    """torchrun-style env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or a single process.

    NCCL on GPUs, gloo on CPU; without a GPU megatron's CUDA assumptions are redirected to the CPU
    (see pretrain/cpu_compat.py).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        from . import cpu_compat

        cpu_compat.enable()
        device, backend = torch.device("cpu"), "gloo"
    if world_size % (parallel.tensor * parallel.pipeline):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline "
                          f"= {parallel.tensor} x {parallel.pipeline}")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(parallel.tensor, parallel.pipeline)
    return DistEnv(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def shutdown_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
