"""The paper part of the GPU check (benchmarks/gpu/paper.py, `run.sh --part paper`): its CPU dry run with
every arm on two lanes, where one arm is given more steps than any box allows: it is stopped by SIGTERM
at its box, scored at the step it reached and marked, and the other arms still run to their steps. The
boxes and the step counts as functions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu.paper import ARMS, BATCH, DRY_LIMIT, next_box, parse_steps

ROOT = Path(__file__).resolve().parents[2]
# configs/paper/README.md (tests/evaluate/test_table.py keeps them within 2%)
PARAMS = {"sessa": 198_914, "transformer": 199_392, "sessa-nofb": 199_800, "mamba2": 199_320}
LABELS = {"sessa": "Sessa", "transformer": "Transformer++", "sessa-nofb": "Sessa (no feedback)", "mamba2": "Mamba-2"}
# The budget leaves time for the start on a loaded machine; every box is bounded, so the arm that cannot
# finish is stopped after MAX_BOX_S whatever the start took.
BUDGET_S, MAX_BOX_S, LANES, UNREACHABLE = 300.0, 15.0, 2, 1_000_000
OVERRUN = "two-style-sessa"  # the arm given more steps than its box allows


def _seq_len(work: Path, task: str) -> int:
    return json.loads((work / "data" / task / "manifest.json").read_text())["seq_len"]


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("iter_")) for p in (run / "checkpoints").glob("iter_*"))


def test_dry_run_scores_every_arm_and_arms_past_their_box_at_the_step_reached(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--part", "paper", "--dry-run", "--budget-s", str(BUDGET_S),
                           "--max-box-s", str(MAX_BOX_S),
                           "--steps", "3", f"{OVERRUN}={UNREACHABLE}", "--max-seeds", "1", "--lanes", str(LANES),
                           "--work", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "paper.json").read_text())
    assert report["schema"] == "sessa-gpu-paper/1" and report["dry_run"] is True
    assert report["steps"] == {f"{task}-{model}": UNREACHABLE if f"{task}-{model}" == OVERRUN else 3
                               for task, model in ARMS}
    assert [(arm["task"], arm["model"], arm["seed"]) for arm in report["arms"]] == [(t, m, 1) for t, m in ARMS]
    for index, arm in enumerate(report["arms"]):
        task, model = arm["task"], arm["model"]
        assert arm["status"] == "ok", arm
        # the box: the time left when it started, shared by the seed-1 arms not yet started over the lanes
        n = len(ARMS) - index
        assert arm["box_s"] == pytest.approx(min(MAX_BOX_S, (BUDGET_S - arm["started_at_s"]) * min(LANES, n) / n),
                                             abs=0.06)
        if arm["arm"] == OVERRUN:  # stopped by SIGTERM at the box after a step at least, saved there
            assert arm["stopped_by"] == "time box" and 1 <= arm["steps"] < UNREACHABLE, arm
            assert arm["train_s"] < arm["box_s"] + 10  # the step in flight and the save after the SIGTERM
        else:  # the rest still run, to their steps
            assert arm["stopped_by"] is None and arm["steps"] == 3, arm
        assert _checkpoint_steps(work / "runs" / f"{task}-{model}-s1") == [arm["steps"]]
        # scored at that checkpoint: its tokens are the steps reached of 16 sequences
        assert arm["tokens"] == arm["steps"] * BATCH * _seq_len(work, task)
        assert (arm["label"], arm["params"]) == (LABELS[model], PARAMS[model])
        assert list(arm["results"]) == [task] and arm["results"][task]["count"] == DRY_LIMIT
    markdown = (out / "paper.md").read_text()
    # the table of `python -m pretrain.evaluate table`: one line per model, each task's headline metric
    # (mean over the model's seeds on that task)
    for model, label in LABELS.items():
        cells = []
        for task, metric in (("diffuse-mqar", "token_accuracy"), ("two-style", "accuracy")):
            values = [a["results"][task][metric] for a in report["arms"] if (a["task"], a["model"]) == (task, model)]
            cells.append(f"{sum(values) / len(values):.3f} ± ")
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} | "))
        assert f" | {PARAMS[model]:,} | " in line and line.count(" ± ") == 2, line
        assert line.index(cells[0]) < line.index(cells[1], line.index(cells[0]) + 1), (line, cells)
    assert markdown.count("| time box |") == 1 and f"| {OVERRUN} | 1 | ok | {report['arms'][0]['steps']} / " in markdown


def test_boxes_share_the_time_left_and_later_seeds_need_a_complete_first():
    # seed 1: 100 s left for 8 arms on 2 lanes -> 25 s; 3 arms on 8 lanes -> all 100 s; nothing left -> not run
    assert next_box(1, "a", 100.0, 2, 8, {}) == 25.0
    assert next_box(1, "a", 100.0, 8, 3, {}) == 100.0
    assert next_box(1, "a", -1.0, 2, 3, {}) is None
    assert next_box(1, "a", 100.0, 8, 3, {}, max_box_s=30.0) == 30.0
    # later seeds: 1.2x the complete seed-1 time if it fits; a seed 1 stopped by its box is not in seed_one_s
    assert next_box(2, "a", 100.0, 2, 0, {"a": 50.0}) == pytest.approx(60.0)
    assert next_box(2, "a", 59.0, 2, 0, {"a": 50.0}) is None
    assert next_box(2, "b", 1e9, 2, 0, {"a": 50.0}) is None


def test_steps_per_task_and_per_arm():
    def error(message):
        raise ValueError(message)

    steps = parse_steps(["3000", "diffuse-mqar=2000", "diffuse-mqar-sessa=10"], 5, error)
    assert steps["two-style-sessa"] == 3000 and steps["diffuse-mqar-mamba2"] == 2000
    assert steps["diffuse-mqar-sessa"] == 10 and len(steps) == len(ARMS)
    assert set(parse_steps([], 5, error).values()) == {5}
    with pytest.raises(ValueError, match="'mqar' is neither a task"):
        parse_steps(["mqar=3"], 5, error)
    with pytest.raises(ValueError, match="positive integer"):
        parse_steps(["two-style=0"], 5, error)


def test_run_sh_refuses_an_unknown_part():
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--part", "papr"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert proc.returncode == 2 and "--part takes 'paper'" in proc.stderr
