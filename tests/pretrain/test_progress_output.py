"""What the console shows while training: tqdm's progress bar on a terminal; elsewhere (a log file, a
pipe, a SLURM job's output) a plain line per logging interval, flushed when it is printed, since a
bar's carriage-return frames pile up there as one unreadable line."""
import fcntl
import io
import json
import os
import select
import struct
import sys
import termios

import pytest
import yaml
from conftest import TEST_RECIPE

from pretrain.config import load_config
from pretrain.metrics import MetricsLogger


@pytest.fixture
def config(tmp_path):
    tree = json.loads(json.dumps(TEST_RECIPE))
    tree["runs_dir"] = str(tmp_path / "runs")
    tree["logging"]["progress_bar"] = True
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    config = load_config(path, [])
    config.run_dir.mkdir(parents=True)
    return config


def test_progress_bar_on_a_terminal(config, monkeypatch):
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    terminal = open(follower, "w")
    monkeypatch.setattr(sys, "stderr", terminal)
    logger = MetricsLogger(config, enabled=True, start_step=0)
    try:
        assert logger.bar is not None
        logger.advance(5, {"loss": "1.000"})
        logger.bar.refresh()
        terminal.flush()
        shown = ""
        while f"5/{config.train.max_steps}" not in shown and select.select([leader], [], [], 5)[0]:
            shown += os.read(leader, 4096).decode()
        assert "\r" in shown and f"5/{config.train.max_steps}" in shown, shown
    finally:
        logger.close()
        terminal.close()
        os.close(leader)


def test_plain_flushed_lines_elsewhere(config, monkeypatch):
    log_file = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log_file)
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    flushes = []
    monkeypatch.setattr(stdout, "flush", lambda: flushes.append(stdout.getvalue()))
    logger = MetricsLogger(config, enabled=True, start_step=0)
    try:
        assert logger.bar is None  # Trainer.train then prints its plain line per logging interval
        logger.advance(5, {"loss": "1.000"})
        logger.print("step 5 loss 1.0000")
        assert stdout.getvalue() == "step 5 loss 1.0000\n" and log_file.getvalue() == ""
        assert flushes and flushes[-1] == "step 5 loss 1.0000\n"  # flushed as it was printed
    finally:
        logger.close()
