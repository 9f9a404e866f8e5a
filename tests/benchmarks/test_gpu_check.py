"""The prepared GPU check (benchmarks/gpu/): its CPU dry run and the wheel list's size limit."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PART_KEYS = {
    "env": {"info", "bf16_matmul_tflops", "tf32_matmul_tflops", "fp32_matmul_tflops", "copy_tb_s"},
    "a_correctness": {"cases", "tolerance_norm_rel", "all_passed"},
    "b_solve_vs_sdpa": {"rows", "triton_over_sdpa"},
    "c_long_layer": {"T", "D", "fwd_bwd_s", "peak_gb", "fits_80gb"},
    "d_train_step": {"runs"},
}


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _finite(value) -> bool:
    return isinstance(value, float) and value == value and abs(value) != float("inf")


@pytest.mark.slow
def test_dry_run_walks_every_part_and_writes_the_keys(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["schema"] == "sessa-gpu-check/1" and report["dry_run"] is True
    assert set(report["parts"]) == set(PART_KEYS)
    for name, keys in PART_KEYS.items():
        part = report["parts"][name]
        assert part["status"] == "ok", (name, part.get("error"), part.get("log_tail"))
        assert keys <= set(part), (name, keys - set(part))
    assert report["parts"]["a_correctness"]["all_passed"] is True
    assert {row["impl"] for row in report["parts"]["b_solve_vs_sdpa"]["rows"]} == {"triton", "sdpa"}
    assert all("fwd_bwd_ms" in row for row in report["parts"]["b_solve_vs_sdpa"]["rows"])
    runs = report["parts"]["d_train_step"]["runs"]
    assert {(r["recipe"], r["arch"]) for r in runs} == {(m, a) for m in ("125m", "1.3b") for a in ("sessa", "transformer")}
    for run in runs:
        assert run["status"] == "ok" and run["step_s"] > 0 and run["tokens_per_s"] > 0 and run["model_tflops"] > 0, run
        assert _finite(run["loss"]), run
    assert set(report["targets"]) == {"triton_fwd_bwd_over_sdpa_T8192", "layer_T131072_fits_80gb", "mfu_125m",
                                      "mfu_1.3b"}
    assert all(target["met"] is None for target in report["targets"].values())  # nothing judged on a CPU
    markdown = (tmp_path / "gpu.md").read_text()
    assert "## d. Training step" in markdown and "| 1.3b | sessa |" in markdown


def test_wheels_list_resolves_under_the_size_limit():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu/wheels.sh", "--list"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 and not _pypi_reachable():
        pytest.skip("the package index is unreachable: wheels.sh --list resolves against it")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = re.findall(r"MiB  (\S+\.whl)", proc.stdout)
    assert {name.split("-")[0] for name in names} >= {"megatron_core", "webdataset", "torchdata", "braceexpand"}
    assert all("cp312" in name or "py3" in name for name in names), names
    assert not any(name.split("-")[0] in ("torch", "triton", "numpy", "wandb") for name in names)
    total = float(re.search(r"([\d.]+) MiB  total", proc.stdout).group(1))
    assert 0 < total <= 60
