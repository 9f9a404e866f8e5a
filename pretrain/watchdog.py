"""Hang detection (`train.hang_timeout_s`): a thread on every rank that ends a run which stopped moving.

A rank whose training loop finishes no step for hang_timeout_s (saves and evaluations excepted) writes
runs/NAME/hangs/rank-R.txt (every thread's Python stack, by faulthandler, then which ranks are behind)
and the collectives' flight recorder (runs/NAME/hangs/flight_recorder_rank_R, torch's pickle format),
prints one line on stderr and exits with HANG_EXIT_CODE: launch/slurm/pretrain.sbatch then requeues the
job and it resumes from `latest`. A rank that is stopped or dead writes nothing: the others name it.

Which ranks are behind: after each finished step, and at least once a heartbeat period, every rank's
watchdog thread publishes "<last finished step> <heartbeat count>" under its own key of the process
group's TCP store (whose server torchrun, or rank 0 under srun, holds for the rendezvous), on its own
connection with a short timeout, never from the training thread. A rank is behind when its step is
lower than the highest, or when its heartbeat has not moved for two periods (the process is stopped,
dead, or stuck holding the GIL).
"""
import datetime
import faulthandler
import multiprocessing
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

HANG_EXIT_CODE = 7
FLIGHT_RECORDER_PREFIX = "flight_recorder_rank_"  # + rank: the name torch's own dump on a timeout uses
STORE_TIMEOUT = datetime.timedelta(seconds=10)  # a store that does not answer (its host is the hung rank)
FLIGHT_RECORDER_ENV = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_DUMP_TEMP_FILE")


def flight_recorder_env(hangs_dir: Path) -> dict[str, str]:
    """Environment that switches on torch's collective flight recorder (NCCL and gloo), read when the
    process group is created: a ring of each rank's last 2000 collectives, dumped on a collective's
    timeout (NCCL) or by the watchdog."""
    return dict(zip(FLIGHT_RECORDER_ENV, ("2000", "1", str(hangs_dir / FLIGHT_RECORDER_PREFIX))))


