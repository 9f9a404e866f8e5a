"""Context parallelism (issues 19, 28): the pipelined feedback solve, the all-gather attention and
the SSD scan at CP=2 and CP=4, contiguous and zigzag (gloo, one launch of 4 processes), equal one
process, outputs and every input gradient, with documents straddling pieces and pieces that are
not whole chunks; so do a SessaLayer at CP=2 and at TP=2 x CP=2 (megatron's groups), and whole
models -- a hybrid of S, *, - and M blocks, and the Transformer arm -- at CP=2 in both layouts and
CP=4 zigzag: outputs, input gradients and every parameter gradient. The impl="triton" solve cases
run the Triton kernels under TRITON_INTERPRET=1 (set for the whole launch) against their PyTorch twins."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cp_worker import (ATTENTION_CASES, LAYER_CASES, MODEL_CASES, SOLVE_CASES, SSD_CASES, TP_CP_CASE, TRITON_TWINS,
                       attention_inputs, build_model, doc_ids, layer_config, layer_inputs, model_inputs, solve_inputs,
                       ssd_inputs)

from kernels.feedback_solve import feedback_solve
from kernels.feedback_solve.context_parallel import context_positions, feedback_solve_context_parallel
from kernels.ssd import ssd_chunked
from model import SessaLayer, cpu_compat, megatron_config
from model.documents import document_attention
from model.parallel import ensure_model_parallel

HERE = Path(__file__).parent


def tolerance(dtype):
    return {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}


def reference_solve(case) -> dict:
    inputs = {name: x.clone().requires_grad_(name != "grad") for name, x in solve_inputs(case).items()}
    s = feedback_solve(inputs["q_b"], inputs["k_b"], inputs["f"], inputs["gamma"], "chunked", case.chunk_size,
                       doc_ids=doc_ids(case))
    (s * inputs["grad"]).sum().backward()
    return {"s": s.detach()} | {name: x.grad for name, x in inputs.items() if name != "grad"}


def reference_attention(case) -> dict:
    inputs = {name: x.clone().requires_grad_(name != "grad") for name, x in attention_inputs(case).items()}
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    if case.documents is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        out = document_attention(q, k, v, doc_ids(case), use_flex=False)
    (out * inputs["grad"]).sum().backward()
    return {"out": out.detach()} | {name: x.grad for name, x in inputs.items() if name != "grad"}


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    """{case name: {tensor name: the CP ranks' pieces concatenated along the sequence}}."""
    out = tmp_path_factory.mktemp("cp")
    env = {**os.environ, "PYTHONPATH": f"{HERE.parents[1]}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1",
           "TRITON_INTERPRET": "1"}  # the impl="triton" solve cases run the kernels on CPU
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                           str(HERE / "cp_worker.py"), str(out)], env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    pieces: dict = {}
    for rank in range(4):
        for name, result in torch.load(out / f"rank{rank}.pt").items():
            pieces.setdefault(name, {})[result.pop("rank")] = result
    cases = {case.name: case for case in [*SOLVE_CASES, *ATTENTION_CASES, *SSD_CASES, *LAYER_CASES, TP_CP_CASE,
                                          *MODEL_CASES]}
    merged = {}
    for name, by_rank in pieces.items():
        case = cases[name]
        dim = {"attn": 2, "layer": 0}.get(name.split("_")[0], 1)  # the sequence dimension
        merged[name] = {key: by_rank[0][key] if key == "grads" else in_sequence_order(case, by_rank, key, dim)
                        for key in by_rank[0]}
    return merged


def in_sequence_order(case, by_rank: dict, key: str, dim: int) -> torch.Tensor:
    """The ranks' pieces of `key` put back at their sequence positions (either layout)."""
    size = len(by_rank)
    total = sum(r[key].shape[dim] for r in by_rank.values())
    first = by_rank[0][key]
    full = first.new_zeros(first.shape[:dim] + (total,) + first.shape[dim + 1:])
    for rank, result in by_rank.items():
        full.index_copy_(dim, context_positions(total, size, rank, getattr(case, "layout", "contiguous")), result[key])
    return full


@pytest.mark.slow
@pytest.mark.parametrize("case", SOLVE_CASES, ids=[c.name for c in SOLVE_CASES])
def test_feedback_solve_context_parallel_matches_one_process(cp_results, case):
    got, want = cp_results[case.name], reference_solve(case)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **tolerance(case.dtype), msg=f"{case.name}: {key}")


