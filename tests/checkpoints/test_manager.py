"""CheckpointManager: a re-save of an existing step killed (SIGKILL) at each point of the directory
swap never loses the checkpoint `latest` names. Real megatron dist_checkpointing saves in a child
process; the child kills itself at the chosen filesystem call, the parent inspects what is left."""
import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.pretrain.conftest import REPO, pretrain_env

CHILD = textwrap.dedent(r"""
    import os, shutil, signal, sys
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor
    from model.parallel import ensure_model_parallel
    from checkpoints.manager import CheckpointManager

    root, value, kill_at = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    ensure_model_parallel()
    manager = CheckpointManager(root)

    def die_at(name, original, matches):
        def call(*args, **kwargs):
            if matches(*args):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return call

    final = manager.step_dir(5).name
    if kill_at == "new_in":  # the old copy is aside, the new one not yet renamed in
        os.rename = die_at("rename", os.rename, lambda src, dst: os.path.basename(dst) == final)
    elif kill_at == "old_removed":  # the new one is in and `latest` written, the old copy not yet deleted
        shutil.rmtree = die_at("rmtree", shutil.rmtree,
                               lambda path, *a: os.path.basename(path).startswith(".old_iter") and os.path.isdir(path))
    manager.save(5, {"w": ShardedTensor.from_rank_offsets("w", torch.full((8,), value), replica_id=0)})
""")


def _save(root, value: float, kill_at: str = "never") -> int:
    """The child's exit status. It runs in a session of its own: the writer processes megatron's save
    spawns outlive a SIGKILL of the child, and are killed with its process group afterwards."""
    log = root.parent / "child.log"
    with open(log, "w") as stderr:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(value), kill_at], cwd=REPO,
                                 env=pretrain_env(), stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            child.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
    return child.returncode


def _load(root) -> torch.Tensor:
    from megatron.core.dist_checkpointing import ShardedTensor

    from checkpoints.manager import CheckpointManager
    from model.parallel import ensure_model_parallel

    ensure_model_parallel()
    manager = CheckpointManager(root)
    manager.remove_partial_saves()  # what every resume runs first
    step = manager.latest_step()
    loaded = manager.load(step, {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(8), replica_id=0)})
    return step, loaded["w"]


@pytest.mark.slow
def test_resave_killed_mid_swap_keeps_latest(tmp_path):
    """Killed after the old copy went aside (the new not yet in): the old copy comes back. Killed after
    the new one is in (the old not yet deleted): the new one stays. Either way `latest` loads."""
    from checkpoints.manager import CheckpointManager

    root = tmp_path / "checkpoints"
    assert _save(root, 1.0) == 0
    assert _save(root, 2.0, "new_in") == -signal.SIGKILL
    assert (root / "latest").read_text().strip() == "5"
    with pytest.raises(RuntimeError, match="re-save was interrupted; its previous copy is .*old_iter_0000005"):
        CheckpointManager(root).latest_step()
    step, weights = _load(root)
    assert step == 5 and torch.equal(weights, torch.full((8,), 1.0))
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000005", "latest"]

    assert _save(root, 2.0, "old_removed") == -signal.SIGKILL
    assert (root / "latest").read_text().strip() == "5"
    step, weights = _load(root)
    assert step == 5 and torch.equal(weights, torch.full((8,), 2.0))
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000005", "latest"]  # nothing left aside
