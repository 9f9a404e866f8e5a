"""The prepared GPU check (issue 17): one command that measures what matters on a bare H100/H200.

    python benchmarks/gpu/check.py --out DIR            # on the GPU machine (run.sh calls this)
    python benchmarks/gpu/check.py --out DIR --dry-run  # on CPU: tiny shapes, Triton interpreter

Parts, each in its own process with its own time box (a part that fails or runs out of time is
reported, with whatever it finished, and the next one starts):
  env  versions, the device, measured bf16 / tf32 / fp32 matmul rates and copy bandwidth;
  a    correctness: Triton and chunked solves against the dense fp64 oracle, fp32 and bf16 inputs,
       the output and all four gradients, T in {64, 1000, 4096}, D in {256, 2048} plus shapes that
       are not multiples of the tiles;
  b    feedback solve forward and forward+backward time and TFLOP/s against one causal SDPA head of
       size D, T in {4096, 8192, 32768}, D = 2048, B = 1, bf16;
  c    one Sessa layer forward+backward at T = 131072, D = 2048 (bf16 autocast): time, peak memory;
  d    the 125M and 1.3B recipes at T = 8192, Sessa and the Transformer arm: forward + backward +
       optimizer step on synthetic tokens with the recipe's engine (megatron DDP + distributed
       optimizer), step time, tokens/s, model TFLOP/s and MFU from the FLOP ledger, peak memory.
Writes DIR/gpu.json (the same keys in a dry run) and DIR/gpu.md.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "sessa-gpu-check/1"
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (the recipes' logging.peak_tflops)
MEMORY_LIMIT_GB = 80.0  # part c's target: the T = 131072 layer fits an 80 GB card

# (key in gpu.json, GPU seconds, dry-run seconds). The GPU budgets add up to 7 minutes; run.sh's
# wheel install and each process's start come on top, within the 8.
PARTS = {
    "env": ("env", 20, 120),
    "a": ("a_correctness", 100, 300),
    "b": ("b_solve_vs_sdpa", 75, 200),
    "c": ("c_long_layer", 55, 200),
    "d1": ("d_train_step", 40, 200),
    "d2": ("d_train_step", 35, 200),
    "d3": ("d_train_step", 55, 200),
    "d4": ("d_train_step", 40, 200),
}
# Part d: (recipe, arch) per process, so one run's out-of-memory leaves the others a clean device.
TRAIN_RUNS = {"d1": ("125m", "sessa"), "d2": ("125m", "transformer"), "d3": ("1.3b", "sessa"),
              "d4": ("1.3b", "transformer")}
GRACE_S = 20  # a part past its box is first asked to finish (soft deadline), killed this much later


# ------------------------------------------------------------------------------------------------
# Worker side: one part in this process, results saved after every case
# ------------------------------------------------------------------------------------------------
class Part:
    """What a part function gets: the device, dry-run flag, a soft deadline and an incremental result."""

    def __init__(self, name: str, dry: bool, deadline: float, result_path: Path):
        import torch

        self.name, self.dry, self.deadline, self.path = name, dry, deadline, result_path
        self.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
        if not dry and self.device.type != "cuda":
            raise RuntimeError("no CUDA device: run the GPU check on a GPU machine, or pass --dry-run")
        self.result: dict = {}

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.path)

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, step, reps: int, max_s: float) -> float:
        """Median seconds of `step` over up to `reps` runs (at least one), stopping after `max_s`."""
        times = []
        start = time.perf_counter()
        while len(times) < reps and (not times or time.perf_counter() - start < max_s):
            self.sync()
            t0 = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def reset_peak(self) -> int:
        import torch

        if self.device.type != "cuda":
            return 0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_gb(self, base: int = 0) -> float | None:
        import torch

        if self.device.type != "cuda":
            return None
        return round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def _matmul_tflops(part: Part, dtype, n: int, tf32: bool = False) -> float:
    import torch

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


def part_env(part: Part) -> None:
    """Versions, the device, and this device's measured matmul rates and copy bandwidth."""
    import torch
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


