"""Context-parallel cases, and the torchrun worker (4 gloo processes) that runs them for
test_context_parallel.py.

Each rank writes {case name: {"rank": rank in the case's CP group, tensor name: this rank's piece}}
for the cases it took part in to argv[1]/rank<r>.pt: CP=4 cases on all four ranks, CP=2 cases
alternately on ranks {0, 1} and {2, 3} (kernels: the feedback solve, the attention, the SSD scan, in
both layouts; the solve also with impl="triton", interpreted); then megatron's parallel state at CP=2
(x DP=2) and a SessaLayer per CP group
(LAYER_CASES), whole models per CP group (MODEL_PAIRS: the hybrid "S*-M" and the Transformer arm,
contiguous on ranks {0, 1}, zigzag on {2, 3}), at CP=4 (MODEL_CP4), and at TP=2 x CP=2
(TP_CP_CASE). "grads" are full parameter gradients (summed over CP, shards gathered over TP).
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
    layout: str = "contiguous"  # which positions each rank holds (kernels/feedback_solve/context_parallel.py)
    impl: str = "chunked"  # the feedback solve's feedback_impl: "triton" runs under TRITON_INTERPRET=1


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
    # zigzag: pieces of 5 (CP 2: 4 pieces of 5, CP 4: 8); chunks of 3 end mid-piece; in
    # "docs_aligned_cp2_zigzag" pieces 1 and 2 (ranks 1 and 1) see nothing earlier
    Case("docs_cp2_zigzag", 2, 10, chunk_size=3, documents=((3, 1, 9, 7), (10, 6, 4)), layout="zigzag"),
    Case("docs_aligned_cp2_zigzag", 2, 10, documents=((5, 5, 10), (10, 10)), layout="zigzag"),
    Case("plain_cp4_zigzag", 4, 10, chunk_size=4, layout="zigzag"),
    Case("docs_cp4_zigzag", 4, 10, chunk_size=3, documents=((5, 1, 17, 2, 15), (12, 14, 10, -4)), layout="zigzag"),
    Case("fp32_docs_cp4_zigzag", 4, 6, chunk_size=2, documents=((5, 1, 13, 5), (12, 6, -6)), dtype=torch.float32,
         layout="zigzag"),
    # The diagonal pieces by the Triton kernels (interpreted), each with its PyTorch twin (TRITON_TWINS):
    # documents crossing pieces, pieces of 10 (5 zigzag) inside one 16-row diagonal block
    Case("fp32_docs_cp2", 2, 10, documents=((3, 1, 9, 7), (10, 6, 4)), dtype=torch.float32),
    Case("triton_fp32_docs_cp2", 2, 10, documents=((3, 1, 9, 7), (10, 6, 4)), dtype=torch.float32, impl="triton"),
    Case("fp32_docs_cp2_zigzag", 2, 10, documents=((3, 1, 9, 7), (10, 6, 4)), dtype=torch.float32, layout="zigzag"),
    Case("triton_fp32_docs_cp2_zigzag", 2, 10, documents=((3, 1, 9, 7), (10, 6, 4)), dtype=torch.float32,
         layout="zigzag", impl="triton"),
]
TRITON_TWINS = [(case.name, case.name.removeprefix("triton_")) for case in SOLVE_CASES if case.impl == "triton"]
ATTENTION_CASES = [
    Case("attn_plain_cp2", 2, 10),
    Case("attn_docs_cp2", 2, 10, documents=((3, 1, 9, 7), (10, 6, 4))),
    Case("attn_plain_cp4", 4, 10, chunk_size=16),
    Case("attn_docs_cp4", 4, 10, documents=((5, 1, 17, 2, 15), (12, 14, 10, -4))),
    Case("attn_plain_cp2_zigzag", 2, 10, chunk_size=3, layout="zigzag"),
    Case("attn_docs_cp4_zigzag", 4, 10, documents=((5, 1, 17, 2, 15), (12, 14, 10, -4)), layout="zigzag"),
]
# The SSD scan (kernels/ssd/context_parallel.py): states crossing 1 to 7 pieces, documents starting
# inside a piece, exactly on a piece boundary (position 10 at CP 2 contiguous, 5 and 10 at CP 4 zigzag)
SSD_CASES = [
    Case("ssd_docs_cp2", 2, 10, chunk_size=3, documents=((3, 17), (10, 10))),
    Case("ssd_plain_cp4", 4, 10, chunk_size=4),
    Case("ssd_docs_cp4_zigzag", 4, 10, chunk_size=3, documents=((5, 5, 22, 8), (13, 27)), layout="zigzag"),
    Case("ssd_plain_cp2_zigzag", 2, 10, chunk_size=4, layout="zigzag"),
]
# SessaLayer at CP=2 (megatron's CP group): one case per pair of ranks.
LAYER_CASES = [
    Case("layer_plain_cp2", 2, 10),
    Case("layer_docs_cp2", 2, 10, chunk_size=3, documents=((3, 1, 9, 7), (10, 6, 4))),
]
TP_CP_CASE = Case("layer_docs_tp2_cp2", 2, 10, chunk_size=3, documents=((3, 1, 9, 7), (10, 6, 4)))
K, V = 6, 5  # feedback key and value widths (K != V: V may be a tensor-parallel slice)
HEADS, KV_HEADS, HEAD_SIZE = 4, 2, 4


@dataclass(frozen=True)
class ModelCase:
    """A whole model at CP = `cp` against one process: per-token losses and every parameter gradient."""
    name: str
    cp: int
    layout: str
    arch: str = "sessa"  # "sessa": the hybrid layer_pattern "S*-M"; "transformer": the Transformer arm
    documents: tuple | None = ((5, 1, 12, 3, 11), (14, 10, 4, -4))  # T = 32, crossing pieces
    length: int = 32  # the whole sequence


# CP 2 cases run in pairs, one per CP group of megatron's state (CP 2 x DP 2), then CP 4 cases on all
# four ranks. Zigzag at CP 4: eight pieces of 4 positions, the conv's reach is 3.
MODEL_PAIRS = [
    (ModelCase("hybrid_cp2", 2, "contiguous"), ModelCase("hybrid_cp2_zigzag", 2, "zigzag")),
    (ModelCase("transformer_cp2", 2, "contiguous", "transformer"),
     ModelCase("transformer_cp2_zigzag", 2, "zigzag", "transformer", documents=None)),
]
MODEL_CP4 = [ModelCase("hybrid_cp4_zigzag", 4, "zigzag"), ModelCase("transformer_cp4_zigzag", 4, "zigzag", "transformer")]
MODEL_CASES = [case for pair in MODEL_PAIRS for case in pair] + MODEL_CP4


def model_config(case: ModelCase):
    from model import ModelConfig

    common = dict(vocab_size=64, hidden_size=16, num_heads=4, num_kv_heads=2, ffn_hidden_size=24)
    if case.arch == "transformer":
        return ModelConfig(arch="transformer", num_layers=2, **common)
    return ModelConfig(num_layers=4, layer_pattern="S*-M", feedback_impl="chunked", feedback_chunk_size=3,
                       mamba_state_size=4, mamba_head_size=8, mamba_chunk_size=3, **common)


def build_model(case: ModelCase):
    """The case's model in float64, initialised layout-independently (seed 4)."""
    from model.transformer import build_model as build, init_model_weights, megatron_config_for

    config = model_config(case)
    model = build(config, megatron_config_for(config, params_dtype=torch.float64))
    init_model_weights(model, 4)
    return model


