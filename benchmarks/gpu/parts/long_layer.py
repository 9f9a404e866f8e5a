"""Part c: one Sessa layer (the 1.3B recipe's width and heads) forward+backward at T = 131072, bf16
autocast: time and peak memory against an 80 GB card."""
import contextlib
import time

import torch

from benchmarks.gpu.part import Part, error_text, is_out_of_memory
from model import ModelConfig, SessaLayer

MEMORY_LIMIT_GB = 80.0


def autocast(part: Part):
    """The recipe's mixed precision: fp32 master weights, bf16 autocast on the GPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if part.device.type == "cuda" else contextlib.nullcontext()


def run(part: Part) -> None:
    T, D, heads, kv = (64, 32, 2, 1) if part.dry else (131072, 2048, 16, 4)
    config = ModelConfig(vocab_size=256, hidden_size=D, num_layers=1, num_heads=heads, num_kv_heads=kv,
                         feedback_impl="triton", feedback_chunk_size=16 if part.dry else 64)
    part.result |= {"T": T, "D": D, "num_heads": heads, "num_kv_heads": kv, "B": 1, "feedback_impl": "triton",
                    "dtype": "bf16 autocast, fp32 weights" if part.device.type == "cuda" else "float32"}
    part.save()
    layer = SessaLayer(config).to(part.device)  # the recipe's init (model/init.py)
    x = torch.randn(T, 1, D, device=part.device).requires_grad_()

    def step():
        with autocast(part):
            y, _ = layer(x)
        y.float().square().mean().backward()

    try:
        t0 = time.perf_counter()
        step()  # compile and warm up
        part.sync()
        part.result["first_step_s"] = round(time.perf_counter() - t0, 3)
        part.save()
        base = part.reset_peak()
        part.result["fwd_bwd_s"] = round(part.timed(step, reps=3, max_s=max(1.0, part.left() - 10)), 4)
        part.result["peak_gb"] = part.peak_gb()
        part.result["peak_above_start_gb"] = part.peak_gb(base)
        peak = part.result["peak_gb"]
        part.result["fits_80gb"] = None if peak is None else peak <= MEMORY_LIMIT_GB
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        part.result["error"] = error_text(error)
        part.result["fits_80gb"] = False
