"""TP=2 == TP=1 (and TP=4 == TP=1): loss, logits and every parameter gradient of SessaLM (SESSA.md §6 layout, gloo),
for grouped-query and multi-head attention, with and without sequence parallelism, packed
documents (document masking) and the feedback branch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tp_case import CASES, TP4_CASES, make_documents, make_tokens

from model import SessaLM, init_weights
from model.init import global_named_parameters

HERE = Path(__file__).parent


def run_workers(out: Path, nproc: int, *cases: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{HERE.parents[1]}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(HERE / "tp_worker.py"), str(out), *cases], env=env, timeout=600, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("tp") / "tp2.pt", 2)


@pytest.fixture(scope="module")
def tp4_results(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("tp") / "tp4.pt", 4, "tp4")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tensor_parallel_two_ranks_matches_one(tp2_results, case):
    assert_matches_one_process(tp2_results, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", TP4_CASES, ids=[c[0] for c in TP4_CASES])
def test_tensor_parallel_four_ranks_matches_one(tp4_results, case):
    """Each rank solves a quarter of the value columns with the probabilities of the gathered q_b, k_b."""
    assert_matches_one_process(tp4_results, case)


def assert_matches_one_process(results: dict, case) -> None:
    name, config, _, packed = case
    parallel = results[name]
    model = SessaLM(config).double()
    init_weights(model, seed=3)
    tokens, documents = make_tokens(config), make_documents(packed)
    loss = model(tokens[:, :-1], tokens[:, 1:], **documents).mean()
    loss.backward()
    # The model runs in float64 but megatron's vocab-parallel cross entropy works in float32.
    torch.testing.assert_close(parallel["loss"], loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(parallel["logits"], model(tokens[:, :-1], **documents).detach(), atol=1e-12, rtol=1e-12)
    # Each gradient against its own scale (the feedback projections' are ~1e-10); the key bias's is
    # zero in exact arithmetic (softmax ignores a shift shared by all keys): fp64 noise, ~1e-24.
    for param_name, param in global_named_parameters(model):
        atol = max(1e-6 * param.grad.abs().max().item(), 1e-14)
        torch.testing.assert_close(parallel["grads"][param_name], param.grad, atol=atol, rtol=1e-6, msg=param_name)