# --- part a -------------------------------------------------------------------------------------
def _solve_inputs(part: Part, batch: int, T: int, D: int, dtype, seed: int = 0):
    import torch

    gen = torch.Generator(device=part.device).manual_seed(seed)
    q_b, k_b, f = (torch.randn(batch, T, D, device=part.device, generator=gen) for _ in range(3))
    gamma = 0.9 * torch.tanh(torch.randn(batch, T, device=part.device, generator=gen))
    return [x.to(dtype).requires_grad_() for x in (q_b, k_b, f, gamma)]


def _rel_errors(got, ref) -> tuple[float, float]:
    """(||got - ref|| / ||ref||, max |got - ref| / max |ref|), in fp64."""
    diff = got.double() - ref
    return (float(diff.norm() / ref.norm().clamp_min(1e-300)),
            float(diff.abs().max() / ref.abs().max().clamp_min(1e-300)))


def part_a(part: Part) -> None:
    """Triton and chunked against the dense fp64 oracle: s and dq_b, dk_b, df, dgamma."""
    import torch

    from kernels.feedback_solve import feedback_solve

    if part.dry:
        shapes = [(2, 37, 24), (1, 70, 20)]
    else:  # the shapes parts b-d run first (it compiles their kernels), then the rest
        shapes = [(1, 4096, 2048), (2, 1000, 2048), (2, 64, 2048), (1, 4096, 256), (2, 1000, 256), (2, 64, 256),
                  (2, 777, 200), (1, 1500, 1000)]
    tolerance = {"float32": 1e-4, "bfloat16": 2e-2}  # norm-relative, on every output
    part.result["tolerance_norm_rel"] = tolerance
    cases = part.result["cases"] = []
    for batch, T, D in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).removeprefix("torch.")
            case = {"B": batch, "T": T, "D": D, "dtype": name}
            cases.append(case)
            if part.left() < 5:
                case["skipped"] = "out of time"
                part.save()
                continue
            try:
                inputs = _solve_inputs(part, batch, T, D, dtype)
                grad = torch.randn(batch, T, D, device=part.device, generator=torch.Generator(
                    device=part.device).manual_seed(1)).to(dtype)
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
                case["passed"] = bool(worst <= tolerance[name])
            except Exception as error:  # recorded; the next case still runs
                case["error"] = _error_text(error)
                case["passed"] = False
            part.save()
    done = [c for c in cases if "passed" in c]
    part.result["all_passed"] = bool(done) and all(c["passed"] for c in done) and len(done) == len(cases)


# --- part b -------------------------------------------------------------------------------------
def attention_flops(T: int, K: int, V: int, backward: bool) -> float:
    """One causal head: T^2/2 pairs, QK^T and PV; backward 2.5x forward (scores recomputed)."""
    forward = 2 * (T * T / 2) * (K + V)
    return forward * (3.5 if backward else 1.0)


def feedback_executed_flops(T: int, K: int, V: int, backward: bool) -> float:
    """What the Triton solve executes (kernels/feedback_solve/README.md, Cost): (2K + V) T^2 forward,
    (4K + 3V) T^2 more in backward."""
    forward = (2 * K + V) * T * T
    return forward + ((4 * K + 3 * V) * T * T if backward else 0)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]


def _measure(part: Part, fn, inputs, row: dict, reps: int) -> None:
    """fwd / fwd+bwd median seconds and peak memory of fn(*inputs) into row."""
    import torch

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

    forward_backward()  # compile and warm up
    base = part.reset_peak()
    row["fwd_ms"] = round(1e3 * part.timed(forward, reps, max_s=max(1.0, part.left() / 6)), 3)
    row["fwd_peak_gb"] = part.peak_gb(base)
    base = part.reset_peak()
    row["fwd_bwd_ms"] = round(1e3 * part.timed(forward_backward, reps, max_s=max(1.0, part.left() / 4)), 3)
    row["fwd_bwd_peak_gb"] = part.peak_gb(base)


