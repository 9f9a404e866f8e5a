"""Run by torchrun from test_transformer.py: TransformerLM at tensor-parallel size = world size.

For every case of tp_case.CASES (with arch "transformer") writes the loss, the logits, every
parameter's full gradient (shards gathered) and, without sequence parallelism, greedy cached
generation to argv[1].
"""
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from test_transformer import tp_cases
from tp_case import make_documents, make_tokens

from model.generation import generate
from model.transformer import TransformerLM, init_model_weights, transformer_megatron_config
from model import cpu_compat


def gathered_grads(model) -> dict:
    tp = dist.get_world_size()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if getattr(param, "tensor_model_parallel", False):
            pieces = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(pieces, grad.contiguous())
            grad = torch.cat(pieces, dim=param.partition_dim)
            if name.endswith("linear_fc1.weight"):  # megatron holds [gate_r; up_r] per rank
                halves = [piece.chunk(2) for piece in pieces]
                grad = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        elif getattr(param, "sequence_parallel", False):  # partial sums over the sequence shards
            dist.all_reduce(grad)
        grads[name] = grad
    return grads


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    cpu_compat.enable()  # sequence parallelism allocates its gather buffers on "the current device"
    parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    results = {}
    for name, config, sequence_parallel, packed in tp_cases():
        megatron_config = transformer_megatron_config(config, sequence_parallel=sequence_parallel,
                                                      params_dtype=torch.float64)
        model = TransformerLM(config, megatron_config)
        init_model_weights(model, seed=3)
        tokens, documents = make_tokens(config), make_documents(packed)
        loss = model(tokens[:, :-1], tokens[:, 1:], **documents).mean()
        loss.backward()
        with torch.no_grad():
            logits = gather_from_tensor_model_parallel_region(model(tokens[:, :-1], **documents))
        results[name] = {"loss": loss.detach(), "logits": logits, "grads": gathered_grads(model)}
        if not sequence_parallel:
            results[name]["generated"] = generate(model, tokens[:, :5], 6, temperature=0)
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