def model_inputs(case: ModelCase) -> dict:
    """Full-length tokens, labels, per-token loss weights [B, T] and forward() keywords."""
    from model.documents import positions_from_doc_ids

    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 64, (2, case.length + 1), generator=gen)
    ids = doc_ids(case)
    keywords = {} if ids is None else {"doc_ids": ids, "position_ids": positions_from_doc_ids(ids)}
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
            "weights": torch.randn(2, case.length, generator=gen, dtype=torch.float64), "keywords": keywords}


def doc_ids(case) -> torch.Tensor | None:
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


def positions(case, group) -> torch.Tensor:
    """This rank's sequence positions in the case's layout."""
    from kernels.feedback_solve.context_parallel import context_positions

    return context_positions(case.cp * case.length if isinstance(case, Case) else case.length, case.cp,
                             dist.get_rank(group), case.layout)


def run_solve(case: Case, group) -> dict:
    from kernels.feedback_solve.context_parallel import feedback_solve_context_parallel

    piece = positions(case, group)
    inputs = {name: x[:, piece].clone().requires_grad_(name != "grad") for name, x in solve_inputs(case).items()}
    s = feedback_solve_context_parallel(inputs["q_b"], inputs["k_b"], inputs["f"], inputs["gamma"], group,
                                        case.chunk_size, doc_ids=doc_ids(case), layout=case.layout, impl=case.impl)
    (s * inputs["grad"]).sum().backward()
    return {"s": s.detach()} | {name: x.grad for name, x in inputs.items() if name != "grad"}


