"""The paper part of the GPU check (benchmarks/gpu/paper.py, `run.sh --part paper`): its CPU dry run with
every arm, and the time boxes with the real trainer: arms that cannot finish are stopped by SIGTERM,
scored at the step they reached, marked, and the next arm still runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu.paper import ARMS, BATCH, DRY_LIMIT

ROOT = Path(__file__).resolve().parents[2]
# configs/paper/README.md (tests/evaluate/test_table.py keeps them within 2%)
PARAMS = {"sessa": 198_914, "transformer": 199_392, "sessa-nofb": 199_800, "mamba2": 199_320}
LABELS = {"sessa": "Sessa", "transformer": "Transformer++", "sessa-nofb": "Sessa (no feedback)", "mamba2": "Mamba-2"}


def _env(out: Path) -> dict:
    return dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")


def _seq_len(work: Path, task: str) -> int:
    return json.loads((work / "data" / task / "manifest.json").read_text())["seq_len"]


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("iter_")) for p in (run / "checkpoints").glob("iter_*"))


def test_dry_run_trains_and_scores_every_arm(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--part", "paper", "--dry-run", "--max-seeds", "1",
                           "--lanes", "2", "--work", str(work)], cwd=ROOT, env=_env(out), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "paper.json").read_text())
    assert report["schema"] == "sessa-gpu-paper/1" and report["dry_run"] is True and report["steps"] == 3
    assert [(arm["task"], arm["model"]) for arm in report["arms"]] == ARMS
    for arm in report["arms"]:
        task, model = arm["task"], arm["model"]
        assert arm["status"] == "ok" and arm["seed"] == 1 and arm["stopped_by"] is None, arm
        assert arm["steps"] == 3 and _checkpoint_steps(work / "runs" / f"{task}-{model}-s1") == [3]
        # scored at the saved checkpoint: its tokens are the 3 steps of 16 sequences
        assert arm["tokens"] == 3 * BATCH * _seq_len(work, task)
        assert (arm["label"], arm["params"]) == (LABELS[model], PARAMS[model])
        assert list(arm["results"]) == [task] and arm["results"][task]["count"] == DRY_LIMIT
    markdown = (out / "paper.md").read_text()
    # the table of `python -m pretrain.evaluate table`: one line per model, its two tasks' headline metrics
    for model, label in LABELS.items():
        by_task = {arm["task"]: arm for arm in report["arms"] if arm["model"] == model}
        cells = [f"{by_task[task]['results'][task][metric]:.3f} ± 0.000"
                 for task, metric in (("diffuse-mqar", "token_accuracy"), ("two-style", "accuracy"))]
        assert f"| {label} | 1 | {PARAMS[model]:,} | " in markdown and " | ".join(cells) + " |" in markdown
    assert markdown.count("| 3 / 3 |") == len(ARMS)


def test_arms_past_their_time_box_are_scored_at_the_step_reached_and_the_rest_run(tmp_path):
    # A million steps cannot finish in any box: every arm is stopped by SIGTERM at its box, saves,
    # is scored, and the next arm starts; nothing is left for a second seed.
    out, work = tmp_path / "out", tmp_path / "work"
    budget, steps = 12.0, 1_000_000
    proc = subprocess.run([sys.executable, "benchmarks/gpu/paper.py", "--dry-run", "--tasks", "two-style",
                           "--steps", str(steps), "--budget-s", str(budget), "--max-seeds", "2", "--limit", "4",
                           "--out", str(out), "--work", str(work)],
                          cwd=ROOT, env=_env(out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "paper.json").read_text())
    arms = report["arms"]
    assert [arm["model"] for arm in arms] == [model for task, model in ARMS if task == "two-style"]
    for index, arm in enumerate(arms):
        assert arm["status"] == "ok" and arm["stopped_by"] == "time box" and arm["seed"] == 1, arm
        assert 1 <= arm["steps"] < steps
        run = work / "runs" / f"two-style-{arm['model']}-s1"
        assert _checkpoint_steps(run) == [arm["steps"]]  # saved at the stop ...
        assert arm["tokens"] == arm["steps"] * BATCH * _seq_len(work, "two-style")  # ... and scored there
        assert arm["results"]["two-style"]["count"] == 4
        # the box: what was left of the budget, shared by the arms not yet run (the time of the
        # arms before comes off it); the run returns within its box plus one step and a save
        if index:
            before = arms[index - 1]
            assert arm["box_s"] * (len(arms) - index) == pytest.approx(
                before["box_s"] * (len(arms) - index + 1) - before["seconds"], abs=0.6)
        assert arm["seconds"] < arm["box_s"] + 5
    assert arms[0]["box_s"] * len(arms) <= budget
    assert (out / "paper.md").read_text().count("| time box |") == len(arms)