def part_b(part: Part) -> None:
    """Triton feedback solve vs one causal SDPA head of size D (the roof it is compared with)."""
    import torch
    from torch.nn.attention import sdpa_kernel

    from kernels.feedback_solve import feedback_solve

    D, dtype = (32, torch.float32) if part.dry else (2048, torch.bfloat16)
    seq_lens = [64, 128] if part.dry else [8192, 4096, 32768]  # the target's T first
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
                    inputs = _solve_inputs(part, 1, T, D, dtype)
                    _measure(part, lambda *x: feedback_solve(*x, impl="triton", chunk_size=64), inputs, row, reps)
                    fwd, fwd_bwd = (feedback_executed_flops(T, D, D, b) for b in (False, True))
                    row["fwd_executed_tflops"] = round(fwd / (row["fwd_ms"] * 1e-3) / 1e12, 2)
                    row["fwd_bwd_executed_tflops"] = round(fwd_bwd / (row["fwd_bwd_ms"] * 1e-3) / 1e12, 2)
                else:
                    gen = torch.Generator(device=part.device).manual_seed(0)
                    inputs = [torch.randn(1, 1, T, D, device=part.device, dtype=dtype, generator=gen).requires_grad_()
                              for _ in range(3)]
                    errors = []
                    for name, backend in _sdpa_backends():
                        try:
                            with sdpa_kernel([backend]):
                                _measure(part, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                                    q, k, v, is_causal=True), inputs, row, reps)
                            row["backend"] = name
                            break
                        except RuntimeError as error:  # this backend does not take the shape
                            errors.append(f"{name}: {_error_text(error)[:120]}")
                            part.reset_peak()
                    if "backend" not in row:
                        raise RuntimeError("no SDPA backend ran: " + "; ".join(errors))
                    if errors:
                        row["backends_refused"] = errors
                row["fwd_attention_tflops"] = round(attention_flops(T, D, D, False) / (row["fwd_ms"] * 1e-3) / 1e12, 2)
                row["fwd_bwd_attention_tflops"] = round(
                    attention_flops(T, D, D, True) / (row["fwd_bwd_ms"] * 1e-3) / 1e12, 2)
            except Exception as error:
                row["error"] = _error_text(error)
            finally:
                inputs = None
                part.reset_peak()
            part.save()
    ratios = {}
    for T in seq_lens:
        tri = next((r for r in rows if r["impl"] == "triton" and r["T"] == T and "fwd_bwd_ms" in r), None)
        ref = next((r for r in rows if r["impl"] == "sdpa" and r["T"] == T and "fwd_bwd_ms" in r), None)
        if tri and ref:
            ratios[str(T)] = {"fwd": round(tri["fwd_ms"] / ref["fwd_ms"], 3),
                              "fwd_bwd": round(tri["fwd_bwd_ms"] / ref["fwd_bwd_ms"], 3)}
    part.result["triton_over_sdpa"] = ratios


# --- part c -------------------------------------------------------------------------------------
def _autocast(part: Part):
    """The recipe's mixed precision: fp32 master weights, bf16 autocast on the GPU."""
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if part.device.type == "cuda" else contextlib.nullcontext()


def _fill_weights(module, std: float) -> None:
    """Weights normal(std), norms and the gamma bias 1, other vectors 0, drawn on the module's device
    (the recipe's layout-independent CPU init takes minutes at 1.3B and does not change the speed)."""
    import torch

    with torch.no_grad():
        gen = None
        for name, param in module.named_parameters():
            if gen is None:
                gen = torch.Generator(device=param.device).manual_seed(0)
            if ("norm" in name and name.endswith("weight")) or name.endswith("gamma_bias"):
                param.fill_(1.0)
            elif param.ndim <= 1:
                param.zero_()
            else:
                param.normal_(0.0, std, generator=gen)