def run_attention(case: Case, group) -> dict:
    from kernels.attention import context_parallel_attention

    piece = positions(case, group)
    inputs = {name: x[:, :, piece].clone().requires_grad_(name != "grad")
              for name, x in attention_inputs(case).items()}
    out = context_parallel_attention(inputs["q"], inputs["k"], inputs["v"], group, doc_ids=doc_ids(case),
                                     tile=case.chunk_size, layout=case.layout)
    (out * inputs["grad"]).sum().backward()
    return {"out": out.detach()} | {name: x.grad for name, x in inputs.items() if name != "grad"}


def ssd_inputs(case: Case) -> dict:
    """Full-length inputs of the SSD scan (2 heads, P = 3, N = 4, one B/C group) and the upstream gradient."""
    gen = torch.Generator().manual_seed(13)
    T = case.cp * case.length

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {"x": rand(case.batch, T, 2, 3), "dt": 0.5 * torch.rand(case.batch, T, 2, generator=gen, dtype=torch.float64),
            "A": -torch.rand(2, generator=gen, dtype=torch.float64) - 0.2, "B": rand(case.batch, T, 1, 4),
            "C": rand(case.batch, T, 1, 4), "grad": rand(case.batch, T, 2, 3)}


def run_ssd(case: Case, group) -> dict:
    from kernels.ssd.context_parallel import ssd_context_parallel

    piece = positions(case, group)
    inputs = {name: (x if name == "A" else x[:, piece]).clone().requires_grad_(name != "grad")
              for name, x in ssd_inputs(case).items()}
    y = ssd_context_parallel(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], group,
                             case.chunk_size, doc_ids(case), case.layout)
    (y * inputs["grad"]).sum().backward()
    grad_A = inputs.pop("A").grad
    dist.all_reduce(grad_A, group=group)  # each rank's positions give a partial sum
    return {"y": y.detach(), "grads": {"A": grad_A}} | {name: x.grad for name, x in inputs.items() if name != "grad"}


def run_model(case: ModelCase) -> dict:
    """The case's model on this CP rank's positions (megatron's CP group, the case's layout)."""
    from megatron.core import parallel_state

    from model.parallel import set_context_layout

    set_context_layout(case.layout)
    group = parallel_state.get_context_parallel_group()
    model = build_model(case)
    inputs = model_inputs(case)
    piece = positions(case, group)
    loss = model(inputs["tokens"][:, piece], inputs["labels"][:, piece], **inputs["keywords"])
    (loss * inputs["weights"][:, piece]).sum().backward()
    grads = {}
    for name, param in model.named_parameters():
        dist.all_reduce(param.grad, group=group)
        grads[name] = param.grad
    set_context_layout("contiguous")
    return {"loss": loss.detach(), "grads": grads}


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
    for case, run in ([(c, run_solve) for c in SOLVE_CASES] + [(c, run_attention) for c in ATTENTION_CASES]
                      + [(c, run_ssd) for c in SSD_CASES]):
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
    from model import cpu_compat

    cpu_compat.enable()  # megatron's TP gathers allocate on "the current device"
    for pair in MODEL_PAIRS:
        case = pair[rank // 2]
        results[case.name] = {"rank": parallel_state.get_context_parallel_rank()} | run_model(case)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=4)
    for case in MODEL_CP4:
        results[case.name] = {"rank": parallel_state.get_context_parallel_rank()} | run_model(case)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(2, 1, context_parallel_size=2)  # TP groups {0, 1}, {2, 3}
    result = run_layer(TP_CP_CASE)
    if parallel_state.get_tensor_model_parallel_rank() == 0:  # the TP ranks' outputs are the same
        results[TP_CP_CASE.name] = {"rank": parallel_state.get_context_parallel_rank()} | result
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
