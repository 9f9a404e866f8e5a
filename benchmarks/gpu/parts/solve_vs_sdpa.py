"""Part b: the Triton feedback solve's forward and forward+backward time and TFLOP/s against one causal
SDPA head of size D (the roof it is compared with), B = 1."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.gpu.part import Part, error_text
from benchmarks.gpu.targets import speed_ratios
from benchmarks.gpu.parts.correctness import solve_inputs
from benchmarks.measure import attention_flops, forward_and_backward
from kernels.feedback_solve import feedback_solve

SDPA_BACKENDS = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                 ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]


def feedback_executed_flops(T: int, K: int, V: int, backward: bool) -> float:
    """What the Triton solve executes (kernels/feedback_solve/README.md, Cost): (2K + V) T^2 forward,
    (4K + 3V) T^2 more in backward."""
    forward = (2 * K + V) * T * T
    return forward + ((4 * K + 3 * V) * T * T if backward else 0)


def _tflops(flops: float, ms: float) -> float:
    return round(flops / (ms * 1e-3) / 1e12, 2)


def _measure(part: Part, fn, inputs, row: dict, reps: int) -> None:
    """fwd / fwd+bwd median milliseconds and peak GB of fn(*inputs) into row."""
    measured = forward_and_backward(fn, inputs, part.device, reps, max_s=max(1.0, part.left() / 5))
    for name in ("fwd", "fwd_bwd"):
        row[f"{name}_ms"] = round(1e3 * measured[f"{name}_s"], 3)
        peak = measured[f"{name}_peak_bytes"]
        row[f"{name}_peak_gb"] = None if peak is None else round(peak / 1e9, 3)


def _measure_sdpa(part: Part, T: int, D: int, dtype, row: dict, reps: int) -> None:
    """The first SDPA backend that takes the shape, fastest first."""
    gen = torch.Generator(device=part.device).manual_seed(0)
    inputs = [torch.randn(1, 1, T, D, device=part.device, dtype=dtype, generator=gen).requires_grad_()
              for _ in range(3)]
    errors = []
    for name, backend in SDPA_BACKENDS:
        try:
            with sdpa_kernel([backend]):
                _measure(part, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True), inputs, row, reps)
            row["backend"] = name
            break
        except RuntimeError as error:  # this backend does not take the shape
            errors.append(f"{name}: {error_text(error)[:120]}")
            part.reset_peak()
    if "backend" not in row:
        raise RuntimeError("no SDPA backend ran: " + "; ".join(errors))
    if errors:
        row["backends_refused"] = errors


def run(part: Part) -> None:
    D, dtype = (32, torch.float32) if part.dry else (2048, torch.bfloat16)
    seq_lens = [64] if part.dry else [8192, 4096, 32768]  # the target's T first
    reps = 2 if part.dry else 5
    rows = part.result["rows"] = []
    for T in seq_lens:
        for impl in ("triton", "sdpa"):
            row = {"impl": impl, "T": T, "D": D, "B": 1, "dtype": str(dtype).removeprefix("torch.")}
            rows.append(row)
            if part.left() < 10:
                row["skipped"] = "out of time"
                part.save()
                continue
            try:
                if impl == "triton":
                    inputs = solve_inputs(part, 1, T, D, dtype)
                    _measure(part, lambda *x: feedback_solve(*x, impl="triton", chunk_size=64), inputs, row, reps)
                    row["fwd_executed_tflops"] = _tflops(feedback_executed_flops(T, D, D, False), row["fwd_ms"])
                    row["fwd_bwd_executed_tflops"] = _tflops(feedback_executed_flops(T, D, D, True), row["fwd_bwd_ms"])
                else:
                    _measure_sdpa(part, T, D, dtype, row, reps)
                row["fwd_attention_tflops"] = _tflops(attention_flops(T, D, D, False), row["fwd_ms"])
                row["fwd_bwd_attention_tflops"] = _tflops(attention_flops(T, D, D, True), row["fwd_bwd_ms"])
            except Exception as error:
                row["error"] = error_text(error)
            finally:
                inputs = None
                part.reset_peak()
            part.save()
    part.result["triton_over_sdpa"] = speed_ratios(rows)
