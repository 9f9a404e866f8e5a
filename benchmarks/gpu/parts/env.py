"""Part env: versions, the device, and this device's measured matmul rates and copy bandwidth."""
import os
import platform

import torch

from benchmarks.gpu.part import Part


def _matmul_tflops(part: Part, dtype, n: int, tf32: bool = False) -> float:
    a = torch.randn(n, n, device=part.device, dtype=dtype)
    b = torch.randn(n, n, device=part.device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a @ b
        seconds = part.timed(lambda: a @ b, reps=10, max_s=2.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return round(2 * n**3 / seconds / 1e12, 2)


def run(part: Part) -> None:
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "torch_cuda": torch.version.cuda, "device": str(part.device),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except ImportError as error:
        info["megatron_core"] = f"missing ({error})"
    if part.device.type == "cuda":
        props = torch.cuda.get_device_properties(part.device)
        info |= {"device_name": props.name, "sm_count": props.multi_processor_count,
                 "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}"}
    part.result["info"] = info
    part.save()
    n = 256 if part.dry else 8192
    rates = {"bf16_matmul_tflops": (torch.bfloat16, False), "tf32_matmul_tflops": (torch.float32, True),
             "fp32_matmul_tflops": (torch.float32, False)}
    for key, (dtype, tf32) in rates.items():
        part.result[key] = _matmul_tflops(part, dtype, n, tf32)
        part.save()
    x = torch.empty(2**20 if part.dry else 2**30, dtype=torch.uint8, device=part.device)
    y = torch.empty_like(x)
    y.copy_(x)
    seconds = part.timed(lambda: y.copy_(x), reps=10, max_s=2.0)
    part.result["copy_tb_s"] = round(2 * x.numel() / seconds / 1e12, 3)  # bytes read + written
    part.save()
