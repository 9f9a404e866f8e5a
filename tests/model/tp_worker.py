"""Run by torchrun from test_tensor_parallel.py: SessaLM at tensor-parallel size = world size.

For every case of tp_case.CASES (HYBRID_CASES with argv[2] == "hybrid", TP4_CASES with "tp4") writes the loss, the logits and every parameter's full gradient
(shards gathered) to argv[1].
"""
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from model import SessaLM, init_weights, megatron_config
from model.init import global_named_parameters
from model import cpu_compat
from tp_case import CASES, HYBRID_CASES, TP4_CASES, make_documents, make_tokens


def gathered_grads(model) -> dict:
    tp = dist.get_world_size()
    grads = {}
    for name, param in global_named_parameters(model):
        grad = param.grad
        if getattr(param, "tensor_model_parallel", False):
            pieces = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(pieces, grad.contiguous())
            grad = torch.cat(pieces, dim=param.partition_dim)
        elif getattr(param, "sequence_parallel", False):  # partial sums over the sequence shards
            dist.all_reduce(grad)
        grads[name] = grad
    return grads


def main(out_path: str, cases: list) -> None:
    dist.init_process_group("gloo")
    cpu_compat.enable()  # sequence parallelism allocates its gather buffers on "the current device"
    parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    results = {}
    for name, config, sequence_parallel, packed in cases:
        model = SessaLM(config, megatron_config(config, sequence_parallel=sequence_parallel, params_dtype=torch.float64))
        init_weights(model, seed=3)
        tokens, documents = make_tokens(config), make_documents(packed)
        loss = model(tokens[:, :-1], tokens[:, 1:], **documents).mean()
        loss.backward()
        with torch.no_grad():
            logits = gather_from_tensor_model_parallel_region(model(tokens[:, :-1], **documents))
        results[name] = {"loss": loss.detach(), "logits": logits, "grads": gathered_grads(model)}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], {"hybrid": HYBRID_CASES, "tp4": TP4_CASES}.get(sys.argv[2] if sys.argv[2:] else "", CASES))
