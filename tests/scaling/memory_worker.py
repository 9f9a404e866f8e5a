"""Run by torchrun from test_memory.py: the activation memory one SessaLayer keeps for backward.

At tensor-parallel size = world size, for each case of argv[2] (JSON: [{T, B, D, heads, kv_heads,
dtype, sequence_parallel}, ...]) one layer's forward: every tensor autograd saves for backward is
counted once per storage (parameters excluded), in bytes; then the backward runs. Rank 0 writes
the largest count over the ranks, per case, to argv[1].
"""
import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from model import ModelConfig, SessaLayer, megatron_config
from model import cpu_compat


def saved_bytes(layer, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of `layer(x)` (a block returning (y, cache)), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y, _ = layer(x)
    y.float().square().mean().backward()
    return sum(storages.values())


def measure(case: dict) -> int:
    dtype = getattr(torch, case["dtype"])
    config = ModelConfig(vocab_size=256, hidden_size=case["D"], num_layers=1, num_heads=case["heads"],
                         num_kv_heads=case["kv_heads"], feedback_impl="chunked", feedback_chunk_size=32)
    layer = SessaLayer(config, megatron_config(config, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                               sequence_parallel=case["sequence_parallel"]))
    rows = case["T"] // dist.get_world_size() if case["sequence_parallel"] else case["T"]
    x = torch.randn(rows, case["B"], case["D"], dtype=dtype, requires_grad=True)
    measured = torch.tensor(saved_bytes(layer, x))
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    return int(measured)


def main(out_path: str, cases: str) -> None:
    dist.init_process_group("gloo")
    cpu_compat.enable()  # sequence parallelism allocates its gather buffers on "the current device"
    parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    results = [measure(case) for case in json.loads(cases)]
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
