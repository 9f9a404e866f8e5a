"""Feedback solve: dense (T x T reference) vs chunked, time and peak memory per sequence length.

Each measurement runs in a fresh subprocess so that peak RSS (CPU) or max_memory_allocated (GPU)
belongs to that one case. Usage:
    python benchmarks/feedback_solve.py                    # table, T = 1k ... 64k, D = 256
    python benchmarks/feedback_solve.py --json --seq-lens 1024 4096
    python benchmarks/feedback_solve.py --impls chunked --seq-lens 16384 --dim 128 --docs 8
With `--docs N` every case is measured twice, unmasked (doc_ids=None) and with N equal documents
per sequence (document masking), and the two are printed side by side.
"""
import argparse
import json
import resource
import subprocess
import sys
import time



def measure(impl: str, seq_len: int, dim: int, chunk_size: int, device: str, docs: int, repeats: int) -> dict:
    """Forward (no grad) and forward+backward wall time (the minimum over `repeats`) and peak memory.
    `docs` = 0: doc_ids=None; N >= 1: doc_ids with N equal documents (the last one takes the rest)."""
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

    doc_ids = None
    if docs:
        doc_len = -(-seq_len // docs)
        doc_ids = (torch.arange(seq_len, device=device) // doc_len).to(torch.int32).unsqueeze(0)
    args = inputs()
    fwd_s = fwd_bwd_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            feedback_solve(*args, impl=impl, chunk_size=chunk_size, doc_ids=doc_ids)
        sync()
        fwd_s = min(fwd_s, time.perf_counter() - start)
        start = time.perf_counter()
        s = feedback_solve(*args, impl=impl, chunk_size=chunk_size, doc_ids=doc_ids)
        s.backward(torch.ones_like(s))
        sync()
        fwd_bwd_s = min(fwd_bwd_s, time.perf_counter() - start)
        del s
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return dict(impl=impl, seq_len=seq_len, dim=dim, docs=docs, fwd_s=round(fwd_s, 3), fwd_bwd_s=round(fwd_bwd_s, 3),
                peak_mb=round(peak_mb, 1))


def run_case(impl: str, seq_len: int, docs: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(seq_len), str(docs), "--dim", str(args.dim),
           "--chunk-size", str(args.chunk_size), "--device", args.device, "--repeats", str(args.repeats),
           "--memory-limit-gb", str(args.memory_limit_gb)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 and "out of memory" in done.stderr:
        return dict(impl=impl, seq_len=seq_len, dim=args.dim, docs=docs, fwd_s=None, fwd_bwd_s=None, peak_mb=None,
                    note=f"out of memory: ran into the {args.memory_limit_gb} GiB limit")
    if done.returncode == -9:
        return dict(impl=impl, seq_len=seq_len, dim=args.dim, docs=docs, fwd_s=None, fwd_bwd_s=None, peak_mb=None,
                    note="killed (exit -9, most likely the kernel's out-of-memory killer)")
    if done.returncode != 0:
        return dict(impl=impl, seq_len=seq_len, dim=args.dim, docs=docs, fwd_s=None, fwd_bwd_s=None, peak_mb=None,
                    note=f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(value, width):
    return f"{'-' if value is None else value:>{width}}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--impls", nargs="+", default=["dense", "chunked"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--docs", type=int, default=0,
                        help="also measure with N equal documents per sequence (doc_ids), side by side with unmasked")
    parser.add_argument("--repeats", type=int, default=1, help="time the minimum of this many runs per case")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    parser.add_argument("--memory-limit-gb", type=float, default=20.0,
                        help="CPU: each case's address-space limit; a case that needs more is reported as out of memory")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "T", "DOCS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.docs < 0:
        parser.error(f"--docs must be >= 1 (documents per sequence), got {args.docs}")

    if args.worker:
        impl, seq_len, docs = args.worker[0], int(args.worker[1]), int(args.worker[2])
        if args.device == "cpu":  # try for real, inside a limit that leaves the machine usable
            limit = int(args.memory_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            print(json.dumps(measure(impl, seq_len, args.dim, args.chunk_size, args.device, docs, args.repeats)))
        except (MemoryError, RuntimeError) as err:
            if isinstance(err, MemoryError) or "alloc" in str(err).lower() or "memory" in str(err).lower():
                sys.exit(f"out of memory: {err}")
            raise
        return

    if not args.json:
        if args.docs:
            print(f"{'impl':>8} {'T':>7} {'D':>5} {'docs':>5} {'fwd+bwd s':>10} {'masked s':>10} {'ratio':>6} "
                  f"{'peak MB':>10} {'masked MB':>10}")
        else:
            print(f"{'impl':>8} {'T':>7} {'D':>5} {'fwd s':>9} {'fwd+bwd s':>10} {'peak MB':>10}")
    for seq_len in args.seq_lens:
        for impl in args.impls:
            row = run_case(impl, seq_len, 0, args)
            masked = run_case(impl, seq_len, args.docs, args) if args.docs else None
            if args.json:
                print(json.dumps(row), flush=True)
                if masked is not None:
                    print(json.dumps(masked), flush=True)
            elif masked is not None:
                ratio = None
                if row["fwd_bwd_s"] and masked["fwd_bwd_s"] is not None:
                    ratio = round(masked["fwd_bwd_s"] / row["fwd_bwd_s"], 2)
                cells = [(row["fwd_bwd_s"], 10), (masked["fwd_bwd_s"], 10), (ratio, 6), (row["peak_mb"], 10),
                         (masked["peak_mb"], 10)]
                note = " ".join(filter(None, (row.get("note"), masked.get("note"))))
                print(f"{impl:>8} {seq_len:>7} {args.dim:>5} {args.docs:>5} {' '.join(_cell(c, w) for c, w in cells)} "
                      f"{note}", flush=True)
            else:
                cells = [(row["fwd_s"], 9), (row["fwd_bwd_s"], 10), (row["peak_mb"], 10)]
                print(f"{impl:>8} {seq_len:>7} {args.dim:>5} {' '.join(_cell(c, w) for c, w in cells)} "
                      f"{row.get('note', '')}", flush=True)


if __name__ == "__main__":
    main()
