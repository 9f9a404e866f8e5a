"""launch/quickstart.sh, the README's first command, end to end as a user runs it: set-up, the corpus
prepared into data/builtin, configs/tiny.yaml trained until a SIGTERM (checkpoint, clean exit), the
same command resuming from runs/tiny/checkpoints/latest, and a sample at the end.

It runs in a copy of the working tree (runs/ and data/ there, never the user's) with an interpreter of
its own whose site-packages reads this environment's packages through a path file: setup.sh finds
everything installed, and writes its lm-eval plugin file (which names the repository it ran from) into
that interpreter, not into the environment the other tests use.

The preemption: the script runs the first training under `timeout PREEMPT_AFTER_S`, which passes a
SIGTERM it receives on to the trainer, exactly as it sends its own when the time is up. The test sends
it once the first progress line is out instead of guessing a time: however fast the machine, the
signal lands mid-run, and a small step count keeps the test short."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 300
# A model and batch small enough that a step takes milliseconds. Everything else is configs/tiny.yaml.
OVERRIDES = ["--train.max_steps", str(STEPS), "--model.hidden_size", "16", "--model.num_layers", "1",
             "--model.num_heads", "1", "--model.num_kv_heads", "1", "--train.global_batch_tokens", "256",
             "--train.micro_batch_size", "1", "--data.num_workers", "0", "--schedule.warmup_steps", "2",
             "--checkpoint.interval_steps", "0", "--logging.interval", "10", "--logging.wandb", "disabled",
             "--eval.interval", "0", "--eval.batches", "1", "--eval.sample_tokens", "8"]
PROGRESS = re.compile(r"^step (\d+) loss \d+\.\d+ lr \S+ grad_norm \S+ tok/s \d+$", re.M)


def copy_working_tree(destination: Path) -> None:
    """The files git would commit (tracked and untracked, not ignored): no runs/, data/ or .venv/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():  # a file deleted in the working tree is still listed by --cached
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)


def interpreter_over_this_environment(folder: Path) -> Path:
    """A venv (no pip of its own) that imports this environment's packages via a .pth path line; the
    .pth files of this environment do not run there (a path line adds a directory, not a site dir)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    own_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(own_site, "this_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def preempt_first_training(script: subprocess.Popen) -> None:
    """SIGTERM to the `timeout` the script runs the first training under (it passes it on)."""
    (timeout,) = [p for p in psutil.Process(script.pid).children() if p.name() == "timeout"]
    timeout.send_signal(signal.SIGTERM)


@pytest.mark.slow
def test_quickstart_trains_is_preempted_resumes_and_samples(tmp_path):
    user_files = lambda: sorted((p, p.stat().st_mtime) for d in ("runs", "data") for p in (REPO / d).glob("*"))
    before = user_files()
    repo = tmp_path / "repo"
    copy_working_tree(repo)
    python = interpreter_over_this_environment(tmp_path / "env")
    env = {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "PYTHON": str(python),
           "PREEMPT_AFTER_S": "600", "OMP_NUM_THREADS": "1"}
    script = subprocess.Popen(["bash", "launch/quickstart.sh", *OVERRIDES], cwd=repo, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    watchdog = threading.Timer(600, os.killpg, (script.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        for line in script.stdout:
            lines.append(line)
            if PROGRESS.match(line.rstrip()) and not any("== the same command" in seen for seen in lines):
                if sum(bool(PROGRESS.match(seen.rstrip())) for seen in lines) == 1:
                    preempt_first_training(script)
        code = script.wait()
    finally:
        watchdog.cancel()
    out = "".join(lines)
    assert code == 0, out[-5000:]

    assert f"== setup: using {python}" in out
    manifest = json.loads((repo / "data" / "builtin" / "manifest.json").read_text())
    assert manifest["seq_len"] == 256 and manifest["tokenizer"]["name"] == "pydocs4k"
    assert "a SIGTERM after 600 s plays the cluster's preemption" in out  # PREEMPT_AFTER_S is honoured
    first, second = out.split("== the same command again resumes from runs/tiny/checkpoints/latest\n")
    # The first run: plain progress lines (not a terminal: no progress-bar frames), then the SIGTERM checkpoint.
    assert "\r" not in out
    assert PROGRESS.search(first), first[-3000:]
    saved = re.search(r"^received SIGTERM: saved step (\d+), exiting", first, re.M)
    assert saved, first[-3000:]
    preempted_at = int(saved.group(1))
    assert 10 <= preempted_at < STEPS, "the signal came after the first progress line, before the end"
    # The second run starts from that checkpoint, logs the steps after it, and ends with a sample.
    run_dir = repo / "runs" / "tiny"
    assert re.search(rf"^resumed from \S*runs/tiny/checkpoints/\S*{preempted_at}\b", second, re.M), second[-3000:]
    assert f"start at step {preempted_at}/{STEPS}" in second
    logged = [int(m.group(1)) for m in PROGRESS.finditer(second)]
    assert logged[0] > preempted_at and logged[-1] == STEPS, logged
    assert re.search(rf"^sample after step {STEPS}:\n", second, re.M), second[-2000:]
    assert second.rstrip().endswith("checkpoints/ and wandb/ (offline)")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == str(STEPS)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r["step"] for r in records if "train/loss" in r]
    assert trained == list(range(10, STEPS + 1, 10))  # every interval once: none lost or repeated by the resume
    assert user_files() == before  # the user's runs/ and data/ are untouched
