"""Run a planned sweep, locally or as SLURM job arrays, with a registry keyed by config hash.

Registry (`<sweep>/registry.json`): config hash -> {name, status, attempts, git_commit, reason}.
Status is one of pending, done, failed (the process died: node failure, OOM, preemption), or
diverged (a non-finite or spiking training loss). Re-running `launch` skips done and diverged
points (a diverged run is flagged for a human, never silently retried or dropped), reruns failed
points until `max_attempts`, and runs the rest. A point's run directory resumes from its `latest`
checkpoint, so a retry continues rather than restarts.

Ladder branches (`fork_of`) start from their main run's checkpoint at `fork_step`: the launcher
copies it into the branch's run directory, and the branch's own config (its WSD decay starts at
the fork) takes over from there. Mains run first; a branch whose main is not done waits.

  local  one point after another on this machine (`python -m pretrain`, the real trainer).
  slurm  an sbatch array for the mains (`--array=0-N%K`, one config per index), and a second
         array of branches with `--dependency=afterany:<mains>`; each task retries itself with
         `scontrol requeue` up to `max_attempts` (attempts counted in the run directory).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .collect import divergence, read_metrics

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


class Registry:
    def __init__(self, sweep: Path):
        self.path = Path(sweep) / "registry.json"
        self.entries = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, point: dict) -> dict:
        return self.entries.setdefault(point["config_hash"], {"name": point["name"], "status": "pending",
                                                              "attempts": 0, "git_commit": "", "reason": ""})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def fork_checkpoint(sweep: Path, point: dict) -> None:
    """Seed a branch's run directory with its main run's checkpoint at the fork step."""
    checkpoints = sweep / "runs" / point["name"] / "checkpoints"
    if (checkpoints / "latest").exists():
        return  # already forked (a retry resumes from the branch's own checkpoints)
    step_dir = f"iter_{point['fork_step']:07d}"
    source = sweep / "runs" / point["fork_of"] / "checkpoints" / step_dir
    if not source.is_dir():
        raise FileNotFoundError(f"{point['name']}: its main run {point['fork_of']} has no checkpoint {source}")
    checkpoints.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, checkpoints / step_dir, dirs_exist_ok=True)
    (checkpoints / "latest").write_text(str(point["fork_step"]))


def classify(sweep: Path, point: dict, returncode: int) -> tuple[str, str]:
    """(status, reason) of a finished attempt."""
    records = read_metrics(sweep / "runs" / point["name"] / "metrics.jsonl")
    reason = divergence(records, point["warmup_steps"])
    if reason:
        return "diverged", reason
    finished = any(r.get("step") == point["steps"] and "train/loss" in r for r in records)
    if returncode == 0 and finished:
        return "done", ""
    return "failed", f"exit code {returncode}" + ("" if finished else f", stopped before step {point['steps']}")


def train_command(sweep: Path, point: dict) -> list[str]:
    return [sys.executable, "-m", "pretrain", "--config",
            str(sweep / "configs" / f"{point['name']}.yaml")]


def _ordered(points: list[dict]) -> list[dict]:
    return [p for p in points if not p["fork_of"]] + [p for p in points if p["fork_of"]]


def launch_local(sweep: str | Path, max_attempts: int = 2, timeout_s: float = 3600, env: dict | None = None) -> dict:
    """Run every point that is not done; returns {name: status} of what ran (empty: nothing to do)."""
    sweep = Path(sweep)
    plan = json.loads((sweep / "plan.json").read_text())
    registry = Registry(sweep)
    commit = git_commit()
    ran = {}
    by_name = {p["name"]: p for p in plan["points"]}
    started = time.time()
    for point in _ordered(plan["points"]):
        entry = registry.get(point)
        if entry["status"] in ("done", "diverged") or entry["attempts"] >= max_attempts:
            continue
        if point["fork_of"]:
            main = registry.get(by_name[point["fork_of"]])
            if main["status"] != "done":
                entry["reason"] = f"waiting for {point['fork_of']} ({main['status']})"
                continue
            fork_checkpoint(sweep, point)
        entry["attempts"] += 1
        entry["git_commit"] = commit
        registry.save()
        run_env = dict(os.environ if env is None else env)
        run_env["PYTHONPATH"] = str(REPO) + os.pathsep + run_env.get("PYTHONPATH", "")
        try:
            done = subprocess.run(train_command(sweep, point), cwd=REPO, env=run_env, timeout=timeout_s,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            returncode, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as err:
            returncode, output = -9, (err.stdout or "") if isinstance(err.stdout, str) else ""
        run_dir = sweep / "runs" / point["name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "launch.log").write_text(output[-20000:])
        entry["status"], entry["reason"] = classify(sweep, point, returncode)
        (run_dir / "scaling.json").write_text(json.dumps({"git_commit": commit, **entry}))
        registry.save()
        ran[point["name"]] = entry["status"]
    total = json.loads((sweep / "launch.json").read_text()).get("elapsed_s", 0.0) if (sweep / "launch.json").exists() else 0.0
    (sweep / "launch.json").write_text(json.dumps({"elapsed_s": total + time.time() - started}))
    return ran


SBATCH_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --array=0-{last}%{throttle}
#SBATCH --output={sweep}/slurm/%x-%A_%a.out
#SBATCH --requeue
#SBATCH --open-mode=append
{extra}
# One sweep point per array index (tasks file line index + 1). A failed attempt requeues its own
# task until {max_attempts} attempts; the registry is brought up to date by `launch` afterwards.
set -u
NAME=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {tasks})
RUN={sweep}/runs/$NAME
mkdir -p "$RUN"
ATTEMPTS=$(( $(cat "$RUN/attempts" 2>/dev/null || echo 0) + 1 ))
echo $ATTEMPTS > "$RUN/attempts"
cd {repo}
{fork}
PYTHONPATH={repo}:${{PYTHONPATH:-}} {python} -m pretrain --config {sweep}/configs/$NAME.yaml
CODE=$?
echo $CODE > "$RUN/exit_code"
if [ $CODE -ne 0 ] && [ $ATTEMPTS -lt {max_attempts} ]; then
    scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit $CODE
"""

