"""GPU benchmark of the feedback solve: Triton kernels vs the chunked and dense PyTorch paths, with one
causal `scaled_dot_product_attention` of the same shape (one head of size D) as the roof.

Prints, per (T, D, impl): forward and forward+backward time, peak memory, and achieved TFLOP/s counted
with the attention formula (forward 2 * T^2/2 * (K + V) per sequence, backward 2.5x that), so the
feedback rows and the SDPA rows are directly comparable. Usage (on a CUDA machine):

    python benchmarks/feedback_kernels.py                               # T = 2k..128k, D = 1024/2048/4096
    python benchmarks/feedback_kernels.py --seq-lens 8192 --dims 2048 --impls triton sdpa
    python benchmarks/feedback_kernels.py --json > feedback_kernels.json

Targets from issue 3 (H200): triton fwd+bwd <= 2x the SDPA time at T=8192, D=2048; T=131072 trains at
batch 1 within 80 GB. Without a GPU it refuses, unless --interpret, which runs tiny shapes on CPU
under the Triton interpreter as a smoke test (timings meaningless).
"""
import argparse
import json
import os
import sys

IMPLS = ("triton", "chunked", "dense", "sdpa")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", help="T values (default 2048..131072, or 64 128 with --interpret)")
    parser.add_argument("--dims", type=int, nargs="+", help="D = K = V values (default 1024 2048 4096, or 32 with --interpret)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per call")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="input dtype")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="what to measure")
    parser.add_argument("--chunk-size", type=int, default=64, help="diagonal block C")
    parser.add_argument("--panel-size", type=int, default=None, help="Triton panel L (default: the module's)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--dense-max-t", type=int, default=32768, help="skip the O(T^2)-memory dense path above this T")
    parser.add_argument("--chunked-max-t", type=int, default=32768, help="skip the chunked path above this T (slow)")
    parser.add_argument("--interpret", action="store_true", help="CPU smoke run under TRITON_INTERPRET=1")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    return parser.parse_args(argv)


def make_case(impl, batch, T, D, dtype, device, chunk_size, panel_size):
    """Returns (inputs needing grad, fn(*inputs) -> output)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    if impl == "sdpa":
        q, k, v = (torch.randn(batch, 1, T, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
        inputs = [x.requires_grad_() for x in (q, k, v)]
        return inputs, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    from kernels.feedback_solve import feedback_solve
    from kernels.feedback_solve.triton_chunk import feedback_solve_triton

    q_b = torch.randn(batch, T, D, device=device, dtype=dtype, generator=gen)
    k_b = torch.randn(batch, T, D, device=device, dtype=dtype, generator=gen)
    f = torch.randn(batch, T, D, device=device, dtype=dtype, generator=gen)
    gamma = (0.999 * torch.tanh(torch.randn(batch, T, device=device, generator=gen))).to(dtype)
    inputs = [x.requires_grad_() for x in (q_b, k_b, f, gamma)]
    if impl == "triton":
        return inputs, lambda *x: feedback_solve_triton(*x, chunk_size, panel_size)
    return inputs, lambda *x: feedback_solve(*x, impl=impl, chunk_size=chunk_size)


def measure(impl, args, T, D, device, dtype):
    import torch

    from benchmarks.measure import attention_flops, forward_and_backward

    row = dict(impl=impl, T=T, D=D, batch=args.batch, dtype=args.dtype)
    if impl == "dense" and T > args.dense_max_t:
        return dict(row, skipped=f"T > --dense-max-t {args.dense_max_t}")
    if impl == "chunked" and T > args.chunked_max_t:
        return dict(row, skipped=f"T > --chunked-max-t {args.chunked_max_t}")
    try:
        inputs, fn = make_case(impl, args.batch, T, D, dtype, device, args.chunk_size, args.panel_size)
        measured = forward_and_backward(fn, inputs, device, args.reps)
        for name in ("fwd", "fwd_bwd"):
            row[f"{name}_ms"] = 1e3 * measured[f"{name}_s"]
            if measured[f"{name}_peak_bytes"] is not None:
                row[f"{name}_peak_gib"] = measured[f"{name}_peak_bytes"] / 2**30
        row["fwd_tflops"] = attention_flops(T, D, D, False, args.batch) / (row["fwd_ms"] * 1e-3) / 1e12
        row["fwd_bwd_tflops"] = attention_flops(T, D, D, True, args.batch) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    except torch.OutOfMemoryError:
        row["skipped"] = "out of memory"
    except RuntimeError as error:  # e.g. no SDPA backend for this head size
        row["skipped"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    finally:
        inputs = fn = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def print_table(rows):
    print(f"{'impl':8s} {'T':>7s} {'D':>5s} {'fwd ms':>9s} {'f+b ms':>9s} {'fwd TF/s':>9s} {'f+b TF/s':>9s} "
          f"{'fwd GiB':>8s} {'f+b GiB':>8s}")
    for row in rows:
        head = f"{row['impl']:8s} {row['T']:7d} {row['D']:5d}"
        if "skipped" in row:
            print(f"{head}  skipped: {row['skipped']}")
            continue
        print(f"{head} {row['fwd_ms']:9.2f} {row['fwd_bwd_ms']:9.2f} {row['fwd_tflops']:9.1f} "
              f"{row['fwd_bwd_tflops']:9.1f} {row.get('fwd_peak_gib', float('nan')):8.2f} "
              f"{row.get('fwd_bwd_peak_gib', float('nan')):8.2f}")
    by_key = {(r["impl"], r["T"], r["D"]): r for r in rows if "skipped" not in r}
    for (impl, T, D), row in sorted(by_key.items()):
        roof = by_key.get(("sdpa", T, D))
        if impl == "triton" and roof:
            print(f"triton / sdpa fwd+bwd time at T={T}, D={D}: {row['fwd_bwd_ms'] / roof['fwd_bwd_ms']:.2f}x")


def main(argv=None):
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch

    if args.interpret:
        device = torch.device("cpu")
        args.seq_lens = args.seq_lens or [64, 128]
        args.dims = args.dims or [32]
        args.reps = min(args.reps, 2)
        if args.dtype != "fp32":
            print("--interpret: using fp32 (the interpreter's timings are meaningless anyway)", file=sys.stderr)
            args.dtype = "fp32"
    elif not torch.cuda.is_available():
        print("benchmarks/feedback_kernels.py needs a CUDA GPU (none found). Use --interpret for a CPU smoke "
              "run under the Triton interpreter; CPU timings of the PyTorch paths: benchmarks/feedback_solve.py.",
              file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        args.seq_lens = args.seq_lens or [2048, 4096, 8192, 16384, 32768, 65536, 131072]
        args.dims = args.dims or [1024, 2048, 4096]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # keep the PyTorch paths' fp32 matmuls exact

    rows = []
    for D in args.dims:
        for T in args.seq_lens:
            for impl in args.impls:
                row = measure(impl, args, T, D, device, dtype)
                rows.append(row)
                if not args.json:
                    print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