def part_c(part: Part) -> None:
    """One Sessa layer (the 1.3B recipe's width and heads) forward+backward at a long context."""
    import torch

    from model import ModelConfig, SessaLayer

    T, D, heads, kv = (128, 32, 2, 1) if part.dry else (131072, 2048, 16, 4)
    impl = "triton"  # the interpreter in a dry run
    config = ModelConfig(vocab_size=256, hidden_size=D, num_layers=1, num_heads=heads, num_kv_heads=kv,
                         feedback_impl=impl, feedback_chunk_size=64 if not part.dry else 16)
    part.result |= {"T": T, "D": D, "num_heads": heads, "num_kv_heads": kv, "B": 1, "feedback_impl": impl,
                    "dtype": "bf16 autocast, fp32 weights" if part.device.type == "cuda" else "float32"}
    part.save()
    layer = SessaLayer(config).to(part.device)
    _fill_weights(layer, config.init_std)
    x = torch.randn(T, 1, D, device=part.device).requires_grad_()

    def step():
        with _autocast(part):
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
        if not _is_oom(error):
            raise
        part.result["error"] = _error_text(error)
        part.result["fits_80gb"] = False


# --- part d -------------------------------------------------------------------------------------
def _ledger():
    """flops_per_token, count_params of the FLOP ledger (model/flops.py; pretrain/scaling/flops.py before)."""
    try:
        from model.flops import count_params, flops_per_token
    except ImportError:
        from pretrain.scaling.flops import count_params, flops_per_token
    return flops_per_token, count_params


def _no_weight_decay(param, name: str) -> bool:
    """As the recipe: norms, biases and the gamma gate are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or ".gamma_" in name


def _recipe(name: str, dry: bool) -> tuple[dict, dict, int, int]:
    """(model fields, optim fields, seq_len, micro-batch) of configs/<name>.yaml (a tiny stand-in in a dry run)."""
    import yaml

    data = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    if dry:
        model = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     feedback_chunk_size=16)
        return model, data["optim"], 64, data["train"]["micro_batch_size"]
    return data["model"], data["optim"], 8192, data["train"]["micro_batch_size"]


def _init_parallel(part: Part) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if part.device.type == "cuda":
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    else:
        from model import cpu_compat

        cpu_compat.enable()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def _build_engine(part: Part, model_config, optim: dict):
    """The recipe's engine in one process: model chunk, megatron DDP, (distributed) optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    from model.transformer import build_model, megatron_config_for

    cuda = part.device.type == "cuda"
    # On the GPU the weights are allocated there and drawn there (_fill_weights).
    megatron_config = megatron_config_for(model_config, calculate_per_token_loss=True,
                                          use_cpu_initialization=not cuda, perform_initialization=False)
    model = build_model(model_config, megatron_config).to(part.device)
    _fill_weights(model, model_config.init_std)
    ddp = DistributedDataParallel(megatron_config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True), model)
    megatron_config.finalize_model_grads_func = finalize_model_grads
    megatron_config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=optim["lr"], min_lr=optim.get("min_lr", 0.0),
                        weight_decay=optim.get("weight_decay", 0.0), clip_grad=optim.get("grad_clip", 1.0),
                        use_distributed_optimizer=True, params_dtype=megatron_config.params_dtype),
        [ddp], config_overrides={ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="no_decay", fn=_no_weight_decay)): ParamGroupOverride(wd_mult=0.0)})
    return ddp, optimizer


