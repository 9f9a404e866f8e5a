"""Process-group and megatron parallel-state setup for one training process."""
import datetime
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from model.parallel import set_context_layout

from .config import ConfigError, ParallelConfig
from .watchdog import flight_recorder_env


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
    cp_rank: int = 0
    cp_size: int = 1

    @property
    def is_logger(self) -> bool:
        """The one rank that prints and writes metrics: last pipeline stage, first TP/CP/DP rank."""
        return self.pp_rank == self.pp_size - 1 and self.tp_rank == 0 and self.cp_rank == 0 and self.dp_rank == 0


def torch_env_from_slurm(environ) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR/PORT where unset) for one srun task per rank.

    Only inside an srun step (SLURM_STEP_NUM_TASKS is set there, not in the batch script) and only
    when no launcher set RANK (torchrun does). MASTER_ADDR defaults to the step's first node,
    MASTER_PORT to 20000 + job id % 20000 (launch/slurm/pretrain.sbatch exports both).
    """
    if "RANK" in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    env = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
           "LOCAL_RANK": environ["SLURM_LOCALID"]}
    if int(env["WORLD_SIZE"]) > 1:
        if "MASTER_ADDR" not in environ:
            hosts = subprocess.run(["scontrol", "show", "hostnames", environ["SLURM_STEP_NODELIST"]],
                                   capture_output=True, text=True, check=True).stdout.split()
            env["MASTER_ADDR"] = hosts[0]
        if "MASTER_PORT" not in environ:
            env["MASTER_PORT"] = str(20000 + int(environ["SLURM_JOB_ID"]) % 20000)
    return env


def init_distributed(parallel: ParallelConfig, hangs_dir: Path | None = None) -> DistEnv:
    """torchrun-style env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), one srun task per rank
    (the same derived from SLURM_*, see torch_env_from_slurm) or a single process.

    NCCL on GPUs, gloo on CPU; without a GPU megatron's CUDA assumptions are redirected to the CPU
    (see model/cpu_compat.py). Collectives time out after parallel.timeout_minutes; with `hangs_dir`
    the flight recorder is on and dumps there (pretrain/watchdog.py; variables set before are kept).
    """
    os.environ.update(torch_env_from_slurm(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # All of a node's GPUs are visible, or only this rank's (srun --gpus-per-task): then it is device 0.
        device_index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(device_index)
        device, backend = torch.device("cuda", device_index), "nccl"
    else:
        from model import cpu_compat

        cpu_compat.enable()
        device, backend = torch.device("cpu"), "gloo"
    if world_size % (parallel.tensor * parallel.pipeline * parallel.context):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x "
                          f"parallel.context = {parallel.tensor} x {parallel.pipeline} x {parallel.context}")
    if not dist.is_initialized():
        if hangs_dir is not None:
            hangs_dir.mkdir(parents=True, exist_ok=True)
            for name, value in flight_recorder_env(hangs_dir).items():
                os.environ.setdefault(name, value)
        timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            parallel.tensor, parallel.pipeline,
            virtual_pipeline_model_parallel_size=parallel.virtual_stages if parallel.virtual_stages > 1 else None,
            context_parallel_size=parallel.context, distributed_timeout_minutes=parallel.timeout_minutes,
        )
    set_context_layout(parallel.context_layout)  # the blocks and the batch split (context_piece) read it
    return DistEnv(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),  # without the context-parallel ranks: they share batches
        dp_size=parallel_state.get_data_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        cp_size=parallel_state.get_context_parallel_world_size(),
    )


def shutdown_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