FORK_LINE = ("{python} -c \"import json,sys; from pathlib import Path; from pretrain.scaling.launch import fork_checkpoint; "
             "s=Path('{sweep}'); p={{q['name']: q for q in json.loads((s/'plan.json').read_text())['points']}}['$NAME']; "
             "fork_checkpoint(s, p)\" || exit 1")


def slurm_scripts(sweep: str | Path, max_attempts: int = 2, throttle: int = 4, sbatch_lines: list[str] = ()) -> list[Path]:
    """Write the array scripts (mains, then branches) for the points not done; returns their paths."""
    sweep = Path(sweep).resolve()
    plan = json.loads((sweep / "plan.json").read_text())
    registry = Registry(sweep)
    (sweep / "slurm").mkdir(exist_ok=True)
    scripts = []
    for kind, chosen in (("mains", [p for p in plan["points"] if not p["fork_of"]]),
                         ("branches", [p for p in plan["points"] if p["fork_of"]])):
        todo = [p for p in chosen if registry.get(p)["status"] not in ("done", "diverged")
                and registry.get(p)["attempts"] < max_attempts]
        if not todo:
            continue
        tasks = sweep / "slurm" / f"{kind}.txt"
        tasks.write_text("".join(p["name"] + "\n" for p in todo))
        script = sweep / "slurm" / f"{kind}.sbatch"
        script.write_text(SBATCH_TEMPLATE.format(
            job_name=f"scaling-{kind}", last=len(todo) - 1, throttle=throttle, sweep=sweep, tasks=tasks,
            repo=REPO, python=sys.executable, max_attempts=max_attempts, extra="\n".join(sbatch_lines),
            fork=FORK_LINE.format(python=sys.executable, sweep=sweep) if kind == "branches" else "",
        ))
        scripts.append(script)
    registry.save()
    return scripts


def launch_slurm(sweep: str | Path, max_attempts: int = 2, throttle: int = 4, sbatch_lines: list[str] = ()) -> dict:
    """Submit the arrays; the branches' array depends on the mains' (afterany: a branch whose main
    failed finds no checkpoint and fails fast, to be resubmitted by the next `launch`)."""
    sweep = Path(sweep).resolve()
    sync_slurm_registry(sweep, max_attempts)
    jobs, dependency = {}, None
    for script in slurm_scripts(sweep, max_attempts, throttle, sbatch_lines):
        command = ["sbatch", "--parsable"] + ([f"--dependency=afterany:{dependency}"] if dependency else []) + [str(script)]
        job = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
        jobs[script.stem] = job
        if script.stem == "mains":
            dependency = job
    (sweep / "slurm" / "jobs.json").write_text(json.dumps(jobs))
    return jobs


def sync_slurm_registry(sweep: Path, max_attempts: int = 2) -> None:
    """Fold the array tasks' results (exit codes, metrics, attempts) into the registry."""
    plan = json.loads((sweep / "plan.json").read_text())
    registry = Registry(sweep)
    commit = git_commit()
    for point in plan["points"]:
        run_dir = sweep / "runs" / point["name"]
        if not (run_dir / "exit_code").exists():
            continue
        entry = registry.get(point)
        entry["attempts"] = int((run_dir / "attempts").read_text().strip() or 0)
        entry["status"], entry["reason"] = classify(sweep, point, int((run_dir / "exit_code").read_text().strip()))
        entry["git_commit"] = entry["git_commit"] or commit
        (run_dir / "scaling.json").write_text(json.dumps({"git_commit": entry["git_commit"], **entry}))
    registry.save()