class HangWatchdog:
    def __init__(self, timeout_s: float, rank: int, world_size: int, hangs_dir: Path):
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.hangs_dir = hangs_dir
        self.step = 0
        self.beat_s = min(max(timeout_s / 10, 1.0), 10.0)  # heartbeat period: fresh enough, light on the store
        self._last_progress = time.monotonic()
        self._pauses = 0
        self._moved = threading.Event()  # a step finished: publish it now
        self._stopped = False
        self._store = None

    def start(self, step: int) -> None:
        """Watch from now on; `step` is the last finished one."""
        self.step = step
        if not self.timeout_s:
            return
        if self.world_size > 1:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=STORE_TIMEOUT, wait_for_workers=False)
            self._store = dist.PrefixStore("hang_watchdog/", store)
        self._last_progress = time.monotonic()
        threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    def progress(self, step: int) -> None:
        """The training loop finished `step`."""
        self.step = step
        self._last_progress = time.monotonic()
        self._moved.set()

    @contextmanager
    def paused(self):
        """Not watched: checkpoint saves and evaluations (their collectives keep parallel.timeout_minutes)."""
        self._pauses += 1
        try:
            yield
        finally:
            self._pauses -= 1
            self._last_progress = time.monotonic()

    def stop(self) -> None:
        self._stopped = True
        self._moved.set()

    # --- the watchdog thread ----------------------------------------------------------------------
    def _watch(self) -> None:
        beats = 0
        while True:
            self._moved.wait(self.beat_s)  # each finished step, at least every beat_s
            self._moved.clear()
            if self._stopped:
                return
            beats += 1
            self._publish(beats)
            if not self._pauses and time.monotonic() - self._last_progress > self.timeout_s:
                self._report_and_exit()

    def _publish(self, beats: int) -> None:
        if self._store is not None:
            try:
                self._store.set(f"rank{self.rank}", f"{self.step} {beats}")
            except Exception:  # noqa: BLE001 - an unreachable store must not stop the watch
                pass

    def _read_all(self) -> dict[int, tuple[int, int] | None]:
        """rank -> (last finished step, heartbeat count), None where nothing can be read."""
        keys = [f"rank{rank}" for rank in range(self.world_size)]
        try:  # one request when every rank has published (get() would wait for a missing key)
            values = (self._store.multi_get(keys) if self._store.check(keys) else
                      [self._store.get(key) if self._store.check([key]) else None for key in keys])
        except Exception:  # noqa: BLE001 - the store's host may be the hung rank: give up after one timeout
            return dict.fromkeys(range(self.world_size))
        return {rank: tuple(int(part) for part in value.decode().split()) if value is not None else None
                for rank, value in enumerate(values)}

    def _ranks_behind(self) -> str:
        if self._store is None:
            return "single process: no other ranks"
        first = self._read_all()
        time.sleep(2 * self.beat_s)
        second = self._read_all()
        others = [rank for rank in range(self.world_size) if rank != self.rank]
        if all(second[rank] is None for rank in others):
            return (f"the other ranks' progress cannot be read from the store at {os.environ['MASTER_ADDR']}:"
                    f"{os.environ['MASTER_PORT']} (its host, rank 0 under srun, may be the one stuck)")
        steps = [self.step] + [p[0] for rank, p in second.items() if p is not None and rank != self.rank]
        behind = []
        for rank in others:
            if second[rank] is None:
                behind.append(f"rank {rank} (no progress recorded)")
            elif first[rank] is not None and first[rank][1] == second[rank][1]:
                behind.append(f"rank {rank} (silent: stopped or dead, last finished step {second[rank][0]})")
            elif second[rank][0] < max(steps):
                behind.append(f"rank {rank} (last finished step {second[rank][0]})")
        if not behind:
            return f"no rank is behind (all finished step {max(steps)}): they wait on each other inside a step"
        return f"ranks behind: {', '.join(behind)}"

    def _report_and_exit(self) -> None:
        self.hangs_dir.mkdir(parents=True, exist_ok=True)
        stacks = self.hangs_dir / f"rank-{self.rank}.txt"
        idle = time.monotonic() - self._last_progress
        header = (f"rank {self.rank}: no training progress for {idle:.0f} s (train.hang_timeout_s "
                  f"{self.timeout_s:g}) after step {self.step}")
        with open(stacks, "w") as out:  # the stacks first: reading the store may take a while
            out.write(f"{header}\n\n")
            out.flush()
            faulthandler.dump_traceback(out, all_threads=True)
        behind = self._ranks_behind()
        recorder_env = " ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in FLIGHT_RECORDER_ENV)
        with open(stacks, "a") as out:
            out.write(f"\n{behind}\nflight recorder: {recorder_env}\n")
        recorder = self._dump_flight_recorder()
        print(f"hang: {header}; {behind}. Python stacks: {stacks}; {recorder}. Exiting with {HANG_EXIT_CODE} "
              f"(a SLURM job requeues and resumes from `latest`)", file=sys.stderr, flush=True)
        # os._exit skips their shutdown: megatron's save Manager would outlive the rank, holding the
        # job step's output open, so that srun never sees the rank end
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(HANG_EXIT_CODE)

    def _dump_flight_recorder(self) -> str:
        """To where torch's own dump on a collective's timeout would go (TORCH_FR_DUMP_TEMP_FILE + rank)."""
        if "TORCH_FR_DUMP_TEMP_FILE" not in os.environ:
            return "no flight recorder dump (TORCH_FR_DUMP_TEMP_FILE is not set)"
        target = os.environ["TORCH_FR_DUMP_TEMP_FILE"]
        try:
            from torch._C._distributed_c10d import _dump_fr_trace  # no public call dumps it on demand

            Path(f"{target}{self.rank}").write_bytes(_dump_fr_trace())
        except Exception as err:  # noqa: BLE001 - the stacks are written; say why this part is missing
            return f"no flight recorder dump ({type(err).__name__}: {err})"
        return f"flight recorder: {target}{self.rank}"
