"""How the benchmarks time work on a device: the median of repeated runs with the device synchronised
around each one, a forward / forward+backward pair with its peak memory, and the causal attention
FLOP count the feedback solve is compared with (benchmarks/feedback_kernels.py, benchmarks/gpu/)."""
import math
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step, device: torch.device, reps: int, max_s: float = math.inf) -> float:
    """Median wall seconds of `step()` over `reps` runs, stopping early once `max_s` has passed (at
    least one run)."""
    times = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < max_s):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def reset_peak_memory(device: torch.device) -> int:
    """Start a new peak-memory window; returns the bytes allocated now (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory(device: torch.device, base: int = 0) -> int | None:
    """Peak bytes allocated since reset_peak_memory, above `base` (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


def forward_and_backward(fn, inputs: list, device: torch.device, reps: int, max_s: float = math.inf) -> dict:
    """Median forward (no grad) and forward+backward seconds of fn(*inputs) and the peak bytes each
    allocates above what was allocated before (None off CUDA); one forward+backward first compiles
    and warms up. max_s bounds each of the two timings."""
    grad = None

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        nonlocal grad
        out = fn(*inputs)
        if grad is None:
            grad = torch.randn_like(out)
        torch.autograd.grad(out, inputs, grad)

    forward_backward()
    result = {}
    for name, step in (("fwd", forward), ("fwd_bwd", forward_backward)):
        base = reset_peak_memory(device)
        result[f"{name}_s"] = median_seconds(step, device, reps, max_s)
        result[f"{name}_peak_bytes"] = peak_memory(device, base)
    return result


def attention_flops(T: int, K: int, V: int, backward: bool, batch: int = 1) -> float:
    """One causal head per sequence: T^2/2 (query, key) pairs, QK^T and PV; backward counted as 2.5x
    forward (the scores are recomputed)."""
    forward = 2 * batch * (T * T / 2) * (K + V)
    return forward * (3.5 if backward else 1.0)
