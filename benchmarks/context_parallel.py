"""Context-parallel feedback solve on CPU (gloo): time, peak memory and bytes moved per rank.

For each T and CP, CP fresh processes (one gloo group; `CP = 1*` is the single-process chunked
solve, no torch.distributed) run the solve of one sequence, B = 1, K = V = D, fp32, forward and
forward+backward, and report per rank: wall time (the slowest rank, minimum over repeats), CPU
time (the busiest rank: its own work, which wall time hides when CP processes share few cores),
the peak RSS over the RSS after the inputs and one untimed solve (Linux VmHWM, reset there), the
bytes saved for backward (what each layer holds from its forward to its backward), and the
bytes each kind of collective moved in one forward+backward (received for all-gather and irecv,
sent for isend and reduce-scatter). With `--layers N` each case runs a stack of N SessaLayers
(megatron's CP group; 4 heads, 2 kv-heads) instead of one solve: the activation memory a model
keeps per rank, which is what context parallelism divides. `--layouts contiguous zigzag` runs
each CP size in both layouts (parallel.context_layout); "x 1*" is the busiest rank's CPU time over
the single process's: the share of one device's work the slowest rank has to do. Usage:
    python benchmarks/context_parallel.py                        # T = 2048, 4096; D = 64
    python benchmarks/context_parallel.py --seq-lens 8192 16384 --dim 256 --json
    python benchmarks/context_parallel.py --seq-lens 16384 --dim 256 --layers 4 --cps 4
    python benchmarks/context_parallel.py --seq-lens 8192 32768 --layouts contiguous zigzag
"""
import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.feedback_solve import feedback_solve_chunked  # noqa: E402
from kernels.feedback_solve.context_parallel import feedback_solve_context_parallel  # noqa: E402


class CollectiveBytes:
    """Counts the bytes this process's collectives move, by wrapping torch.distributed's functions
    while active (the solve calls them through the module, so the wrappers see every call)."""

    KINDS = ("all_gather", "reduce_scatter", "isend", "irecv")

    def __init__(self):
        self.bytes = dict.fromkeys(self.KINDS, 0)
        self._originals = {}

    def __enter__(self):
        def counted(kind, original):
            def call(*args, **kwargs):
                tensor = args[0]
                size = dist.get_world_size(kwargs.get("group"))
                if kind == "all_gather":  # received: the other ranks' pieces
                    self.bytes[kind] += sum(t.nbytes for t in tensor) * (size - 1) // size
                elif kind == "reduce_scatter":  # sent: the pieces summed on the other ranks
                    self.bytes[kind] += tensor.nbytes * (size - 1)
                else:
                    self.bytes[kind] += tensor.nbytes
                return original(*args, **kwargs)
            return call

        for kind in self.KINDS:
            self._originals[kind] = getattr(dist, kind)
            setattr(dist, kind, counted(kind, self._originals[kind]))
        return self

    def __exit__(self, *exc):
        for kind, original in self._originals.items():
            setattr(dist, kind, original)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (the benchmark measures memory on Linux only)")


