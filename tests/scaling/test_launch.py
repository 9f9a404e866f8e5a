"""launch: registry, forks, failure vs divergence, SLURM array scripts; and the tiny sweep end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.slurm.job import BadInput, seed_from_fork
from pretrain.scaling.launch import Registry, classify, fork_checkpoint, launch_slurm
from pretrain.scaling.plan import Planner, SizeRule, apply_overrides, to_json

REPO = Path(__file__).resolve().parents[2]


def write_sweep(root: Path, base: dict, points) -> None:
    (root / "configs").mkdir(parents=True, exist_ok=True)
    for p in points:
        tree = apply_overrides(base, p["overrides"])
        tree["runs_dir"] = str(root / "runs")
        (root / "configs" / f"{p['name']}.yaml").write_text(yaml.safe_dump(tree))
    (root / "plan.json").write_text(json.dumps({"points": points, "seq_len": 64}))


def ladder_points():
    base = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    planner = Planner(base=base, seq_len=64, archs=("sessa",), size_rule=SizeRule(aspect=16, head_size=16))
    return base, to_json(planner.ladder([32], ratios=(0.1, 0.2)))


def test_failure_divergence_and_forks(tmp_path):
    base, points = ladder_points()
    write_sweep(tmp_path, base, points)
    branch, main = points
    assert branch["fork_of"] == main["name"]
    assert main["overrides"]["checkpoint.keep_every"] == branch["fork_step"]
    run = tmp_path / "runs" / main["name"]
    run.mkdir(parents=True)
    log = lambda records: (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    log([{"step": 5, "train/loss": 8.0}])
    assert classify(tmp_path, main, -9)[0] == "failed"  # killed before the end: retry
    log([{"step": 5, "train/loss": 8.0}, {"step": main["steps"], "train/loss": 7.0}])
    assert classify(tmp_path, main, 0) == ("done", "")
    log([{"step": 5, "train/loss": 8.0}, {"step": 30, "train/loss": math.nan}])
    status, reason = classify(tmp_path, main, 1)
    assert status == "diverged" and "non-finite" in reason  # told apart from a node failure
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fork_checkpoint(tmp_path, branch)
    source = run / "checkpoints" / f"iter_{branch['fork_step']:07d}"
    source.mkdir(parents=True)
    (source / "common.pt").write_text("x")
    fork_checkpoint(tmp_path, branch)
    forked = tmp_path / "runs" / branch["name"] / "checkpoints"
    assert (forked / "latest").read_text() == str(branch["fork_step"]) and (forked / source.name / "common.pt").exists()


def test_slurm_mode_submits_through_launch_slurm_and_skips_finished(tmp_path):
    """Arrays go through `python -m launch.slurm --sweep` (its sbatch script, not a template of
    our own); branches depend on the mains and are seeded from fork.json when their task starts."""
    base, points = ladder_points()
    write_sweep(tmp_path, base, points)
    branch, main = points
    jobs = launch_slurm(tmp_path, max_attempts=3, throttle=2, dry_run=True,
                        launch_args=["--gpus-per-node", "0", "--sbatch-arg=--exclusive"])
    assert list(jobs) == ["mains", "branches"]
    script = str(REPO / "launch" / "slurm" / "pretrain.sbatch")
    for kind, line in jobs.items():
        assert f"SESSA_SWEEP={tmp_path / 'slurm' / (kind + '.txt')}" in line and script in line
        assert "--array=0-0%2" in line and "--exclusive" in line and f"--job-name=scaling-{kind}" in line
    assert "--dependency=afterany:<mains>" in jobs["branches"] and "--dependency" not in jobs["mains"]
    assert (tmp_path / "slurm" / "mains.txt").read_text() == f"{tmp_path / 'configs' / main['name']}.yaml\n"
    fork = json.loads((tmp_path / "runs" / branch["name"] / "fork.json").read_text())
    assert fork == {"source": str(tmp_path / "runs" / main["name"] / "checkpoints" / f"iter_{branch['fork_step']:07d}"),
                    "step": branch["fork_step"]}
    with pytest.raises(BadInput, match="does not exist .has that run reached step"):
        seed_from_fork(tmp_path / "runs" / branch["name"])
    Path(fork["source"]).mkdir(parents=True)
    (Path(fork["source"]) / "common.pt").write_text("x")
    seed_from_fork(tmp_path / "runs" / branch["name"])
    forked = tmp_path / "runs" / branch["name"] / "checkpoints"
    assert (forked / "latest").read_text() == str(branch["fork_step"]) and (forked / Path(fork["source"]).name).is_dir()
    registry = Registry(tmp_path)
    assert all(e["attempts"] == 0 for e in registry.entries.values())  # a dry run records nothing
    registry.get(main)["status"] = "done"
    registry.save()
    assert list(launch_slurm(tmp_path, dry_run=True, launch_args=["--gpus-per-node", "0"])) == ["branches"]


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path, prepared_data):
    """plan (isoFLOP 2 budgets x 3 sizes of Sessa, plus a WSD ladder with a forked cooldown for both
    architectures) -> launch (local, the real trainer) -> collect, compare, fit, plot -> launch again."""
    base = {"model": {"vocab_size": 4096, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                      "feedback_impl": "chunked", "feedback_chunk_size": 16},
            "train": {"micro_batch_size": 4, "seed": 7}, "data": {"path": str(prepared_data), "num_workers": 0},
            "logging": {"interval": 5, "wandb": "disabled", "progress_bar": False}, "eval": {"batches": 2}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = tmp_path / "sweep"
    common = ["--base", str(tmp_path / "base.yaml"), "--seq-len", "64", "--head-size", "16", "--aspect", "16",
              "--micro-batch", "4", "--out", str(sweep)]
    cli = lambda *args: subprocess.run([sys.executable, "-m", "pretrain.scaling", *args], cwd=REPO,
                                       capture_output=True, text=True, timeout=1800)
    for args in (["plan", *common, "--budgets", "1e10", "3e10", "--widths", "16", "32", "48", "--arms", "sessa"],
                 ["plan", *common, "--mode", "ladder", "--widths", "16", "--ratios", "0.1", "0.2", "--append"]):
        done = cli(*args)
        assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((sweep / "plan.json").read_text())["points"]
    assert len(plan) == 6 + 4 and sum(bool(p["fork_of"]) for p in plan) == 2
    done = cli("launch", "--sweep", str(sweep))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    registry = json.loads((sweep / "registry.json").read_text())
    assert all(e["status"] == "done" for e in registry.values()), registry
    for branch in (p for p in plan if p["fork_of"]):  # the branch continued from its main's checkpoint
        assert "resumed from" in (sweep / "runs" / branch["name"] / "launch.log").read_text()
    for args in (["collect", "--sweep", str(sweep)], ["compare", "--sweep", str(sweep), "--bootstrap", "20"],
                 ["plot", "--sweep", str(sweep), "--bootstrap", "10"],
                 ["fit", "--points", str(sweep / "results" / "points_sessa.csv"), "--approach", "3", "--json",
                  "--bootstrap", "10"]):
        done = cli(*args)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("results/results.csv", "results/results.parquet", "results/compare.json", "report/report.md",
                 "report/isoflop.png", "report/overlay.png"):
        assert (sweep / name).stat().st_size > 0
    done = cli("launch", "--sweep", str(sweep))
    assert done.returncode == 0 and "nothing to run" in done.stdout
