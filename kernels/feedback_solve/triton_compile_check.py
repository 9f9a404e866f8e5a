"""Compile every shipped Triton specialisation of the feedback solve for Hopper, without a GPU.

    python -m kernels.feedback_solve.triton_compile_check          # table
    python -m kernels.feedback_solve.triton_compile_check --json   # for tests/kernels

Uses `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` (ptxas ships in the Triton
wheel) and reads the resources of each cubin with the bundled `cuobjdump -res-usage`: registers per
thread, local memory (spills) and stack, plus the dynamic shared memory from Triton's metadata.

Must run in a process where TRITON_INTERPRET is unset: with it set, `@triton.jit` builds interpreter
functions that cannot be compiled (tests/kernels/test_feedback_triton_sm90.py starts a subprocess).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

SM90_SHARED_LIMIT = 227 * 1024  # max dynamic shared memory per block on H100/H200
SM90_MAX_REGS = 255


# label -> (q_b/k_b/f/gamma dtype, compute dtype)
DTYPES = {"bf16": ("bf16", "fp32"), "fp16": ("fp16", "fp32"), "fp32": ("fp32", "fp32"), "fp64": ("fp64", "fp64")}


def _specs(dtypes=("bf16", "fp32"), solve_blocks=None):
    """(name, kernel, pointer dtypes, constexprs, launch options) for each specialisation the launchers
    use with GPU_CONFIG; `solve_blocks` adds other diagonal block sizes to explore."""
    from . import triton_chunk as tc
    from . import triton_kernels as tk

    config = tc.GPU_CONFIG
    solve_blocks = solve_blocks or (config.max_solve_block,)

    def tiles(t: "tc.Tiles", m="BM", n="BN", k="BK"):
        return {m: t.block_m, n: t.block_n, k: t.block_k}, dict(num_warps=t.num_warps, num_stages=t.num_stages)

    specs = []
    for label in dtypes:
        dt, acc = DTYPES[label]
        if acc == "fp64":
            prec = solve_prec = "ieee"
        else:
            prec = tc.FP32_DOT_PRECISION if dt == "fp32" else tc.HALF_DOT_PRECISION
            solve_prec = tc.SOLVE_DOT_PRECISION
        native = dt in ("bf16", "fp16")  # q, k enter the logits' tl.dot as loaded (QK_NATIVE)
        # Without and with document boundaries (int32 starts; the launchers pass lse/delta as an
        # unread stand-in pointer without them).
        for docs in (False, True):
            tag, starts = ("+docs", "i32") if docs else ("", acc)
            constexprs, launch = tiles(config.lse, "BT", "BS", "BK")
            segment = tc._lse_segment(8192, config.lse, config.lse_segments)  # a constexpr; any T compiles alike
            specs.append((f"lse{tag}[{label}]", tk.feedback_lse_kernel, dict(q=dt, k=dt, starts=starts, part=acc),
                          dict(constexprs, SEG=segment, DOT_PRECISION=prec, QK_NATIVE=native, HAS_DOCS=docs), launch))
            constexprs, launch = tiles(config.probs)
            # Unit strides are specialised to constexpr 1 by the JIT, as here: row panels are contiguous
            # along keys j, column panels (holding B = gamma P, transposed) along queries t.
            for times_gamma in (False, True):
                unit_stride = {"s_pt": 1} if times_gamma else {"s_pj": 1}
                specs.append((f"probs{'*gamma' if times_gamma else ''}{tag}[{label}]", tk.feedback_probs_kernel,
                              dict(q=dt, k=dt, lse=acc, gamma=dt if times_gamma else acc, starts=starts, p=acc),
                              dict(constexprs, DOT_PRECISION=prec, TIMES_GAMMA=times_gamma, QK_NATIVE=native,
                                   HAS_DOCS=docs,
                                   **unit_stride), launch))
            constexprs, launch = tiles(config.dlogits, k="BV")
            specs.append((f"dlogits{tag}[{label}]", tk.feedback_dlogits_kernel,
                          dict(p=acc, lam=acc, s=dt, gamma=dt, delta=acc, starts=starts),
                          dict(constexprs, DOT_PRECISION=prec, HAS_DOCS=docs), launch))
        constexprs, launch = tiles(config.matmul, k="BJ")
        # P @ s (s saved in f's dtype), B^T @ lam; dlogits @ k_b; dlogits^T @ q_b accumulated; with
        # documents the row-panel ones bound their reduction by starts (DOCS=1), the others by ends (2)
        matmuls = (("P@s", dt, False, "s_aj", 1), ("Bt@lam", acc, False, "s_aj", 2), ("dS@k", dt, False, "s_aj", 1),
                   ("dSt@q+=", dt, True, "s_am", 2))
        for what, x, accumulate, unit_stride, docs in matmuls:
            for mode in (0, docs):
                tag, bounds = ("+docs", "i32") if mode else ("", acc)
                specs.append((f"matmul:{what}{tag}[{label}]", tk.panel_matmul_kernel,
                              dict(a=acc, x=x, c=acc, docs=bounds),
                              dict(constexprs, ACCUMULATE=accumulate, DOT_PRECISION=prec, DOCS=mode,
                                   **{unit_stride: 1}), launch))
        for block in solve_blocks:
            for has_context in (False, True):
                constexprs = dict(BC=block, BJ=config.solve_block_j, BV=config.solve_block_v,
                                  LOG2_BC=block.bit_length() - 1, HAS_CONTEXT=has_context, DOT_PRECISION=prec,
                                  SOLVE_PRECISION=solve_prec)
                launch = dict(num_warps=config.solve_num_warps, num_stages=config.solve_num_stages)
                tag = f"C={block},ctx={int(has_context)}"
                specs.append((f"solve_fwd[{label},{tag}]", tk.feedback_solve_fwd_kernel,
                              dict(p=acc, ctx=acc, f=dt, gamma=dt, s=acc), constexprs, launch))
                specs.append((f"solve_bwd[{label},{tag}]", tk.feedback_solve_bwd_kernel,
                              dict(bt=acc, ctx=acc, grad_s=dt, lam=acc), constexprs, launch))
    return specs


def _signature(kernel, pointers, constexprs):
    """Pointers 16-byte aligned and integer sizes/strides divisible by 16, as for D = 1024..4096."""
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in ("T", "K", "V", "N") or name.startswith("s_"):  # not the do_not_specialize ones
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _resources(cubin: bytes) -> dict:
    from triton.backends.nvidia import compiler as nvidia_compiler

    cuobjdump = os.path.join(os.path.dirname(nvidia_compiler.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([cuobjdump, "-res-usage", handle.name], capture_output=True, text=True, check=True)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report.stdout)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{report.stdout}")
    regs, stack, static_shared, local = map(int, match.groups())
    return dict(regs=regs, stack=stack, static_shared=static_shared, local=local)


def compile_all(dtypes=("bf16", "fp32"), solve_blocks=None) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        raise RuntimeError("unset TRITON_INTERPRET: interpreter kernels cannot be compiled")
    target = GPUTarget("cuda", 90, 32)
    results = []
    for name, kernel, pointers, constexprs, options in _specs(dtypes, solve_blocks):
        signature, attrs = _signature(kernel, pointers, constexprs)
        row = dict(name=name, num_warps=options["num_warps"], num_stages=options["num_stages"])
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
        except Exception as error:  # reported per specialisation; the tests fail on it
            row.update(error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            results.append(row)
            continue
        cubin = compiled.asm.get("cubin", b"")
        row.update(cubin_bytes=len(cubin), shared=compiled.metadata.shared)
        if cubin:
            row.update(_resources(cubin))
        results.append(row)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES), help="input dtypes")
    parser.add_argument("--solve-blocks", type=int, nargs="+", help="diagonal block sizes C (default: the shipped one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    results = compile_all(tuple(args.dtypes), args.solve_blocks)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{'kernel':32s} {'warps':>5s} {'stages':>6s} {'shared':>8s} {'regs':>5s} {'local':>6s} {'stack':>6s}")
    for row in results:
        if "error" in row:
            print(f"{row['name']:32s} ERROR {row['error']}")
            continue
        print(f"{row['name']:32s} {row['num_warps']:5d} {row['num_stages']:6d} {row['shared']:8d} {row.get('regs', -1):5d} "
              f"{row.get('local', -1):6d} {row.get('stack', -1):6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
