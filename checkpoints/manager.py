"""Sharded, atomic checkpoints on megatron-core `dist_checkpointing` (torch_dist backend).

Layout of a run's checkpoint folder:

    checkpoints/
      latest                 # text: the step of the newest complete checkpoint
      iter_0000100/          # one dist_checkpointing directory per saved step
      .tmp_iter_0000200/     # a save in progress; renamed into place only when complete
      .old_iter_0000100/     # during a re-save of step 100: the previous copy, until the new one is in

A save writes into a temporary directory, every rank waits for every other, then rank 0 renames
it into place and replaces `latest` with `os.replace` (atomic on POSIX). A process killed in the
middle of a save leaves `latest` pointing at the previous complete checkpoint. Re-saving a step that
exists (a resume at that step) renames the old directory aside, renames the new one in, and only
then deletes the old one: killed in between, `remove_partial_saves` (run before every resume)
puts the old copy back, so `latest` never names a missing directory for longer than a crash.

Asynchronous saves (`async_save=True`, megatron-core's `dist_checkpointing` asynchronous save): `save`
writes the common state, starts a forked writer process for the tensors and returns; training goes on
while it writes. `finish_saves` (called by every rank at the same points) asks all ranks whether their
writers are done (one all-reduce) and, once every one is, runs megatron's finalisation (the metadata)
and the same publication as above: rename and `latest`. At most one save is in flight: the next `save`
and any `load` first wait for it. Killed before the publication, `latest` names the previous checkpoint.
"""
import os
import re
import shutil
import time
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from .megatron_fixes import cuda_calls_on_cpu

CHECKPOINT_DIR = re.compile(r"^iter_(\d{7})$")
ASIDE_DIR = re.compile(r"^\.old_iter_(\d{7})$")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int = 3, keep_every: int = 0, async_save: bool = False):
        self.root = Path(root)
        self.keep_last, self.keep_every = keep_last, keep_every
        # a forked writer per save (TemporalAsyncCaller): the fork is a snapshot of the tensors, so
        # training may change them in place while it writes, with no copy on CPU
        self.async_saves = AsyncCallsQueue(persistent=False) if async_save else None
        self._published = []  # (directory, seconds from save to publication) not yet taken by finish_saves

    def step_dir(self, step: int) -> Path:
        return self.root / f"iter_{step:07d}"

    def _aside_dir(self, step: int) -> Path:
        return self.root / f".old_iter_{step:07d}"

    def saved_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := CHECKPOINT_DIR.match(p.name)))

    def latest_step(self) -> int | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        text = pointer.read_text().strip()
        if text.isdigit() and not self.step_dir(int(text)).is_dir() and self._aside_dir(int(text)).is_dir():
            raise RuntimeError(f"{pointer} names step {text}, whose re-save was interrupted; its previous copy is "
                               f"{self._aside_dir(int(text))}. Resuming the run restores it, or rename it to "
                               f"{self.step_dir(int(text)).name}.")
        if not text.isdigit() or not self.step_dir(int(text)).is_dir():
            raise RuntimeError(f"{pointer} names step {text!r} but {self.root} has no such complete checkpoint; "
                               f"complete ones: {self.saved_steps()}. Fix or delete {pointer}.")
        return int(text)

    def remove_partial_saves(self) -> None:
        """Tidy up after a save that was killed (rank 0 only): delete temporary directories, and finish
        an interrupted re-save: the old copy of a step goes back if the new one never arrived, and is
        deleted if it did."""
        if _is_rank0() and self.root.is_dir():
            for path in self.root.glob(".tmp_iter_*"):
                shutil.rmtree(path, ignore_errors=True)
            for path in self.root.iterdir():
                if match := ASIDE_DIR.match(path.name):
                    final = self.step_dir(int(match.group(1)))
                    if final.is_dir():
                        shutil.rmtree(path)
                    else:
                        os.rename(path, final)
                        _fsync_dir(self.root)
        _barrier()

    def save(self, step: int, sharded_state_dict: dict) -> Path:
        """Write `sharded_state_dict` for `step` collectively; returns the final directory. Asynchronous:
        returns once the writers are started; the directory exists after `finish_saves` publishes it."""
        if self.async_saves is None:
            def write(tmp):
                with cuda_calls_on_cpu():
                    dist_checkpointing.save(sharded_state_dict, str(tmp))

            return self.save_with(step, write)
        self._finalize_saves(wait=True)  # at most one save in flight
        started = time.perf_counter()
        tmp = self._make_tmp(step)
        with cuda_calls_on_cpu():
            request = dist_checkpointing.save(sharded_state_dict, str(tmp), async_sharded_save=True)
            request.add_finalize_fn(lambda: self._published.append((self._publish(step),
                                                                    time.perf_counter() - started)))
            self.async_saves.schedule_async_request(request)
        return self.step_dir(step)

    def finish_saves(self, wait: bool = False) -> list[tuple[Path, float]]:
        """Publish the asynchronous saves every rank has finished writing (wait: until all have), on
        every rank at the same point (collective while a save is in flight); returns each published
        directory with the seconds from its `save` call, once."""
        self._finalize_saves(wait)
        published, self._published = self._published, []
        return published

    def _finalize_saves(self, wait: bool) -> None:
        """megatron's finalisation: every rank's writer done (an all-reduce), then each save's finalize
        functions, ours (`_publish`, which records the directory in `_published`) last."""
        if self.async_saves is not None:
            with cuda_calls_on_cpu():
                self.async_saves.maybe_finalize_async_calls(blocking=wait)

    def save_with(self, step: int, write) -> Path:
        """Run `write(tmp_dir)` on every rank (any checkpoint format, e.g. DeepSpeed's), then publish
        the directory as `step` with the same rename and atomic `latest` as `save`."""
        write(self._make_tmp(step))
        return self._publish(step)

    def _make_tmp(self, step: int) -> Path:
        tmp = self.root / f".tmp_iter_{step:07d}"
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        return tmp

    def _publish(self, step: int) -> Path:
        """Rename the written temporary directory of `step` into place and point `latest` at it."""
        tmp = self.root / f".tmp_iter_{step:07d}"
        final = self.step_dir(step)
        _barrier()  # every rank's shards are on disk
        if _is_rank0():
            aside = self._aside_dir(step)
            if final.exists():  # re-saving a step (a resume at that step): the old copy stays until the new is in
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(final, aside)
            os.rename(tmp, final)
            pointer_tmp = self.root / "latest.tmp"
            with open(pointer_tmp, "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer_tmp, self.root / "latest")
            _fsync_dir(self.root)
            shutil.rmtree(aside, ignore_errors=True)
            self._prune(latest=step)
        _barrier()
        return final

    def _prune(self, latest: int) -> None:
        steps = self.saved_steps()
        keep = set(steps[-self.keep_last:]) | {latest}
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def load_common(self, step: int) -> dict:
        """The non-sharded part (iteration, config, scheduler, ...), readable before building anything."""
        return dist_checkpointing.load_common_state_dict(str(self.step_dir(step)))

    def load(self, step: int, sharded_state_dict: dict) -> dict:
        self._finalize_saves(wait=True)  # a rollback may load the save in flight
        return dist_checkpointing.load(sharded_state_dict, str(self.step_dir(step)))
