"""checkpoint.async_save: megatron-core's asynchronous dist_checkpointing save under the real trainer.

The kill and signal tests use a model whose checkpoint takes a while to write (BIG: 16M parameters,
250 MB with the optimizer state, seconds on a loaded CPU), and signal once the forked writer has
opened its shard files."""
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_pretrain, start_pretrain

from pretrain.config import ConfigError, load_config

ASYNC = ("--checkpoint.async_save", "true")
BIG = ("--model.hidden_size", "512", "--model.num_layers", "6", "--model.num_heads", "8", "--model.num_kv_heads", "8")


def _wait_for(condition, process, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited with {process.returncode} before {what}")
        if time.time() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.005)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _assert_same_checkpoint(ours: Path, theirs: Path) -> None:
    """Every shard file byte for byte. common.pt holds the recipe, which differs (async_save, exit_interval):
    every other entry is equal. torch's .metadata names the directory and a random save id: the rest
    (tensor shapes, file offsets, plans) is equal."""
    ours_files, theirs_files = _files(ours), _files(theirs)
    assert sorted(ours_files) == sorted(theirs_files)
    for name in ours_files:
        if name not in ("common.pt", ".metadata"):
            assert ours_files[name] == theirs_files[name], name
    ours_common, theirs_common = (torch.load(d / "common.pt", weights_only=False) for d in (ours, theirs))
    ours_common.pop("config"), theirs_common.pop("config")
    assert ours_common.keys() == theirs_common.keys()
    for key in ours_common:
        assert repr(ours_common[key]) == repr(theirs_common[key]), key
    ours_meta, theirs_meta = (vars(pickle.loads(files[".metadata"])) for files in (ours_files, theirs_files))
    ours_meta.pop("storage_meta"), theirs_meta.pop("storage_meta")
    assert ours_meta == theirs_meta


@pytest.mark.slow
def test_async_saves_equal_sync_saves_and_resume_alike(recipe, tmp_path):
    """Same checkpoints, byte for byte; and a run that stops at step 6 (train.exit_interval) and resumes
    from its asynchronous checkpoint logs the same losses as the synchronous run that never stopped."""
    runs = tmp_path / "runs"
    run_pretrain(recipe, "--run_name", "sync", "--train.max_steps", "8", "--checkpoint.interval_steps", "3")
    stopping = ("--train.max_steps", "8", "--checkpoint.interval_steps", "3", *ASYNC)
    run_pretrain(recipe, "--run_name", "async", *stopping, "--train.exit_interval", "6")
    for step in (3, 6):
        _assert_same_checkpoint(runs / "async" / "checkpoints" / f"iter_{step:07d}",
                                runs / "sync" / "checkpoints" / f"iter_{step:07d}")
    assert (runs / "async" / "checkpoints" / "latest").read_text().strip() == "6"

    run_pretrain(recipe, "--run_name", "async", *stopping)
    straight, resumed = read_metrics(runs / "sync"), read_metrics(runs / "async")
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in (7, 8)] == [straight[s] for s in (7, 8)]


@pytest.mark.slow
def test_sigkill_during_an_async_save_keeps_latest_and_resumes_exactly(recipe, tmp_path):
    run_dir = tmp_path / "runs" / "killed"
    checkpoints = run_dir / "checkpoints"
    overrides = (*BIG, "--train.max_steps", "6", "--checkpoint.interval_steps", "2")
    process = start_pretrain(recipe, "--run_name", "killed", *overrides, *ASYNC)
    # step 4's tensors are being written by the forked writer (torch's *.distcp shard files exist)
    _wait_for(lambda: any((checkpoints / ".tmp_iter_0000004").glob("*.distcp")), process, "the second save's writer")
    os.killpg(process.pid, signal.SIGKILL)  # the whole group: the trainer and its forked writer
    process.wait()
    assert (checkpoints / "latest").read_text().strip() == "2"
    assert not (checkpoints / "iter_0000004").exists(), "killed too late: the save was already published"

    run_pretrain(recipe, "--run_name", "killed", *overrides, *ASYNC)
    run_pretrain(recipe, "--run_name", "straight", *overrides)
    resumed, reference = read_metrics(run_dir), read_metrics(tmp_path / "runs" / "straight")
    assert [resumed[s] for s in range(3, 7)] == [reference[s] for s in range(3, 7)]
    assert (checkpoints / "latest").read_text().strip() == "6"
    assert not list(checkpoints.glob(".tmp_iter_*"))


@pytest.mark.slow
def test_sigterm_waits_for_the_save_in_flight(recipe, tmp_path):
    """SIGTERM to the whole process group (as SLURM sends it) while step 2's save is written: the writer
    survives it, the save is published, then the step the signal stopped at is saved; exit 0."""
    run_dir = tmp_path / "runs" / "preempted"
    checkpoints = run_dir / "checkpoints"
    process = start_pretrain(recipe, "--run_name", "preempted", *BIG, "--train.max_steps", "200",
                             "--checkpoint.interval_steps", "2", *ASYNC)
    _wait_for(lambda: any((checkpoints / ".tmp_iter_0000002").glob("*.distcp")), process, "the first save's writer")
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=300) == 0
    stopped_at = max(read_metrics(run_dir))
    assert (checkpoints / "latest").read_text().strip() == str(stopped_at)
    for step in sorted({2, stopped_at}):  # both complete: megatron writes metadata.json last
        assert (checkpoints / f"iter_{step:07d}" / "metadata.json").is_file(), step
    assert not list(checkpoints.glob(".tmp_iter_*"))


def test_deepspeed_engine_refuses_async_save(recipe):
    with pytest.raises(ConfigError, match=r"checkpoint\.async_save .*engine: megatron"):
        load_config(recipe, ["--engine", "deepspeed", *ASYNC])
