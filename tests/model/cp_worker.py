"""Context-parallel cases, and the torchrun worker (4 gloo processes) that runs them for
test_context_parallel.py.

Each rank writes {case name: {"rank": rank in the case's CP group, tensor name: this rank's piece}}
for the cases it took part in to argv[1]/rank<r>.pt: CP=4 cases on all four ranks, CP=2 cases
alternately on ranks {0, 1} and {2, 3}; then megatron's parallel state at CP=2 (x DP=2) and a
SessaLayer per CP group (LAYER_CASES), and at TP=2 x CP=2 (TP_CP_CASE), whose "grads" are the full
parameter gradients (summed over CP, shards gathered over TP).
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Case:
    name: str
    cp: int
    length: int  # positions per rank
    chunk_size: int = 4  # the attention's query tile in the attention cases
    documents: tuple | None = None  # per row: document lengths; a negative length is -1 padding
    dtype: torch.dtype = torch.float64
    batch: int = 2


# Pieces of 10 positions with chunks of 4 or 3 (and 16 > 10): pieces end mid-chunk (in a 1-row chunk).
# Documents straddle piece boundaries, start exactly on one, last one token, end in -1 padding;
# in "docs_aligned" no row of piece 1 sees piece 0 (no message is sent), in "docs_cp4" piece 3 sees
# only piece 2.
SOLVE_CASES = [
    Case("plain_cp2", 2, 10),
    Case("plain_cp2_big_chunk", 2, 10, chunk_size=16),
    Case("docs_cp2", 2, 10, documents=((3, 1, 9, 7), (10, 6, 4))),
    Case("docs_aligned_cp2", 2, 10, documents=((4, 6, 10), (10, 10))),
    Case("plain_cp4", 4, 10),
    Case("docs_cp4", 4, 10, chunk_size=3, documents=((5, 1, 17, 2, 15), (12, 14, 10, -4))),
    Case("fp32_docs_cp4", 4, 7, chunk_size=3, documents=((5, 1, 17, 5), (12, 10, -6)), dtype=torch.float32),
]
ATTENTION_CASES = [
    Case("attn_plain_cp2", 2, 10),
    Case("attn_docs_cp2", 2, 10, documents=((3, 1, 9, 7), (10, 6, 4))),
    Case("attn_plain_cp4", 4, 10, chunk_size=16),
    Case("attn_docs_cp4", 4, 10, documents=((5, 1, 17, 2, 15), (12, 14, 10, -4))),
]
# SessaLayer at CP=2 (megatron's CP group): one case per pair of ranks.
LAYER_CASES = [
    Case("layer_plain_cp2", 2, 10),
    Case("layer_docs_cp2", 2, 10, chunk_size=3, documents=((3, 1, 9, 7), (10, 6, 4))),
]
TP_CP_CASE = Case("layer_docs_tp2_cp2", 2, 10, chunk_size=3, documents=((3, 1, 9, 7), (10, 6, 4)))
K, V = 6, 5  # feedback key and value widths (K != V: V may be a tensor-parallel slice)
HEADS, KV_HEADS, HEAD_SIZE = 4, 2, 4


def doc_ids(case: Case) -> torch.Tensor | None:
    """[B, T] document ids of the case, or None."""
    if case.documents is None:
        return None
    rows = []
    for lengths in case.documents:
        ids = [torch.full((abs(n),), i if n > 0 else -1) for i, n in enumerate(lengths)]
        rows.append(torch.cat(ids))
    return torch.stack(rows)


def solve_inputs(case: Case) -> dict:
    """Full-length inputs of the feedback solve and the upstream gradient of s."""
    gen = torch.Generator().manual_seed(5)
    T = case.cp * case.length

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(case.dtype)

    return {"q_b": rand(case.batch, T, K), "k_b": rand(case.batch, T, K), "f": rand(case.batch, T, V),
            "gamma": 0.999 * torch.tanh(rand(case.batch, T)), "grad": rand(case.batch, T, V)}


def attention_inputs(case: Case) -> dict:
    """Full-length q [B, H, T, d], k/v [B, H_kv, T, d] and the upstream gradient of the output."""
    gen = torch.Generator().manual_seed(7)
    T = case.cp * case.length

    def rand(heads):
        return torch.randn(case.batch, heads, T, HEAD_SIZE, generator=gen, dtype=case.dtype)

    return {"q": rand(HEADS), "k": rand(KV_HEADS), "v": rand(KV_HEADS), "grad": rand(HEADS)}


def layer_config(case: Case):
    from model import ModelConfig

    return ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2,
                       feedback_impl="chunked", feedback_chunk_size=case.chunk_size)


def layer_inputs(case: Case) -> dict:
    """Full-length x [T, B, D] and the upstream gradient of the layer's output; forward() keywords."""
    from model.documents import positions_from_doc_ids

    gen = torch.Generator().manual_seed(9)
    shape = (case.cp * case.length, case.batch, layer_config(case).hidden_size)
    ids = doc_ids(case)
    keywords = {} if ids is None else {"doc_ids": ids, "position_ids": positions_from_doc_ids(ids)}
    return {"x": torch.randn(*shape, generator=gen, dtype=torch.float64),
            "grad": torch.randn(*shape, generator=gen, dtype=torch.float64), "keywords": keywords}


