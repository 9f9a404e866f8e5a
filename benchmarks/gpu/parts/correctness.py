"""Part a: the Triton and chunked feedback solves against the dense fp64 oracle, fp32 and bf16 inputs:
the output s and all four gradients (dq_b, dk_b, df, dgamma)."""
import time

import torch

from benchmarks.gpu.part import Part, error_text
from kernels.feedback_solve import feedback_solve

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # norm-relative, on every output
DRY_SHAPES = [(2, 37, 24), (1, 70, 20)]  # (B, T, D): not multiples of the 16 / 64 tiles
# The shapes parts b-d run first (this compiles their kernels), then the rest.
GPU_SHAPES = [(1, 4096, 2048), (2, 1000, 2048), (2, 64, 2048), (1, 4096, 256), (2, 1000, 256), (2, 64, 256),
              (2, 777, 200), (1, 1500, 1000)]


def solve_inputs(part: Part, batch: int, T: int, D: int, dtype, seed: int = 0) -> list:
    """q_b, k_b, f [B, T, D] and gamma [B, T] in (-0.9, 0.9), requiring grad."""
    gen = torch.Generator(device=part.device).manual_seed(seed)
    q_b, k_b, f = (torch.randn(batch, T, D, device=part.device, generator=gen) for _ in range(3))
    gamma = 0.9 * torch.tanh(torch.randn(batch, T, device=part.device, generator=gen))
    return [x.to(dtype).requires_grad_() for x in (q_b, k_b, f, gamma)]


def _rel_errors(got, ref) -> tuple[float, float]:
    """(||got - ref|| / ||ref||, max |got - ref| / max |ref|), in fp64."""
    diff = got.double() - ref
    return (float(diff.norm() / ref.norm().clamp_min(1e-300)),
            float(diff.abs().max() / ref.abs().max().clamp_min(1e-300)))


def _check_case(part: Part, case: dict, batch: int, T: int, D: int, dtype) -> None:
    inputs = solve_inputs(part, batch, T, D, dtype)
    grad = torch.randn(batch, T, D, device=part.device,
                       generator=torch.Generator(device=part.device).manual_seed(1)).to(dtype)
    oracle = [x.detach().double().requires_grad_() for x in inputs]
    s_ref = feedback_solve(*oracle, impl="dense")
    refs = [s_ref.detach(), *torch.autograd.grad(s_ref, oracle, grad.double())]
    del s_ref, oracle
    worst = 0.0
    for impl in ("triton", "chunked"):
        t0 = time.perf_counter()
        s = feedback_solve(*inputs, impl=impl, chunk_size=64)
        outs = [s.detach(), *torch.autograd.grad(s, inputs, grad)]
        part.sync()
        errors = {}
        for key, got, ref in zip(("s", "dq_b", "dk_b", "df", "dgamma"), outs, refs):
            errors[key] = [round(e, 8) for e in _rel_errors(got, ref)]
            worst = max(worst, errors[key][0])
        case[impl] = {"seconds_incl_compile": round(time.perf_counter() - t0, 3), "errors": errors}
        del s, outs
    case["worst_norm_rel"] = worst
    case["passed"] = bool(worst <= TOLERANCE[case["dtype"]])


def run(part: Part) -> None:
    part.result["tolerance_norm_rel"] = TOLERANCE
    cases = part.result["cases"] = []
    for batch, T, D in DRY_SHAPES if part.dry else GPU_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            case = {"B": batch, "T": T, "D": D, "dtype": str(dtype).removeprefix("torch.")}
            cases.append(case)
            if part.left() < 5:
                case["skipped"] = "out of time"
            else:
                try:
                    _check_case(part, case, batch, T, D, dtype)
                except Exception as error:  # recorded; the next case still runs
                    case["error"] = error_text(error)
                    case["passed"] = False
            part.save()
    done = [c for c in cases if "passed" in c]
    part.result["all_passed"] = bool(done) and all(c["passed"] for c in done) and len(done) == len(cases)