@pytest.mark.slow
@pytest.mark.parametrize("names", TRITON_TWINS, ids=[name for name, _ in TRITON_TWINS])
def test_triton_context_parallel_matches_the_pytorch_one(cp_results, names):
    """The diagonal pieces by the Triton kernels (forward and backward, interpreted) against the PyTorch
    tiles on the same inputs, CP 2: s and every gradient (fp32; both also equal one process above)."""
    triton, pytorch = (cp_results[name] for name in names)
    assert set(triton) == set(pytorch) == {"s", "q_b", "k_b", "f", "gamma"}
    for key in pytorch:
        torch.testing.assert_close(triton[key], pytorch[key], atol=1e-5, rtol=1e-5, msg=f"{names[0]}: {key}")


@pytest.mark.slow
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c.name for c in ATTENTION_CASES])
def test_attention_context_parallel_matches_one_process(cp_results, case):
    got, want = cp_results[case.name], reference_attention(case)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **tolerance(case.dtype), msg=f"{case.name}: {key}")


def reference_ssd(case) -> dict:
    inputs = {name: x.clone().requires_grad_(name != "grad") for name, x in ssd_inputs(case).items()}
    y, _ = ssd_chunked(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], case.chunk_size,
                       doc_ids=doc_ids(case))
    (y * inputs["grad"]).sum().backward()
    grad_A = inputs.pop("A").grad
    return {"y": y.detach(), "grads": {"A": grad_A}} | {name: x.grad for name, x in inputs.items() if name != "grad"}


@pytest.mark.slow
@pytest.mark.parametrize("case", SSD_CASES, ids=[c.name for c in SSD_CASES])
def test_ssd_context_parallel_matches_one_process(cp_results, case):
    """The SSD state crosses 1 to 7 pieces (all-gathered summaries), resets at documents starting in a
    piece or on its first position: outputs and the gradients of x, dt, A, B, C."""
    got, want = cp_results[case.name], reference_ssd(case)
    assert set(got) == set(want)
    torch.testing.assert_close(got.pop("grads")["A"], want.pop("grads")["A"], atol=1e-10, rtol=1e-10)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-10, rtol=1e-10, msg=f"{case.name}: {key}")