def part_d(part: Part, recipe: str, arch: str) -> None:
    """One training step loop of `recipe` (configs/<recipe>.yaml) for `arch` at its 8k context."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from model import ModelConfig

    flops_per_token, count_params = _ledger()
    fields, optim, T, micro_batch = _recipe(recipe, part.dry)
    model_config = ModelConfig(**(fields | {"arch": arch}))
    run = {"recipe": recipe, "arch": arch, "seq_len": T, "micro_batch_size": micro_batch,
           "params_m": round(count_params(model_config) / 1e6, 2),
           "model_flops_per_token": flops_per_token(model_config, T)}
    part.result["run"] = run
    part.save()
    _init_parallel(part)
    ddp, optimizer = _build_engine(part, model_config, optim)
    vocab = model_config.vocab_size

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        with _autocast(part):
            per_token_loss = model(tokens[:, :-1], tokens[:, 1:])

        def loss_func(output):
            total = output.float().sum()
            count = torch.tensor(output.numel(), device=output.device, dtype=torch.int)
            return total, count, {"lm loss": torch.stack((total.detach(), count.float()))}

        return per_token_loss, loss_func

    def step(batch_size: int) -> float:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        tokens = torch.randint(0, vocab, (batch_size, T + 1), device=part.device)
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[ddp], num_microbatches=1,
            seq_length=T, micro_batch_size=batch_size, forward_only=False)
        optimizer.step()
        loss = reduced[0]["lm loss"]
        return float(loss[0] / loss[1])

    batch_sizes = [micro_batch] + ([1] if micro_batch > 1 else [])
    for batch_size in batch_sizes:  # the recipe's micro-batch, then 1 if that does not fit
        try:
            t0 = time.perf_counter()
            step(batch_size)  # compile and warm up
            part.sync()
            run["first_step_s"] = round(time.perf_counter() - t0, 3)
            losses = []
            base = part.reset_peak()
            run["step_s"] = round(part.timed(lambda: losses.append(step(batch_size)), reps=5,
                                             max_s=max(1.0, part.left() - 5)), 4)
            run["micro_batch_size"] = batch_size
            run["loss"] = round(losses[-1], 4)
            run["timed_steps"] = len(losses)
            run["peak_gb"] = part.peak_gb()
            run["peak_above_start_gb"] = part.peak_gb(base)
            tokens_per_s = batch_size * T / run["step_s"]
            run["tokens_per_s"] = round(tokens_per_s, 1)
            tflops = run["model_flops_per_token"] * tokens_per_s / 1e12
            run["model_tflops"] = float(f"{tflops:.4g}")
            run["mfu"] = float(f"{tflops / PEAK_BF16_TFLOPS:.4g}")
            run.pop("error", None)
            break
        except Exception as error:
            if not _is_oom(error):
                raise
            run["error"] = f"micro-batch {batch_size}: {_error_text(error)}"
            optimizer.zero_grad()
            part.reset_peak()
        finally:
            part.save()


def run_worker(key: str, dry: bool, deadline: float, result_path: Path) -> int:
    sys.path.insert(0, str(ROOT))
    part = Part(key, dry, deadline, result_path)
    try:
        if key == "env":
            part_env(part)
        elif key == "a":
            part_a(part)
        elif key == "b":
            part_b(part)
        elif key == "c":
            part_c(part)
        else:
            part_d(part, *TRAIN_RUNS[key])
    except Exception as error:
        part.result["error"] = _error_text(error)
        part.result["traceback"] = traceback.format_exc()[-4000:]
        part.save()
        return 1
    part.result["done"] = True
    part.save()
    return 0


# ------------------------------------------------------------------------------------------------
# Orchestrator: one process per part, time boxes, gpu.json and gpu.md
# ------------------------------------------------------------------------------------------------
def _run_part(key: str, dry: bool, out: Path, scale: float) -> dict:
    budget = PARTS[key][2 if dry else 1] * scale
    result_path = out / f".part-{key}.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", key, "--result", str(result_path),
               "--deadline", str(time.time() + budget)] + (["--dry-run"] if dry else [])
    start = time.time()
    status, tail = "ok", ""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=budget + GRACE_S, cwd=ROOT)
        tail = (proc.stdout + proc.stderr)[-3000:]
        if proc.returncode != 0:
            status = "failed"
    except subprocess.TimeoutExpired as expired:
        status = "timeout"
        tail = ((expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace"))[-3000:]
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result_path.unlink(missing_ok=True)
    if status == "ok" and not result.get("done"):
        status = "failed"
    if status != "ok":
        result.setdefault("error", f"{status}: " + (tail.strip().splitlines() or ["no output"])[-1][:300])
        result["log_tail"] = tail
    result.pop("done", None)
    return {"status": status, "seconds": round(time.time() - start, 1), "budget_s": round(budget, 1), **result}


def _targets(parts: dict) -> dict:
    """The issue's targets, from what was measured (None where it was not)."""
    ratio = parts["b_solve_vs_sdpa"].get("triton_over_sdpa", {}).get("8192", {}).get("fwd_bwd")
    runs = {(r["recipe"], r["arch"]): r for r in parts["d_train_step"].get("runs", [])}

    def mfu(recipe):
        return runs.get((recipe, "sessa"), {}).get("mfu")

    def check(value, bound, below):
        return None if value is None else bool(value <= bound if below else value >= bound)

    fits = parts["c_long_layer"].get("fits_80gb")
    return {
        "triton_fwd_bwd_over_sdpa_T8192": {"value": ratio, "target": "<= 2.0 (stretch 1.25)",
                                           "met": check(ratio, 2.0, True), "stretch_met": check(ratio, 1.25, True)},
        "layer_T131072_fits_80gb": {"value": parts["c_long_layer"].get("peak_gb"), "target": "<= 80 GB",
                                    "met": fits},
        "mfu_125m": {"value": mfu("125m"), "target": ">= 0.38", "met": check(mfu("125m"), 0.38, False)},
        "mfu_1.3b": {"value": mfu("1.3b"), "target": ">= 0.45", "met": check(mfu("1.3b"), 0.45, False)},
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def render_markdown(report: dict) -> str:
    """gpu.md: the tables of gpu.json."""
    parts, env = report["parts"], report["parts"]["env"]
    info = env.get("info", {})
    lines = [f"# GPU check {'(dry run, CPU: numbers meaningless)' if report['dry_run'] else ''}".rstrip(), "",
             f"{report['date_utc']} · {info.get('device_name', info.get('device', '?'))} · torch {info.get('torch')} · "
             f"triton {info.get('triton')} · megatron-core {info.get('megatron_core')} · commit {report['git_commit']}"
             f" · {report['total_seconds']} s", "",
             f"Measured here: bf16 matmul {_fmt(env.get('bf16_matmul_tflops'))} TFLOP/s, tf32 "
             f"{_fmt(env.get('tf32_matmul_tflops'))}, fp32 {_fmt(env.get('fp32_matmul_tflops'))}; copy "
             f"{_fmt(env.get('copy_tb_s'))} TB/s (read + write).", "",
             "| part | status | seconds (box) | error |", "|---|---|---|---|"]
    for key, part in parts.items():
        lines.append(f"| {key} | {part['status']} | {part['seconds']} ({part['budget_s']}) | {part.get('error', '')} |")
    a = parts["a_correctness"]
    lines += ["", f"## a. Correctness (norm-relative error vs dense fp64; tolerance {a.get('tolerance_norm_rel')})", "",
              "| B | T | D | dtype | triton worst | chunked worst | passed |", "|---|---|---|---|---|---|---|"]
    for case in a.get("cases", []):
        worst = {impl: max((e[0] for e in case[impl]["errors"].values()), default=None) if impl in case else None
                 for impl in ("triton", "chunked")}
        lines.append(f"| {case['B']} | {case['T']} | {case['D']} | {case['dtype']} | {_fmt(worst['triton'])} | "
                     f"{_fmt(worst['chunked'])} | {case.get('passed', case.get('skipped', '-'))}"
                     f"{' ' + case['error'] if 'error' in case else ''} |")
    lines += ["", "## b. Feedback solve vs causal SDPA (one head of size D, B = 1)", "",
              "| impl | T | D | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s (attention formula) | executed TFLOP/s | "
              "peak GB | note |", "|---|---|---|---|---|---|---|---|---|"]
    for row in parts["b_solve_vs_sdpa"].get("rows", []):
        note = row.get("error") or row.get("skipped") or row.get("backend", "")
        lines.append(f"| {row['impl']} | {row['T']} | {row['D']} | {_fmt(row.get('fwd_ms'))} | "
                     f"{_fmt(row.get('fwd_bwd_ms'))} | {_fmt(row.get('fwd_bwd_attention_tflops'))} | "
                     f"{_fmt(row.get('fwd_bwd_executed_tflops'))} | {_fmt(row.get('fwd_bwd_peak_gb'))} | {note} |")
    for T, ratio in parts["b_solve_vs_sdpa"].get("triton_over_sdpa", {}).items():
        lines.append(f"\ntriton / sdpa at T = {T}: forward {ratio['fwd']}x, forward+backward {ratio['fwd_bwd']}x")
    c = parts["c_long_layer"]
    lines += ["", "## c. One Sessa layer forward+backward", "",
              f"T = {c.get('T')}, D = {c.get('D')}, heads {c.get('num_heads')}/{c.get('num_kv_heads')}, "
              f"{c.get('dtype')}: {_fmt(c.get('fwd_bwd_s'))} s, peak {_fmt(c.get('peak_gb'))} GB "
              f"(fits 80 GB: {c.get('fits_80gb')}){' · ' + c['error'] if 'error' in c else ''}"]
    lines += ["", "## d. Training step (synthetic tokens, megatron DDP + distributed Adam, bf16 autocast)", "",
              "| recipe | arch | params M | T | micro-batch | step s | tokens/s | model TFLOP/s | MFU (989) | "
              "peak GB | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in parts["d_train_step"].get("runs", []):
        lines.append(f"| {run['recipe']} | {run['arch']} | {run.get('params_m')} | {run.get('seq_len')} | "
                     f"{run.get('micro_batch_size')} | {_fmt(run.get('step_s'))} | {_fmt(run.get('tokens_per_s'))} | "
                     f"{_fmt(run.get('model_tflops'))} | {_fmt(run.get('mfu'))} | {_fmt(run.get('peak_gb'))} | "
                     f"{run.get('status', '')} {run.get('error', '')} |")
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for name, target in report["targets"].items():
        lines.append(f"| {name} ({target['target']}) | {_fmt(target['value'])} | {target['met']} |")
    return "\n".join(lines) + "\n"


def _assemble(header: dict, collected: dict, dry: bool, start: float) -> dict:
    """gpu.json's content from the parts collected so far (the others: status "pending")."""
    report = dict(header, parts={})
    for key, (name, _, _) in PARTS.items():
        part = collected.get(key, {"status": "pending", "seconds": 0, "budget_s": 0})
        if name != "d_train_step":
            report["parts"][name] = part
            continue
        runs = report["parts"].setdefault(name, {"status": "ok", "seconds": 0.0, "budget_s": 0.0, "runs": []})
        run = dict(part.get("run", {"recipe": TRAIN_RUNS[key][0], "arch": TRAIN_RUNS[key][1]}))
        run["status"] = part["status"]
        if "error" in part:
            run["error"] = part["error"]
        runs["runs"].append(run)
        runs["seconds"] = round(runs["seconds"] + part["seconds"], 1)
        runs["budget_s"] = round(runs["budget_s"] + part["budget_s"], 1)
        if part["status"] != "ok" and runs["status"] == "ok":
            runs["status"] = part["status"]
    report["targets"] = _targets(report["parts"])
    if dry:  # tiny shapes on a CPU: nothing to judge
        for target in report["targets"].values():
            for key in ("met", "stretch_met"):
                if key in target:
                    target[key] = None
    report["total_seconds"] = round(time.time() - start, 1)
    return report


def run_all(out: Path, dry: bool, parts: list[str], scale: float) -> dict:
    """Every part in turn; gpu.json and gpu.md are rewritten after each one, so a run cut short
    still leaves what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    header = {"schema": SCHEMA, "dry_run": dry,
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "git_commit": _git_commit()}
    collected = {key: {"status": "skipped", "seconds": 0, "budget_s": 0} for key in PARTS if key not in parts}

    def write() -> dict:
        report = _assemble(header, collected, dry, start)
        (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (out / "gpu.md").write_text(render_markdown(report))
        return report

    for key in [key for key in PARTS if key in parts]:
        print(f"[gpu-check] part {key}: up to {PARTS[key][2 if dry else 1] * scale:.0f} s", flush=True)
        result = collected[key] = _run_part(key, dry, out, scale)
        print(f"[gpu-check] part {key}: {result['status']} in {result['seconds']} s"
              f"{': ' + result['error'] if 'error' in result else ''}", flush=True)
        if key == "env":
            print("[gpu-check] " + json.dumps({k: v for k, v in result.items() if k != "log_tail"}), flush=True)
        write()
    return write()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="which parts to run")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time box")
    parser.add_argument("--worker", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    if args.worker:
        return run_worker(args.worker, args.dry_run, args.deadline, args.result)
    report = run_all(args.out, args.dry_run, args.parts, args.budget_scale)
    print(render_markdown(report))
    print(f"[gpu-check] wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
