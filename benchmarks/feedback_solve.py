"""Feedback solve: dense (T x T reference) vs chunked, time and peak memory per sequence length.

Each measurement runs in a fresh subprocess so that peak RSS (CPU) or max_memory_allocated (GPU)
belongs to that one case. Usage:
    python benchmarks/feedback_solve.py                    # table, T = 1k ... 64k, D = 256
    python benchmarks/feedback_solve.py --json --seq-lens 1024 4096
"""
import argparse
import json
import resource
import subprocess
import sys
import time

DENSE_MAX_T_CPU = 16384  # 32k needs > 24 GiB for the dense forward alone


def measure(impl: str, seq_len: int, dim: int, chunk_size: int, device: str) -> dict:
    import torch

    sys.path.insert(0, ".")
    from kernels.feedback_solve import feedback_solve

    torch.manual_seed(0)

    def inputs():
        q_b = torch.randn(1, seq_len, dim, device=device, requires_grad=True)
        k_b = torch.randn(1, seq_len, dim, device=device, requires_grad=True)
        f = torch.randn(1, seq_len, dim, device=device, requires_grad=True)
        gamma = (0.9 * torch.rand(1, seq_len, device=device)).requires_grad_()
        return q_b, k_b, f, gamma

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    args = inputs()
    start = time.perf_counter()
    with torch.no_grad():
        feedback_solve(*args, impl=impl, chunk_size=chunk_size)
    sync()
    fwd_s = time.perf_counter() - start
    start = time.perf_counter()
    s = feedback_solve(*args, impl=impl, chunk_size=chunk_size)
    s.backward(torch.ones_like(s))
    sync()
    fwd_bwd_s = time.perf_counter() - start
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return dict(impl=impl, seq_len=seq_len, dim=dim, fwd_s=round(fwd_s, 3), fwd_bwd_s=round(fwd_bwd_s, 3),
                peak_mb=round(peak_mb, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--impls", nargs="+", default=["dense", "chunked"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args.dim, args.chunk_size, args.device)))
        return

    if not args.json:
        print(f"{'impl':>8} {'T':>7} {'D':>5} {'fwd s':>9} {'fwd+bwd s':>10} {'peak MB':>10}")
    for seq_len in args.seq_lens:
        for impl in args.impls:
            if impl == "dense" and args.device == "cpu" and seq_len > DENSE_MAX_T_CPU:
                row = dict(impl=impl, seq_len=seq_len, dim=args.dim, fwd_s=None, fwd_bwd_s=None, peak_mb=None,
                           note="skipped: T x T does not fit in 24 GiB")
            else:
                cmd = [sys.executable, __file__, "--worker", impl, str(seq_len), "--dim", str(args.dim),
                       "--chunk-size", str(args.chunk_size), "--device", args.device]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    row = dict(impl=impl, seq_len=seq_len, dim=args.dim, fwd_s=None, fwd_bwd_s=None, peak_mb=None,
                               note=f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                cells = [row["fwd_s"], row["fwd_bwd_s"], row["peak_mb"]]
                text = " ".join(f"{'-' if c is None else c:>{w}}" for c, w in zip(cells, (9, 10, 10)))
                print(f"{impl:>8} {seq_len:>7} {args.dim:>5} {text} {row.get('note', '')}", flush=True)


if __name__ == "__main__":
    main()
