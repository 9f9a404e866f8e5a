"""The prepared GPU check (issue 17): one command that measures what matters on a bare H100/H200.

    python benchmarks/gpu/check.py --out DIR            # on the GPU machine (run.sh calls this)
    python benchmarks/gpu/check.py --out DIR --dry-run  # on CPU: tiny shapes, Triton interpreter

Parts (benchmarks/gpu/parts/), each with its own time box; on a GPU each runs in its own process (a
part that fails, runs out of memory or out of time is reported with whatever it finished, and the
next one starts on a clean device); a dry run runs them all in one process:
  env  versions, the device, measured bf16 / tf32 / fp32 matmul rates and copy bandwidth;
  a    correctness: Triton and chunked solves against the dense fp64 oracle, fp32 and bf16 inputs,
       the output and all four gradients, T in {64, 1000, 4096}, D in {256, 2048} plus shapes that
       are not multiples of the tiles;
  b    feedback solve forward and forward+backward time and TFLOP/s against one causal SDPA head of
       size D, T in {4096, 8192, 32768}, D = 2048, B = 1, bf16;
  c    one Sessa layer forward+backward at T = 131072, D = 2048 (bf16 autocast): time, peak memory;
  d1-d4  the 125M and 1.3B recipes at T = 8192, Sessa and the Transformer arm: forward + backward +
       optimizer step on synthetic tokens through the trainer's engine (pretrain/engines), step time,
       tokens/s, model TFLOP/s and MFU from the FLOP ledger, peak memory.
Writes DIR/gpu.json (the same keys in a dry run) and DIR/gpu.md; the targets are judged in
benchmarks/gpu/targets.py.
"""
import argparse
import datetime
import importlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
GRACE_S = 20  # a part past its box is first asked to finish (soft deadline), killed this much later


