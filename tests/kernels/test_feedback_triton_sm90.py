"""Compile-only checks of the feedback-solve Triton kernels for Hopper (sm_90), with no GPU or driver.

Every specialisation the launchers use with the default GPU tiles (GPU_TILES, chunk C = 64) for bf16
and fp32 inputs is compiled by `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`;
each must produce a cubin, fit in the 227 KiB of shared memory a Hopper block may use, and not spill
registers (no local memory, no stack frame) at <= 255 registers per thread.

The compilation runs in a subprocess without TRITON_INTERPRET: a process whose kernels were built by
the interpreter (test_feedback_triton.py sets TRITON_INTERPRET=1) cannot also compile them. So a
plain `python -m pytest tests/kernels` runs both kinds of test. A cold Triton cache takes a minute or
two here (keep TRITON_CACHE_DIR warm in CI); fp16 and fp64 specialisations and other chunk sizes:
    python -m kernels.feedback_solve.triton_compile_check --dtypes bf16 fp16 fp32 fp64 --chunk-sizes 32 64 128
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SM90_SHARED_LIMIT = 227 * 1024
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-m", "kernels.feedback_solve.triton_compile_check", "--json", "--dtypes", "bf16", "fp32"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert run.returncode == 0, f"compile check failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert rows, "no specialisations compiled"
    return rows


def _table(rows):
    return "\n".join(str(row) for row in rows)


def test_every_specialisation_compiles_to_a_cubin(compiled):
    bad = [row for row in compiled if "error" in row or not row.get("cubin_bytes")]
    assert not bad, f"no cubin for:\n{_table(bad)}"
    names = {row["name"].split("[")[0] for row in compiled}
    assert {"lse", "probs", "dlogits", "solve_fwd", "solve_bwd"} <= names
    assert any(name.startswith("matmul") for name in names)


def test_shared_memory_within_hopper_limit(compiled):
    bad = [row for row in compiled if row["shared"] + row.get("static_shared", 0) > SM90_SHARED_LIMIT]
    assert not bad, f"over {SM90_SHARED_LIMIT} bytes of shared memory:\n{_table(bad)}"


def test_no_register_spills(compiled):
    bad = [row for row in compiled if row["regs"] > 255 or row["local"] > 0 or row["stack"] > 0]
    assert not bad, f"register spills (local/stack bytes) in:\n{_table(bad)}"
