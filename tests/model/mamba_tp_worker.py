"""Run by torchrun from test_mamba.py: writes a torch_dist checkpoint of CHECKPOINT_CONFIG (seed 3)
at tensor-parallel size = world size into argv[1]."""
import sys

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from model import ModelConfig, SessaLM, cpu_compat

CHECKPOINT_CONFIG = ModelConfig(vocab_size=120, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                                layer_pattern="SM*M", ffn_hidden_size=48, feedback_impl="chunked",
                                mamba_state_size=8, mamba_head_size=16, mamba_chunk_size=8)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    cpu_compat.enable()  # dist_checkpointing synchronises "the current CUDA device" before writing
    parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    model = SessaLM(CHECKPOINT_CONFIG, init_seed=3)
    dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