def run_solve(case: Case, group) -> dict:
    from kernels.feedback_solve.context_parallel import feedback_solve_context_parallel

    rank = dist.get_rank(group)
    piece = slice(rank * case.length, (rank + 1) * case.length)
    inputs = {name: x[:, piece].clone().requires_grad_(name != "grad") for name, x in solve_inputs(case).items()}
    s = feedback_solve_context_parallel(inputs["q_b"], inputs["k_b"], inputs["f"], inputs["gamma"], group,
                                        case.chunk_size, doc_ids=doc_ids(case))
    (s * inputs["grad"]).sum().backward()
    return {"s": s.detach()} | {name: x.grad for name, x in inputs.items() if name != "grad"}


def run_attention(case: Case, group) -> dict:
    from kernels.attention import context_parallel_attention

    rank = dist.get_rank(group)
    piece = slice(rank * case.length, (rank + 1) * case.length)
    inputs = {name: x[:, :, piece].clone().requires_grad_(name != "grad")
              for name, x in attention_inputs(case).items()}
    out = context_parallel_attention(inputs["q"], inputs["k"], inputs["v"], group, doc_ids=doc_ids(case),
                                     tile=case.chunk_size)
    (out * inputs["grad"]).sum().backward()
    return {"out": out.detach()} | {name: x.grad for name, x in inputs.items() if name != "grad"}


def run_layer(case: Case) -> dict:
    from megatron.core import parallel_state

    from model import SessaLayer, megatron_config

    group, tp_group = parallel_state.get_context_parallel_group(), parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank(group)
    config = layer_config(case)
    layer = SessaLayer(config, megatron_config(config, params_dtype=torch.float64), init_seed=4)
    inputs = layer_inputs(case)
    piece = slice(rank * case.length, (rank + 1) * case.length)
    x = inputs["x"][piece].clone().requires_grad_()
    y, _ = layer(x, **inputs["keywords"])
    (y * inputs["grad"][piece]).sum().backward()
    grads = {}
    for name, param in layer.named_parameters():
        grad = param.grad
        dist.all_reduce(grad, group=group)  # each CP rank's positions give a partial sum
        if getattr(param, "tensor_model_parallel", False):
            shards = [torch.empty_like(grad) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(shards, grad.contiguous(), group=tp_group)
            grad = torch.cat(shards, dim=param.partition_dim)
        grads[name] = grad
    return {"y": y.detach(), "x": x.grad, "grads": grads}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 4, "cp_worker runs with 4 processes"
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    results = {}
    cp2_index = 0
    for case, run in [(c, run_solve) for c in SOLVE_CASES] + [(c, run_attention) for c in ATTENTION_CASES]:
        if case.cp == 4:
            group = dist.group.WORLD
        else:  # CP=2 cases alternate between the two pairs of ranks
            group = pairs[cp2_index % 2]
            cp2_index += 1
            if rank // 2 != pairs.index(group):
                continue
        results[case.name] = {"rank": dist.get_rank(group)} | run(case, group)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=2)
    assert parallel_state.get_context_parallel_global_ranks() == [rank // 2 * 2, rank // 2 * 2 + 1]
    case = LAYER_CASES[rank // 2]
    results[case.name] = {"rank": parallel_state.get_context_parallel_rank()} | run_layer(case)
    parallel_state.destroy_model_parallel()
    from model import cpu_compat

    cpu_compat.enable()  # megatron's TP gathers allocate on "the current device"
    parallel_state.initialize_model_parallel(2, 1, context_parallel_size=2)  # TP groups {0, 1}, {2, 3}
    result = run_layer(TP_CP_CASE)
    if parallel_state.get_tensor_model_parallel_rank() == 0:  # the TP ranks' outputs are the same
        results[TP_CP_CASE.name] = {"rank": parallel_state.get_context_parallel_rank()} | result
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
