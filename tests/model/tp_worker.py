"""Run by torchrun from test_tensor_parallel.py: a SessaLM at tensor-parallel size = world size.

Writes the loss, the logits and every parameter's full gradient (shards gathered) to argv[1].
"""
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from model import SessaLM, init_weights
from model.init import global_named_parameters
from tp_case import CONFIG, make_tokens


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    model = SessaLM(CONFIG).double()
    init_weights(model, seed=3)
    model.double()
    tokens = make_tokens()
    loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens[:, :-1]))
    grads = {}
    tp = dist.get_world_size()
    for name, param in global_named_parameters(model):
        grad = param.grad
        if getattr(param, "tensor_model_parallel", False):
            pieces = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(pieces, grad.contiguous())
            grad = torch.cat(pieces, dim=param.partition_dim)
        grads[name] = grad
    if dist.get_rank() == 0:
        torch.save({"loss": loss.detach(), "logits": logits, "grads": grads}, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