def worker(rank: int, size: int, port: int, args, out_dir: str) -> None:
    torch.set_num_threads(1)
    distributed = size > 0
    if distributed:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size)
    pieces = max(size, 1)
    length = args.seq_len // pieces
    gen = torch.Generator().manual_seed(rank)
    if args.layers:
        solve, inputs, grad_s = _layer_stack(args, length, size, gen)
    else:
        inputs = [torch.randn(1, length, args.dim, generator=gen).requires_grad_() for _ in range(3)]
        inputs.append((0.9 * torch.rand(1, length, generator=gen)).requires_grad_())
        grad_s = torch.randn(1, length, args.dim, generator=gen)

        def solve(*inputs):
            if distributed:
                return feedback_solve_context_parallel(*inputs, dist.group.WORLD, args.chunk_size, layout=args.layout)
            return feedback_solve_chunked(*inputs, args.chunk_size)

    # One untimed solve first: the libraries' one-time costs (code pages, thread pools) are not the solve's.
    solve(*inputs).backward(grad_s)
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak-RSS mark (VmHWM) here
    base_mb = _status_mb("VmRSS")
    saved = []  # bytes of the tensors the solve keeps for backward (each repeat): what a layer holds until then

    def count_saved(tensor):
        saved.append(tensor.nbytes)
        return tensor

    fwd = fwd_bwd = cpu = float("inf")
    moved = dict.fromkeys(CollectiveBytes.KINDS, 0)
    for repeat in range(args.repeats):
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        with torch.no_grad():
            solve(*inputs)
        fwd = min(fwd, time.perf_counter() - start)
        if distributed:
            dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        with CollectiveBytes() if distributed and repeat == 0 else contextlib.nullcontext() as counter:
            with torch.autograd.graph.saved_tensors_hooks(count_saved, lambda x: x):
                s = solve(*inputs)
            s.backward(grad_s)
        fwd_bwd, cpu = min(fwd_bwd, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
        if counter is not None:
            moved = counter.bytes
    result = dict(rank=rank, fwd_s=fwd, fwd_bwd_s=fwd_bwd, fwd_bwd_cpu_s=cpu,
                  peak_mb=_status_mb("VmHWM") - base_mb, saved_mb=sum(saved) / args.repeats / 2**20,
                  bytes=moved)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if distributed:
        dist.destroy_process_group()


def _layer_stack(args, length: int, size: int, gen):
    """(run, inputs, output gradient) of `args.layers` SessaLayers on this rank's piece [L, 1, D]."""
    from megatron.core import parallel_state

    from model import ModelConfig, SessaLayer, cpu_compat, megatron_config  # noqa: F401 (cpu_compat: a module)
    from model.parallel import set_context_layout

    cpu_compat.enable()
    set_context_layout(args.layout)
    if not dist.is_initialized():  # CP = 1*: one process
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=max(size, 1))
    config = ModelConfig(vocab_size=128, hidden_size=args.dim, num_layers=args.layers, num_heads=4, num_kv_heads=2,
                         feedback_impl="chunked", feedback_chunk_size=args.chunk_size)
    layers = [SessaLayer(config, megatron_config(config), layer_number=n) for n in range(args.layers)]
    x = torch.randn(length, 1, args.dim, generator=gen).requires_grad_()

    def run(x):
        for layer in layers:
            x, _ = layer(x)
        return x

    return run, [x], torch.randn(length, 1, args.dim, generator=gen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(seq_len: int, cp: int, layout: str, args) -> dict:
    """One case in fresh processes; cp = 0 is the single-process chunked solve."""
    case = argparse.Namespace(**vars(args), seq_len=seq_len, layout=layout)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(worker, args=(cp, free_port(), case, out), nprocs=max(cp, 1), start_method="spawn")
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    return dict(T=seq_len, cp="1*" if cp == 0 else cp, layout="-" if cp == 0 else layout, D=args.dim,
                layers=args.layers,
                fwd_s=max(r["fwd_s"] for r in ranks), fwd_bwd_s=max(r["fwd_bwd_s"] for r in ranks),
                cpu_s=max(r["fwd_bwd_cpu_s"] for r in ranks), peak_mb=max(r["peak_mb"] for r in ranks),
                saved_mb=max(r["saved_mb"] for r in ranks),
                mib_moved={kind: max(r["bytes"][kind] for r in ranks) / 2**20 for kind in CollectiveBytes.KINDS})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096], help="sequence lengths T")
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4], help="context-parallel sizes")
    parser.add_argument("--dim", type=int, default=64, help="K = V = D")
    parser.add_argument("--chunk-size", type=int, default=128, help="rows per tile and diagonal block")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (minimum reported)")
    parser.add_argument("--layers", type=int, default=0, help="a stack of this many SessaLayers instead of one solve")
    parser.add_argument("--layouts", nargs="+", default=["contiguous"], choices=["contiguous", "zigzag"],
                        help="context layouts (parallel.context_layout) run at each CP size")
    parser.add_argument("--json", action="store_true", help="print one JSON object per case")
    args = parser.parse_args()
    # Fixed, not glibc's adaptive threshold: freed tensors go back to the OS, so RSS peaks measure them.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))
    what = f"{args.layers} SessaLayers" if args.layers else "chunked solve"
    if not args.json:
        print(f"CP = 1*: single-process {what}; times: slowest rank; CPU s, memory: the largest rank's;")
        print("MiB moved per rank in one fwd+bwd (all-gather / reduce-scatter / isend / irecv)\n")
        print("|     T | CP | layout | fwd s | fwd+bwd s | fwd+bwd CPU s | x 1* | peak RSS MB | saved MB | all-gather "
              "| reduce-scatter | isend | irecv |")
        print("|------:|---:|:-------|------:|----------:|--------------:|-----:|------------:|---------:|-----------:"
              "|---------------:|------:|------:|")
    for T in args.seq_lens:  # each row printed as soon as it is measured
        one = None
        for cp in [0, *args.cps]:
            for layout in args.layouts if cp > 1 else ["contiguous"]:
                r = run(T, cp, layout, args)
                one = one or r["cpu_s"]
                r["cpu_vs_one"] = r["cpu_s"] / one
                if args.json:
                    print(json.dumps(r), flush=True)
                    continue
                m = r["mib_moved"]
                print(f"| {r['T']:5d} | {r['cp']:>2} | {r['layout']} | {r['fwd_s']:5.2f} | {r['fwd_bwd_s']:9.2f} | "
                      f"{r['cpu_s']:13.2f} | {r['cpu_vs_one']:4.2f} | {r['peak_mb']:11.1f} | {r['saved_mb']:8.2f} | "
                      f"{m['all_gather']:10.2f} | {m['reduce_scatter']:14.2f} | {m['isend']:5.2f} | {m['irecv']:5.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
