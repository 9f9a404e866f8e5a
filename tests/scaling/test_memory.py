"""python -m pretrain.memory: the activation model against what a layer really keeps for backward,
at tensor-parallel sizes 1 and 2 (gloo, one process per rank, on CPU)."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import ModelConfig
from pretrain.config import load_config
from pretrain.memory import estimate_memory_gb, layer_activation_bytes

REPO = Path(__file__).resolve().parents[2]
CASES = {  # tensor-parallel size: cases measured at that size
    1: [dict(T=256, B=2, D=128, heads=4, kv_heads=4, dtype="float32", sequence_parallel=False),
        dict(T=256, B=2, D=128, heads=1, kv_heads=1, dtype="bfloat16", sequence_parallel=False)],
    2: [dict(T=256, B=2, D=128, heads=4, kv_heads=4, dtype="float32", sequence_parallel=False),
        dict(T=256, B=2, D=128, heads=4, kv_heads=2, dtype="bfloat16", sequence_parallel=True)],
}


def measured(tp: int, tmp_path: Path) -> list[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"tp{tp}.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}",
                           "--master-addr=127.0.0.1", f"--master-port={port}", str(Path(__file__).with_name("memory_worker.py")),
                           str(out), json.dumps(CASES[tp])], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("tp", [1, 2])
def test_layer_activation_model_matches_the_saved_tensors(tp, tmp_path):
    """Within 1% of the bytes autograd keeps: at TP 2 the full-width tensors (GELU(a), q_b, k_b, ...)
    are held on every rank, so dividing every activation by TP underestimates a layer."""
    for case, saved in zip(CASES[tp], measured(tp, tmp_path)):
        model = ModelConfig(vocab_size=256, hidden_size=case["D"], num_layers=1, num_heads=case["heads"],
                            num_kv_heads=case["kv_heads"], feedback_chunk_size=32)
        estimate = layer_activation_bytes(model, case["T"], case["B"], tp, case["sequence_parallel"],
                                          4 if case["dtype"] == "float32" else 2)["saved"]
        assert estimate == pytest.approx(saved, rel=0.01), (case, estimate, saved)


def test_7b_layer_under_tensor_parallelism():
    """The 7B recipe (TP 8, sequence parallel, bf16): about 2.6x what the old all-divided-by-TP count
    gave; most of a layer's activations are the replicated full-width tensors."""
    run = load_config(REPO / "configs" / "7b.yaml")
    layer = layer_activation_bytes(run.model, 8192, 1, 8, True, 2)["saved"]
    D = run.model.hidden_size
    per_token = layer / 8192
    assert 5 * D * 2 < per_token < 7 * D * 2  # five replicated D-wide bf16 tensors + the shards
    assert per_token / ((18 * D * 2 + 4 * D) / 8) > 2
    estimate = estimate_memory_gb(run, 8192, 8)
    assert estimate["activations"] == pytest.approx(run.model.num_layers * layer / 2**30, rel=0.01)


def test_recompute_modes_in_the_estimate_and_the_128k_recipe_fits():
    """train.recompute in `python -m pretrain.memory`: selective drops the mixers' tensors, full keeps
    only block inputs; the 7B/128k recipe uses the mode that fits an 80 GB GPU."""
    from pathlib import Path

    from pretrain.config import load_config
    from pretrain.memory import estimate_memory_gb

    recipe = Path(__file__).resolve().parents[2] / "configs" / "7b-128k.yaml"
    totals = {mode: estimate_memory_gb(load_config(recipe, ["--train.recompute", mode]), 131072, 4)
              for mode in ("none", "selective", "full")}
    assert totals["none"]["activations"] > totals["selective"]["activations"] > totals["full"]["activations"]
    assert totals["none"]["weights"] == totals["full"]["weights"]
    assert load_config(recipe).train.recompute == "full"
    assert totals["full"]["total"] < 80 < totals["selective"]["total"]
