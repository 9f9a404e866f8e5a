"""Roofline model of the Triton feedback solve, per kernel launch, and the CPU path's measured efficiency.

    python benchmarks/roofline.py                          # H100 model, B=1, T=8192, D=2048, bf16 inputs
    python benchmarks/roofline.py --seq-len 32768 --per-launch
    python benchmarks/roofline.py --check-grids            # the model's grids == the launchers' (no GPU)
    python benchmarks/roofline.py --cpu-layer              # measure one layer fwd+bwd on this CPU
    python benchmarks/roofline.py --tensor-parallel 1 2 4 8  # the solve per TP rank: which split, and why

The model enumerates the launches of `feedback_triton_fwd` / `feedback_triton_bwd`
(kernels/feedback_solve/triton_chunk.py) with the shipped tiles (`GPU_CONFIG`), and per launch counts
  - FLOPs of the `tl.dot`s as coded (tiles wholly at j >= t skipped, everything else padded to tiles),
    split by input precision: "tf32" (bf16 inputs' large contractions), "ieee" (the 16 x 16 diagonal
    inverse, fp32 FMA);
  - bytes: `unique` = every tensor region read or written once (the DRAM floor), and `requested` = the
    tile loads and stores as coded (re-reads served by L2 or DRAM);
  - programs per launch, the longest program's FLOPs, and the dependent steps inside one program
    (the diagonal blocks a solve program walks in order);
and predicts its time at the given peaks:
    t = max(FLOPs / (peak * u), longest program / (peak / SMs), unique bytes / (HBM * u), steps * step latency)
        + launch gap,  u = min(1, programs / SMs)
(a launch with fewer programs than SMs leaves the rest idle; one program runs on one SM). The step
latency of the sequential solve (a store of solved rows, a barrier, their reload and a chain of 16 x 16
dots) and the launch gap are assumptions, printed with the result. All launches run in stream order
and share one panel buffer, so the sequential depth is the number of launches.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100 = {"bf16_tflops": 800.0, "fp32_tflops": 60.0, "hbm_tb_s": 3.3, "sms": 132}
STEP_LATENCY_US = 1.0  # one diagonal block of the sequential solve (store, barrier, reload, 7 dependent dots)
LAUNCH_GAP_US = 3.0  # drain + fill between two dependent launches on one stream
KERNELS = ("feedback_lse_kernel", "feedback_probs_kernel", "feedback_dlogits_kernel", "panel_matmul_kernel",
           "feedback_solve_fwd_kernel", "feedback_solve_bwd_kernel")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Launch:
    """One kernel launch (or a PyTorch op between launches, kernel "torch:...") and its costs."""

    phase: str  # "fwd", "bwd-lam" (the transposed solve), "bwd-grads" (delta, dq, dk)
    role: str  # what it computes
    kernel: str
    grid: tuple
    flops: dict = field(default_factory=dict)  # precision -> FLOPs
    max_program_flops: dict = field(default_factory=dict)
    bytes_unique: float = 0.0
    bytes_requested: float = 0.0
    steps: int = 1  # dependent steps inside one program

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def predict(self, peaks: dict) -> dict:
        """Seconds per bound and the predicted time (see the module docstring)."""
        rate = {"tf32": peaks["bf16_tflops"] / 2, "tf32x3": peaks["bf16_tflops"] / 6, "ieee": peaks["fp32_tflops"],
                "bf16": peaks["bf16_tflops"]}
        sms = peaks["sms"]
        u = min(1.0, self.programs / sms)
        compute = sum(f / (rate[p] * 1e12 * u) for p, f in self.flops.items())
        program = sum(f / (rate[p] * 1e12 / sms) for p, f in self.max_program_flops.items())
        memory = self.bytes_unique / (peaks["hbm_tb_s"] * 1e12 * u)
        sequential = self.steps * STEP_LATENCY_US * 1e-6 if self.steps > 1 else 0.0
        bounds = {"compute": compute, "program": program, "memory": memory, "sequential": sequential}
        bound = max(bounds, key=bounds.get)
        return {**bounds, "bound": bound, "time": bounds[bound] + LAUNCH_GAP_US * 1e-6}


def _dot(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


class Model:
    """The launches of one forward + backward at (B, T, K, V) with `config` tiles (GPU_CONFIG by default)."""

    def __init__(self, batch: int, T: int, K: int, V: int, chunk_size: int = 64, panel_size: int | None = None,
                 config=None, in_bytes: int = 2, precision: str = "tf32"):
        from kernels.feedback_solve import triton_chunk

        self.B, self.T, self.K, self.V = batch, T, K, V
        self.config = config or triton_chunk.GPU_CONFIG
        self.L = triton_chunk._panel_rows(T, chunk_size, panel_size or triton_chunk.DEFAULT_PANEL_SIZE)
        self.C = min(chunk_size, self.config.max_solve_block)
        self.e, self.precision = in_bytes, precision  # input element bytes; the large contractions' precision
        # the logits dots (lse, probs) take bf16/fp16 q, k as loaded (QK_NATIVE): the half-precision MMA rate
        self.qk_precision = "bf16" if in_bytes == 2 else precision

    # --- per-kernel costs, mirroring triton_kernels.py ------------------------------------------
    def lse(self) -> Launch:
        """Programs (row tile, key segment): the segment's key tiles up to the diagonal."""
        from kernels.feedback_solve import triton_chunk

        t = self.config.lse
        B, T, K, e = self.B, self.T, self.K, self.e
        Kp = cdiv(K, t.block_k) * t.block_k
        seg = triton_chunk._lse_segment(T, t, self.config.lse_segments) // t.block_n  # key tiles per segment
        n_seg = cdiv(T, seg * t.block_n)
        tiles = [max(0, min(cdiv(min(T, (i + 1) * t.block_m), t.block_n), (g + 1) * seg) - g * seg)
                 for i in range(cdiv(T, t.block_m)) for g in range(n_seg)]
        flops = B * sum(tiles) * _dot(t.block_m, t.block_n, Kp)
        return Launch("fwd", "lse: row log-sum-exp per key segment", "feedback_lse_kernel",
                      (cdiv(T, t.block_m), n_seg, B), {self.qk_precision: flops},
                      {self.qk_precision: max(tiles) * _dot(t.block_m, t.block_n, Kp)},
                      bytes_unique=B * (2 * T * K * e + n_seg * T * 4),
                      bytes_requested=B * sum(tiles) * (t.block_m + t.block_n) * K * e + B * n_seg * T * 4)

    def lse_merge(self) -> Launch:
        from kernels.feedback_solve import triton_chunk

        n_seg = cdiv(self.T, triton_chunk._lse_segment(self.T, self.config.lse, self.config.lse_segments))
        return self.torch_op("fwd", "lse merge: logsumexp over segments", self.B * self.T * 4 * (n_seg + 2))

    def probs(self, phase, role, rows, cols, times_gamma=False) -> Launch:
        t = self.config.probs
        B, K, e = self.B, self.K, self.e
        (t0, t1), (j0, j1) = rows, cols
        gm, gn = cdiv(t1 - t0, t.block_m), cdiv(j1 - j0, t.block_n)
        Kp = cdiv(K, t.block_k) * t.block_k
        live = sum(1 for i in range(gm) for j in range(gn) if not j0 + j * t.block_n >= t0 + i * t.block_m + t.block_m - 1)
        tile = t.block_m * t.block_n
        flops = B * live * _dot(t.block_m, t.block_n, Kp)
        return Launch(phase, role, "feedback_probs_kernel", (gm, gn, B), {self.qk_precision: flops},
                      {self.qk_precision: _dot(t.block_m, t.block_n, Kp) if live else 0},
                      bytes_unique=B * ((t1 - t0 + j1 - j0) * K * e + (t1 - t0) * (4 + e * times_gamma)
                                        + (t1 - t0) * (j1 - j0) * 4),
                      bytes_requested=B * (live * (t.block_m + t.block_n) * K * e + gm * gn * tile * 4))

    def matmul(self, phase, role, M, N, J, a_bytes, x_bytes, accumulate=False) -> Launch:
        t = self.config.matmul
        B = self.B
        gm, gn = cdiv(M, t.block_m), cdiv(N, t.block_n)
        Jp = cdiv(J, t.block_k) * t.block_k
        out = M * N * 4 * (2 if accumulate else 1)
        return Launch(phase, role, "panel_matmul_kernel", (gm, gn, B), {self.precision: B * gm * gn * _dot(t.block_m, t.block_n, Jp)},
                      {self.precision: _dot(t.block_m, t.block_n, Jp)},
                      bytes_unique=B * (M * J * a_bytes + J * N * x_bytes + out),
                      bytes_requested=B * (gm * gn * J * (t.block_m * a_bytes + t.block_n * x_bytes) + out))

    def dlogits(self, r0, r1) -> Launch:
        t = self.config.dlogits
        B, V, e = self.B, self.V, self.e
        n = r1 - r0
        gm, gn = cdiv(n, t.block_m), cdiv(r1, t.block_n)
        Vp = cdiv(V, t.block_k) * t.block_k
        live = sum(1 for i in range(gm) for j in range(gn) if not j * t.block_n >= r0 + i * t.block_m + t.block_m - 1)
        tile = t.block_m * t.block_n
        return Launch("bwd-grads", "dlogits: P -> dL/dlogits in place", "feedback_dlogits_kernel", (gm, gn, B),
                      {self.precision: B * live * _dot(t.block_m, t.block_n, Vp)},
                      {self.precision: _dot(t.block_m, t.block_n, Vp) if live else 0},
                      bytes_unique=B * (n * V * 4 + r1 * V * e + 2 * n * r1 * 4),
                      bytes_requested=B * live * ((t.block_m * 4 + t.block_n * e) * V + 2 * tile * 4))

    def solve(self, phase, r0, r1, has_context, forward) -> Launch:
        cfg = self.config
        B, V, C, BJ, BV = self.B, self.V, self.C, cfg.solve_block_j, cfg.solve_block_v
        n_c = cdiv(r1 - r0, C)
        # in-panel sum of block i: the solved blocks before it (forward) or after it (backward), BJ rows a step
        sums = [cdiv(i * C, BJ) if forward else cdiv(max(0, (r1 - r0) - (i + 1) * C), BJ) for i in range(n_c)]
        log2 = C.bit_length() - 1
        inverse = log2 * _dot(C, BV, C) + (log2 - 1) * _dot(C, C, C)  # per block: x += A x, A = A A
        programs = cdiv(V, BV) * B
        per_program_sum = sum(sums) * _dot(C, BV, BJ)
        rhs = self.e  # f (forward) or grad_s (backward), in the input dtype
        return Launch(phase, "solve: diagonal blocks in order" + ("" if forward else " (transposed)"),
                      "feedback_solve_fwd_kernel" if forward else "feedback_solve_bwd_kernel", (cdiv(V, BV), B),
                      {self.precision: programs * per_program_sum, "ieee": programs * n_c * inverse},
                      {self.precision: per_program_sum, "ieee": n_c * inverse},
                      bytes_unique=B * ((r1 - r0) * V * (4 + rhs + 4 * has_context) + (r1 - r0) * (r1 - r0) * 4 / 2),
                      bytes_requested=programs * (sum(sums) * BJ * (C + BV) * 4
                                                  + n_c * (C * C * 4 + C * BV * (4 + rhs + 4 * has_context))),
                      steps=n_c)

    def torch_op(self, phase, role, nbytes) -> Launch:
        return Launch(phase, role, "torch:" + role.split(":")[0], (cdiv(nbytes, 4 * 1024),), {}, {},
                      bytes_unique=nbytes, bytes_requested=nbytes)

    # --- the launchers' loops -------------------------------------------------------------------
    def forward(self) -> list[Launch]:
        T, L, V, e = self.T, self.L, self.V, self.e
        launches = [self.lse(), self.lse_merge()]
        for r0 in range(0, T, L):
            r1 = min(r0 + L, T)
            launches.append(self.probs("fwd", "probs: P[r0:r1, :r1]", (r0, r1), (0, r1)))
            if r0 > 0:
                launches.append(self.matmul("fwd", "matmul: context = P[:, :r0] @ s[:r0]", r1 - r0, V, r0, 4, 4))
            launches.append(self.solve("fwd", r0, r1, r0 > 0, forward=True))
        launches.append(self.torch_op("fwd", "cast: s to the input dtype", self.B * T * V * (4 + e)))
        return launches

    def backward(self) -> list[Launch]:
        T, L, K, V, e, B = self.T, self.L, self.K, self.V, self.e, self.B
        launches = []
        for c0 in range((T - 1) // L * L, -1, -L):
            c1 = min(c0 + L, T)
            launches.append(self.probs("bwd-lam", "probs: B^T column panel [c0:c1, c0:]", (c0, T), (c0, c1),
                                       times_gamma=True))
            if c1 < T:
                launches.append(self.matmul("bwd-lam", "matmul: context = B^T[:, c1:] @ lam[c1:]", c1 - c0, V,
                                            T - c1, 4, 4))
            launches.append(self.solve("bwd-lam", c0, c1, c1 < T, forward=False))
        launches.append(self.torch_op("bwd-grads", "zeros: dk", B * T * K * 4))
        for r0 in range(0, T, L):
            r1 = min(r0 + L, T)
            n = r1 - r0
            launches.append(self.probs("bwd-grads", "probs: P[r0:r1, :r1]", (r0, r1), (0, r1)))
            launches.append(self.matmul("bwd-grads", "matmul: u = P @ s", n, V, r1, 4, e))
            launches.append(self.torch_op("bwd-grads", "delta: (lam * u).sum(-1)", B * n * V * 4 * 4))
            launches.append(self.dlogits(r0, r1))
            launches.append(self.matmul("bwd-grads", "matmul: dq = dS @ k", n, K, r1, 4, e))
            launches.append(self.matmul("bwd-grads", "matmul: dk += dS^T @ q", r1, K, n, 4, e, accumulate=True))
        launches.append(self.torch_op("bwd-grads", "cast: dq, dk, lam, delta to the input dtypes",
                                      B * T * (2 * K + V) * (4 + e)))
        return launches


# ------------------------------------------------------------------------------------------------
# The launchers' real grids
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def capture_launches(execute: bool):
    """Record (kernel name, grid) of every Triton launch the feedback launchers make; with
    execute=False the kernels are not run (grids only; outputs are garbage)."""
    from kernels.feedback_solve import triton_chunk

    log: list[tuple[str, tuple]] = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                log.append((self.name, tuple(grid(kwargs) if callable(grid) else grid)))
                if execute:
                    return self.kernel[grid](*args, **kwargs)
            return launch

    originals = {name: getattr(triton_chunk, name) for name in KERNELS}
    try:
        for name, kernel in originals.items():
            setattr(triton_chunk, name, Recorder(name, kernel))
        yield log
    finally:
        for name, kernel in originals.items():
            setattr(triton_chunk, name, kernel)


def real_launches(batch, T, K, V, chunk_size=64, panel_size=None, config=None, dtype=None, execute=False):
    """[(kernel, grid)] of one feedback_triton_fwd + feedback_triton_bwd on CPU tensors."""
    import torch

    from kernels.feedback_solve import triton_chunk

    dtype = dtype or torch.bfloat16
    panel_size = panel_size or triton_chunk.DEFAULT_PANEL_SIZE
    gen = torch.Generator().manual_seed(0)
    q_b, k_b, f = (torch.randn(batch, T, n, generator=gen).to(dtype) for n in (K, K, V))
    gamma = (0.9 * torch.tanh(torch.randn(batch, T, generator=gen))).to(dtype)
    with capture_launches(execute) as log:
        s, lse = triton_chunk.feedback_triton_fwd(q_b, k_b, f, gamma, chunk_size, panel_size, config=config)
        triton_chunk.feedback_triton_bwd(q_b, k_b, gamma, s.to(dtype), lse, torch.ones_like(f), chunk_size,
                                         panel_size, config=config)
    return log


def model_launches(model: Model) -> list[tuple[str, tuple]]:
    return [(x.kernel, x.grid) for x in model.forward() + model.backward() if not x.kernel.startswith("torch:")]


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def summarise(model: Model, peaks: dict) -> dict:
    """Per-launch predictions, grouped by (phase, role), and the totals."""
    launches = model.forward() + model.backward()
    groups: dict = {}
    for x in launches:
        p = x.predict(peaks)
        g = groups.setdefault((x.phase, x.role), {
            "phase": x.phase, "role": x.role, "kernel": x.kernel, "launches": 0, "programs_min": x.programs,
            "programs_max": x.programs, "gflop": 0.0, "unique_mb": 0.0, "requested_mb": 0.0, "steps": 0,
            "time_us": 0.0, "bounds": {}})
        g["launches"] += 1
        g["underfilled"] = g.get("underfilled", 0) + (x.programs < peaks["sms"])
        g["programs_min"] = min(g["programs_min"], x.programs)
        g["programs_max"] = max(g["programs_max"], x.programs)
        g["gflop"] += sum(x.flops.values()) / 1e9
        g["unique_mb"] += x.bytes_unique / 1e6
        g["requested_mb"] += x.bytes_requested / 1e6
        g["steps"] += x.steps if x.steps > 1 else 0
        g["time_us"] += p["time"] * 1e6
        g["bounds"][p["bound"]] = g["bounds"].get(p["bound"], 0) + 1
    total = {phase: sum(g["time_us"] for g in groups.values() if g["phase"].startswith(phase)) for phase in ("fwd", "bwd")}
    T, K, V = model.T, model.K, model.V
    attention_fwd = 2 * model.B * (T * T / 2) * (K + V)
    sdpa_us = {"fwd": attention_fwd / (peaks["bf16_tflops"] * 1e12) * 1e6,
               "fwd_bwd": 3.5 * attention_fwd / (peaks["bf16_tflops"] * 1e12) * 1e6}
    sequential = sum(g["time_us"] for g in groups.values() if g["role"].startswith("solve"))
    return {
        "shape": {"B": model.B, "T": T, "K": K, "V": V, "panel": model.L, "diag_block": model.C},
        "peaks": peaks, "assumptions": {"step_latency_us": STEP_LATENCY_US, "launch_gap_us": LAUNCH_GAP_US},
        "groups": list(groups.values()),
        "launches": {"fwd": sum(1 for x in launches if x.phase == "fwd"),
                     "bwd": sum(1 for x in launches if x.phase != "fwd"),
                     "triton": sum(1 for x in launches if not x.kernel.startswith("torch:"))},
        "predicted_us": {"fwd": total["fwd"], "bwd": total["bwd"], "fwd_bwd": total["fwd"] + total["bwd"]},
        "sdpa_ideal_us": sdpa_us,
        "ratio_to_sdpa_ideal": {"fwd": total["fwd"] / sdpa_us["fwd"],
                                "fwd_bwd": (total["fwd"] + total["bwd"]) / sdpa_us["fwd_bwd"]},
        "sequential_solve_us": sequential,
        "underfilled": [f"{g['phase']} {g['role'].split(':')[0]} ({g['underfilled']} of {g['launches']})"
                        for g in groups.values() if g["underfilled"]],
    }


def print_report(summary: dict, per_launch: list | None = None) -> None:
    s, pk = summary["shape"], summary["peaks"]
    print(f"Triton feedback solve, B={s['B']} T={s['T']} K={s['K']} V={s['V']}, panel L={s['panel']}, "
          f"diagonal block {s['diag_block']}; peaks: {pk['bf16_tflops']:g} bf16 / {pk['bf16_tflops'] / 2:g} tf32 / "
          f"{pk['fp32_tflops']:g} fp32 TFLOP/s, {pk['hbm_tb_s']:g} TB/s, {pk['sms']} SMs; assumed "
          f"{summary['assumptions']['step_latency_us']} us per sequential solve step, "
          f"{summary['assumptions']['launch_gap_us']} us gap per launch")
    print(f"{'phase':9s} {'role':44s} {'n':>3s} {'programs':>11s} {'GFLOP':>8s} {'uniq MB':>8s} {'req MB':>8s} "
          f"{'seq':>5s} {'pred us':>8s}  bound")
    for g in summary["groups"]:
        programs = f"{g['programs_min']}-{g['programs_max']}" if g["programs_min"] != g["programs_max"] else str(g["programs_min"])
        bound = ", ".join(f"{k} x{v}" for k, v in g["bounds"].items())
        print(f"{g['phase']:9s} {g['role'][:44]:44s} {g['launches']:3d} {programs:>11s} {g['gflop']:8.1f} "
              f"{g['unique_mb']:8.1f} {g['requested_mb']:8.1f} {g['steps'] or '':>5} {g['time_us']:8.1f}  {bound}")
    p, r, n = summary["predicted_us"], summary["ratio_to_sdpa_ideal"], summary["launches"]
    print(f"launches: forward {n['fwd']}, backward {n['bwd']} ({n['triton']} Triton), all in stream order "
          f"(sequential depth = launches)")
    print(f"predicted: forward {p['fwd'] / 1e3:.3f} ms, backward {p['bwd'] / 1e3:.3f} ms, fwd+bwd {p['fwd_bwd'] / 1e3:.3f} ms;"
          f" sequential solves {summary['sequential_solve_us'] / 1e3:.3f} ms "
          f"({summary['sequential_solve_us'] / p['fwd_bwd']:.0%})")
    print(f"causal SDPA of the same shape at the bf16 peak: forward {summary['sdpa_ideal_us']['fwd'] / 1e3:.3f} ms, "
          f"fwd+bwd {summary['sdpa_ideal_us']['fwd_bwd'] / 1e3:.3f} ms -> ratio {r['fwd']:.2f}x / {r['fwd_bwd']:.2f}x")
    print("launches with fewer programs than SMs: " + "; ".join(summary["underfilled"]))
    if per_launch:
        print(f"\n{'#':>4s} {'phase':9s} {'kernel':26s} {'grid':>16s} {'GFLOP':>8s} {'seq':>4s} {'pred us':>8s} bound")
        for i, (x, pred) in enumerate(per_launch):
            print(f"{i:4d} {x.phase:9s} {x.kernel:26s} {str(x.grid):>16s} {sum(x.flops.values()) / 1e9:8.2f} "
                  f"{x.steps:4d} {pred['time'] * 1e6:8.1f} {pred['bound']}")


# ------------------------------------------------------------------------------------------------
# Tensor parallelism: which part of the solve to split
# ------------------------------------------------------------------------------------------------
SCORE_PASSES = 4  # full-width logits a K-split solve must all-reduce: lse, probs (fwd); probs, dP (bwd)


def tensor_parallel_choice(batch: int, T: int, D: int, chunk_size: int, panel_size, peaks: dict,
                           tp_sizes, link_gb_s: float, in_bytes: int = 2) -> list[dict]:
    """Per-rank fwd+bwd time of the two ways to split the solve over `tp` ranks (value columns are
    independent: s = (I - B)^-1 f column by column, so both split V):
      - `replicated`: every rank computes the probabilities from the gathered q_b, k_b (K = D) and
        solves its D/tp value columns; the q_b / k_b gradients are partial sums over V, all-reduced as
        B*T*D tensors (linear in T, counted with the layer's other collectives, not here);
      - `reduced`: each rank computes logits from its D/tp columns of q_b, k_b, and the full logits
        are all-reduced tile by tile, SCORE_PASSES times (no T x T tensor is ever stored, so the
        forward needs them for the log-sum-exp and again for the probabilities, the backward for the
        probabilities and for dP, which sums over the split value columns); ring all-reduce of
        B*T*T/2 fp32 values moves 2 (tp - 1) / tp of it per rank at `link_gb_s`."""
    rows = []
    for tp in tp_sizes:
        predict = lambda K, V: summarise(Model(batch, T, K, V, chunk_size, panel_size, in_bytes=in_bytes,  # noqa: E731
                                               precision="tf32" if in_bytes < 4 else "tf32x3"), peaks)
        replicated = predict(D, D // tp)["predicted_us"]["fwd_bwd"]
        compute = predict(D // tp, D // tp)["predicted_us"]["fwd_bwd"]
        score_bytes = batch * T * T / 2 * 4
        comm = SCORE_PASSES * score_bytes * 2 * (tp - 1) / tp / (link_gb_s * 1e9) * 1e6
        rows.append({"tp": tp, "replicated_us": replicated, "reduced_compute_us": compute, "reduced_comm_us": comm,
                     "reduced_us": compute + comm, "choice": "replicated" if replicated <= compute + comm else "reduced"})
    return rows


def print_tensor_parallel(rows, batch, T, D, link_gb_s) -> None:
    print(f"\nfeedback solve per tensor-parallel rank, fwd+bwd, B={batch} T={T} D={D}; link {link_gb_s:g} GB/s")
    print(f"{'TP':>3s} {'replicated probs us':>20s} {'K-split compute us':>19s} {'+ logits all-reduce us':>23s} "
          f"{'K-split total us':>17s}  faster")
    for r in rows:
        print(f"{r['tp']:3d} {r['replicated_us']:20.0f} {r['reduced_compute_us']:19.0f} {r['reduced_comm_us']:23.0f} "
              f"{r['reduced_us']:17.0f}  {r['choice']}")


# ------------------------------------------------------------------------------------------------
# The CPU path: one layer forward + backward against this machine's fp32 matmul rate
# ------------------------------------------------------------------------------------------------
def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn(). CPU time is what counts on a shared
    machine: it leaves out the time other processes held the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def cpu_matmul_gflops(n: int = 1024, reps: int = 5) -> dict:
    """fp32 [n, n] @ [n, n] GFLOP per wall second and per CPU second (best of `reps`)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = [_timed(lambda: a @ b) for _ in range(reps)]
    return {"wall": 2 * n**3 / min(t[0] for t in times) / 1e9, "cpu": 2 * n**3 / min(t[1] for t in times) / 1e9}


def cpu_layer(T: int = 8192, D: int = 256, heads: int = 4, chunk_size: int = 64, reps: int = 3,
              profile: bool = True) -> dict:
    """One SessaLayer (chunked solve) forward+backward in fp32 on the CPU: time, model FLOPs (the
    ledger's equations), and the fraction of this machine's fp32 matmul rate, measured around it."""
    import torch

    from model import ModelConfig, SessaLayer

    try:
        from model.flops import ledger
    except ImportError:
        from pretrain.scaling.flops import ledger

    config = ModelConfig(vocab_size=256, hidden_size=D, num_layers=1, num_heads=heads, feedback_impl="chunked",
                         feedback_chunk_size=chunk_size)
    book = ledger(config, T)
    model_flops = 3 * T * sum(v for k, v in book.forward.items() if k != "lm_head")
    hardware_flops = T * sum(v for part in (book.hardware_forward, book.hardware_backward)
                             for k, v in part.items() if k != "lm_head")
    torch.manual_seed(0)
    layer = SessaLayer(config)
    x = torch.randn(T, 1, D, requires_grad=True)

    def step():
        y, _ = layer(x)
        y.square().mean().backward()

    rates = [cpu_matmul_gflops()]
    step()
    times = []
    for _ in range(reps):
        times.append(_timed(step))
        rates.append(cpu_matmul_gflops())  # interleaved: the same conditions as the layer's steps
    wall = sorted(t[0] for t in times)[len(times) // 2]
    cpu = sorted(t[1] for t in times)[len(times) // 2]
    rate = {clock: sorted(r[clock] for r in rates)[len(rates) // 2] for clock in ("wall", "cpu")}
    result = {"T": T, "D": D, "heads": heads, "chunk_size": chunk_size, "threads": torch.get_num_threads(),
              "fwd_bwd_s": wall, "fwd_bwd_cpu_s": cpu, "model_gflop": model_flops / 1e9,
              "hardware_gflop": hardware_flops / 1e9, "model_gflops_per_s": model_flops / wall / 1e9,
              "matmul_gflops_per_s": rate["wall"], "matmul_gflops_per_cpu_s": rate["cpu"],
              # per CPU second of this process on both sides (robust to other processes on the machine)
              "fraction_of_matmul": model_flops / cpu / 1e9 / rate["cpu"],
              "fraction_of_matmul_wall": model_flops / wall / 1e9 / rate["wall"],
              "model_flops_by_component": {k: 3 * T * v / 1e9 for k, v in book.forward.items() if k != "lm_head"}}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:14]
        result["profile_self_cpu_share"] = {e.key: round(e.self_cpu_time_total / total, 4) for e in top}
        groups = {"matmul (mm/bmm/addmm)": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"),
                  "attention (SDPA)": ("flash_attention", "scaled_dot_product"),
                  "triangular solves": ("solve_triangular",),
                  "exp/softmax": ("aten::exp", "softmax")}
        shares = {name: 0.0 for name in groups}
        for e in events:
            for name, keys in groups.items():
                if any(k in e.key for k in keys):
                    shares[name] += e.self_cpu_time_total / total
                    break
        shares["everything else (elementwise, copies, reductions, autograd)"] = 1 - sum(shares.values())
        result["profile_groups"] = {k: round(v, 4) for k, v in shares.items()}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=2048, help="K = V = D")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--panel-size", type=int, default=None)
    parser.add_argument("--dtype-bytes", type=int, default=2, help="input element size (2: bf16 -> tf32 dots)")
    parser.add_argument("--bf16-tflops", type=float, default=H100["bf16_tflops"])
    parser.add_argument("--fp32-tflops", type=float, default=H100["fp32_tflops"])
    parser.add_argument("--hbm-tb-s", type=float, default=H100["hbm_tb_s"])
    parser.add_argument("--sms", type=int, default=H100["sms"])
    parser.add_argument("--per-launch", action="store_true", help="also list every launch")
    parser.add_argument("--check-grids", action="store_true", help="compare with the launchers' real grids")
    parser.add_argument("--cpu-layer", action="store_true", help="measure one layer fwd+bwd on this CPU")
    parser.add_argument("--cpu-seq-len", type=int, default=8192)
    parser.add_argument("--cpu-dim", type=int, default=256)
    parser.add_argument("--tensor-parallel", type=int, nargs="*", default=None, metavar="TP",
                        help="per-rank time of the replicated-probability split (shipped) vs a K-split")
    parser.add_argument("--link-gb-s", type=float, default=450.0, help="per-GPU interconnect (NVLink 4: 450)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    peaks = {"bf16_tflops": args.bf16_tflops, "fp32_tflops": args.fp32_tflops, "hbm_tb_s": args.hbm_tb_s,
             "sms": args.sms}
    precision = "tf32" if args.dtype_bytes < 4 else "tf32x3"
    model = Model(args.batch, args.seq_len, args.dim, args.dim, args.chunk_size, args.panel_size,
                  in_bytes=args.dtype_bytes, precision=precision)
    summary = summarise(model, peaks)
    out = {"roofline": summary}
    if args.check_grids:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        real = real_launches(args.batch, args.seq_len, args.dim, args.dim, args.chunk_size, args.panel_size,
                             model.config)
        out["grids_match"] = real == model_launches(model)
    if args.cpu_layer:
        out["cpu_layer"] = cpu_layer(args.cpu_seq_len, args.cpu_dim)
    if args.tensor_parallel is not None:
        out["tensor_parallel"] = tensor_parallel_choice(args.batch, args.seq_len, args.dim, args.chunk_size,
                                                        args.panel_size, peaks, args.tensor_parallel or [1, 2, 4, 8],
                                                        args.link_gb_s, args.dtype_bytes)
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    launches = model.forward() + model.backward()
    print_report(summary, [(x, x.predict(peaks)) for x in launches] if args.per_launch else None)
    if args.check_grids:
        print(f"model grids == launchers' grids: {out['grids_match']}")
    if args.tensor_parallel is not None:
        print_tensor_parallel(out["tensor_parallel"], args.batch, args.seq_len, args.dim, args.link_gb_s)
    if args.cpu_layer:
        c = out["cpu_layer"]
        print(f"\nCPU layer fwd+bwd, T={c['T']} D={c['D']} chunk {c['chunk_size']}, {c['threads']} threads: "
              f"{c['fwd_bwd_s']:.3f} s wall, {c['fwd_bwd_cpu_s']:.3f} s CPU, {c['model_gflop']:.1f} model GFLOP "
              f"-> {c['fraction_of_matmul']:.2f} of the fp32 matmul rate per CPU second "
              f"({c['model_gflop'] / c['fwd_bwd_cpu_s']:.1f} vs {c['matmul_gflops_per_cpu_s']:.1f} GFLOP/s; by wall "
              f"clock {c['fraction_of_matmul_wall']:.2f}); the chunked solve executes {c['hardware_gflop']:.1f} GFLOP")
        print("model GFLOP by component: " + ", ".join(f"{k} {v:.1f}" for k, v in c["model_flops_by_component"].items()))
        if "profile_groups" in c:
            print("self CPU time: " + ", ".join(f"{k} {v:.0%}" for k, v in c["profile_groups"].items()))
            print("top ops: " + ", ".join(f"{k} {v:.0%}" for k, v in c["profile_self_cpu_share"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