@pytest.mark.slow
@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.name for c in MODEL_CASES])
def test_model_context_parallel_matches_one_process(cp_results, case):
    """A hybrid of all four block types (S, *, -, M) and the Transformer arm, at CP 2 in both layouts
    and CP 4 zigzag, with documents crossing pieces: per-token losses and every parameter gradient."""
    got = cp_results[case.name]
    if not torch.cuda.is_available():
        cpu_compat.enable()  # megatron's RNG tracker (the Transformer arm) assumes CUDA otherwise
    ensure_model_parallel()
    model = build_model(case)
    inputs = model_inputs(case)
    loss = model(inputs["tokens"], inputs["labels"], **inputs["keywords"])
    (loss * inputs["weights"]).sum().backward()
    torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-10, rtol=1e-10)
    assert set(got["grads"]) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():  # relative to each gradient's scale
        scale = float(param.grad.abs().max())
        torch.testing.assert_close(got["grads"][name], param.grad, atol=max(1e-10 * scale, 1e-20), rtol=1e-8,
                                   msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("case", [*LAYER_CASES, TP_CP_CASE], ids=[c.name for c in [*LAYER_CASES, TP_CP_CASE]])
def test_layer_context_parallel_matches_one_process(cp_results, case):
    got = cp_results[case.name]
    ensure_model_parallel()
    config = layer_config(case)
    layer = SessaLayer(config, megatron_config(config, params_dtype=torch.float64), init_seed=4)
    inputs = layer_inputs(case)
    x = inputs["x"].clone().requires_grad_()
    y, _ = layer(x, **inputs["keywords"])
    (y * inputs["grad"]).sum().backward()
    torch.testing.assert_close(got["y"], y.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got["x"], x.grad, atol=1e-10, rtol=1e-10)
    assert set(got["grads"]) == {name for name, _ in layer.named_parameters()}
    for name, param in layer.named_parameters():  # relative to each gradient's scale: some are ~1e-10
        scale = float(param.grad.abs().max())
        torch.testing.assert_close(got["grads"][name], param.grad, atol=max(1e-10 * scale, 1e-20), rtol=1e-8,
                                   msg=name)


def test_context_parallel_of_one_rank_is_the_chunked_solve():
    """CP=1 (this process's world of one) is the single-process solve, values and gradients."""
    ensure_model_parallel()
    case = SOLVE_CASES[2]  # documents
    inputs = {name: x.clone().requires_grad_(name != "grad") for name, x in solve_inputs(case).items()}
    s = feedback_solve_context_parallel(inputs["q_b"], inputs["k_b"], inputs["f"], inputs["gamma"],
                                        dist.group.WORLD, case.chunk_size, doc_ids(case))
    (s * inputs["grad"]).sum().backward()
    want = reference_solve(case)
    torch.testing.assert_close(s.detach(), want["s"], **tolerance(case.dtype))
    for name in ("q_b", "k_b", "f", "gamma"):
        torch.testing.assert_close(inputs[name].grad, want[name], **tolerance(case.dtype), msg=name)


def test_context_parallel_rejects_a_local_piece_of_doc_ids():
    ensure_model_parallel()
    case = SOLVE_CASES[2]
    x = solve_inputs(case)
    with pytest.raises(ValueError, match="doc_ids must be"):
        feedback_solve_context_parallel(x["q_b"], x["k_b"], x["f"], x["gamma"], dist.group.WORLD, 4,
                                        doc_ids(case)[:, :10])


def test_batch_split_follows_the_context_layout():
    """The trainer's batch split (pretrain.batches.context_piece) cuts the positions the blocks assume."""
    from model.parallel import set_context_layout
    from pretrain.batches import context_piece

    batch = {"inputs": torch.arange(8)[None], "labels": torch.arange(1, 9)[None], "targets_mask": torch.ones(1, 8),
             "model_kwargs": {}}
    try:
        set_context_layout("zigzag")
        assert context_piece(batch, 0, 2)["inputs"].tolist() == [[0, 1, 6, 7]]
        assert context_piece(batch, 1, 2)["labels"].tolist() == [[3, 4, 5, 6]]
        with pytest.raises(ValueError, match="not divisible by 8"):
            context_piece(batch | {"inputs": torch.arange(12)[None]}, 0, 4)
    finally:
        set_context_layout("contiguous")
    assert context_piece(batch, 1, 2)["inputs"].tolist() == [[4, 5, 6, 7]]


def test_context_parallel_config_errors():
    from pretrain.config import ConfigError, load_config

    tiny = HERE.parents[1] / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="parallel.context_layout must be 'contiguous' or 'zigzag', got 'spiral'"):
        load_config(tiny, ["--parallel.context_layout", "spiral"])
    with pytest.raises(ConfigError, match="parallel.context 2 needs engine: megatron"):
        load_config(tiny, ["--engine", "deepspeed", "--parallel.context", "2"])
    hybrid = load_config(HERE.parents[1] / "configs" / "hybrid" / "mamba2.yaml",
                         ["--parallel.context", "2", "--parallel.context_layout", "zigzag"])
    assert hybrid.parallel.context_layout == "zigzag"


def test_init_distributed_sets_the_context_layout():
    """The trainer's setup hands parallel.context_layout to the blocks and the batch split."""
    from model.parallel import context_layout, set_context_layout
    from pretrain.config import ParallelConfig
    from pretrain.distributed import init_distributed

    ensure_model_parallel()  # already initialised: init_distributed keeps the groups, sets the layout
    try:
        init_distributed(ParallelConfig(context_layout="zigzag"))
        assert context_layout() == "zigzag"
    finally:
        set_context_layout("contiguous")
