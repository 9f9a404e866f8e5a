"""TP=2 == TP=1: loss, logits and every parameter gradient of SessaLM (SESSA.md §6 layout, gloo)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tp_case import CONFIG, make_tokens

from model import SessaLM, init_weights
from model.init import global_named_parameters

HERE = Path(__file__).parent


@pytest.mark.slow
def test_tensor_parallel_two_ranks_matches_one(tmp_path):
    out = tmp_path / "tp2.pt"
    env = {**os.environ, "PYTHONPATH": f"{HERE.parents[1]}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=0",
                    str(HERE / "tp_worker.py"), str(out)], check=True, env=env, timeout=600,
                   capture_output=True)
    tp2 = torch.load(out)

    model = SessaLM(CONFIG).double()
    init_weights(model, seed=3)
    model.double()
    tokens = make_tokens()
    loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    torch.testing.assert_close(tp2["loss"], loss.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tp2["logits"], model(tokens[:, :-1]).detach(), atol=1e-12, rtol=1e-12)
    for name, param in global_named_parameters(model):
        torch.testing.assert_close(tp2["grads"][name], param.grad, atol=1e-11, rtol=1e-9, msg=name)