# ------------------------------------------------------------------------------------------------
# Worker side: the parts of a plan, one after the other in this process
# ------------------------------------------------------------------------------------------------
def run_worker(plan_path: Path, dry: bool) -> int:
    """Runs each part of the plan (function, args, soft deadline, result file) in turn; a part's
    exception is recorded in its result and the next part runs."""
    from benchmarks.gpu.part import Part, error_text

    failed = False
    for entry in json.loads(plan_path.read_text()):
        part = Part(entry["key"], dry, entry["deadline"], Path(entry["result"]))
        module, function = entry["function"].split(":")
        start = time.time()
        try:
            getattr(importlib.import_module(module), function)(part, *entry["args"])
            part.result["done"] = True
        except Exception as error:
            part.result["error"] = error_text(error)
            part.result["traceback"] = traceback.format_exc()[-4000:]
            failed = True
        part.result["seconds"] = time.time() - start
        part.save()
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------
# Orchestrator: worker processes, time boxes, gpu.json and gpu.md
# ------------------------------------------------------------------------------------------------
def _run_process(keys: list[str], parts: dict, dry: bool, out: Path, scale: float, grace_s: float) -> dict:
    """The parts `keys` in one worker process, killed `grace_s` after the sum of their boxes; one result
    per part: its status ("ok", "failed" or "timeout"), seconds, box and what it saved."""
    boxes = {key: (parts[key].dry_s if dry else parts[key].gpu_s) * scale for key in keys}
    results = {key: out / f".part-{key}.json" for key in keys}
    start = time.time()
    # Part i's soft deadline: its own box and those before it, from the process's start (which is
    # charged to the first part); one that finishes early leaves its time to the next.
    deadlines = dict(zip(keys, itertools.accumulate(boxes[key] for key in keys)))
    plan = [{"key": key, "function": parts[key].function, "args": list(parts[key].args),
             "deadline": start + deadlines[key], "result": str(results[key])} for key in keys]
    plan_path = out / f".plan-{keys[0]}.json"
    plan_path.write_text(json.dumps(plan))
    for path in results.values():
        path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(plan_path)] + (["--dry-run"] if dry else [])
    timed_out = False
    # A session of its own: a kill at the box reaches the worker's children too (megatron's checkpoint
    # writer Manager), which would otherwise hold the output pipe open.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          start_new_session=True) as proc:
        try:
            output, _ = proc.communicate(timeout=sum(boxes.values()) + grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            timed_out = True
    tail = output[-3000:]
    plan_path.unlink(missing_ok=True)
    elapsed = time.time() - start
    collected = {}
    for key in keys:
        result = json.loads(results[key].read_text()) if results[key].exists() else {}
        results[key].unlink(missing_ok=True)
        status = "ok" if result.pop("done", False) else "timeout" if timed_out else "failed"
        if status != "ok":
            result.setdefault("error", f"{status}: " + (tail.strip().splitlines() or ["no output"])[-1][:300])
            result["log_tail"] = tail
        own_seconds = result.pop("seconds", None)
        # A part alone in its process is charged the process (start and imports included); one that
        # did not finish, the time after the parts before it.
        seconds = (elapsed if len(keys) == 1 or own_seconds is None else own_seconds) - (
            sum(c["seconds"] for c in collected.values()) if own_seconds is None else 0)
        collected[key] = {"status": status, "seconds": round(max(seconds, 0.0), 1), "budget_s": round(boxes[key], 1),
                          **result}
    return collected


def run_parts(out: Path, dry: bool, keys: list[str], parts: dict, scale: float = 1.0, grace_s: float = GRACE_S,
              one_process: bool = False, on_result=None) -> dict:
    """The parts `keys` of `parts` (key -> PartSpec), each in its own worker process, or all in one with
    one_process; on_result(key, result) is called as each process ends."""
    out.mkdir(parents=True, exist_ok=True)
    groups = [keys] if one_process else [[key] for key in keys]
    collected = {}
    for group in groups:
        boxes = sum((parts[key].dry_s if dry else parts[key].gpu_s) * scale for key in group)
        print(f"[gpu-check] part {' '.join(group)}: up to {boxes:.0f} s", flush=True)
        for key, result in _run_process(group, parts, dry, out, scale, grace_s).items():
            collected[key] = result
            print(f"[gpu-check] part {key}: {result['status']} in {result['seconds']} s"
                  f"{': ' + result['error'] if 'error' in result else ''}", flush=True)
            if on_result:
                on_result(key, result)
    return collected


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_all(out: Path, dry: bool, keys: list[str], scale: float) -> dict:
    """The check's parts in turn; gpu.json and gpu.md are rewritten after each one, so a run cut short
    still leaves what it measured. A dry run proves that every part's code runs, not that the parts
    are isolated from each other: all run in one process there."""
    from benchmarks.gpu.parts import PARTS
    from benchmarks.gpu.report import SCHEMA, assemble, render_markdown

    start = time.time()
    header = {"schema": SCHEMA, "dry_run": dry,
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "git_commit": _git_commit()}
    collected = {key: {"status": "skipped", "seconds": 0, "budget_s": 0} for key in PARTS if key not in keys}

    def write(key=None, result=None) -> dict:
        if key is not None:
            collected[key] = result
        report = assemble(header, collected, dry, start)
        (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (out / "gpu.md").write_text(render_markdown(report))
        if key == "env":
            print("[gpu-check] " + json.dumps({k: v for k, v in result.items() if k != "log_tail"}), flush=True)
        return report

    run_parts(out, dry, [key for key in PARTS if key in keys], PARTS, scale, one_process=dry, on_result=write)
    return write()


def main(argv=None) -> int:
    from benchmarks.gpu.parts import PARTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="which parts to run")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time box")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a plan written by _run_process
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    if args.worker:
        return run_worker(args.worker, args.dry_run)
    from benchmarks.gpu.report import render_markdown

    report = run_all(args.out, args.dry_run, args.parts, args.budget_scale)
    print(render_markdown(report))
    print(f"[gpu-check] wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
