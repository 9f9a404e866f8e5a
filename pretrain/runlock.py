"""One live job per run directory: `runs/<run_name>/RUN_LOCK` names the job that owns the run.

    lock = acquire_run_lock(run_dir)      # raises RunLockedError naming the live owner
    ...
    lock.release()

The owner is a SLURM job (`slurm:<SLURM_JOB_ID>`) inside an allocation, else this process
(`pid:<host>:<pid>:<start ticks>`). A requeued SLURM job keeps its job id and so re-enters its own
lock; a lock whose owner has ended (the job is finished or unknown to SLURM, or the process is
gone) is stale and is taken over. Launchers (`launch/slurm/pretrain.sbatch`, `launch/local.sh`)
take the lock before starting the ranks and export `SESSA_RUN_LOCK_OWNER`, so a trainer started
by them recognises the lock as its own. No torch import: the SLURM batch script calls this.
"""
import fcntl
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "RUN_LOCK"
OWNER_ENV = "SESSA_RUN_LOCK_OWNER"
# SLURM job states after which the job will never run again (anything else may still run).
ENDED_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "TIMEOUT"}


class RunLockedError(RuntimeError):
    """Another live job or process owns the run directory."""


def _process_start_ticks(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime: tells a reused pid apart


def current_owner(pid: int | None = None) -> str:
    """`slurm:<job id>` inside a SLURM job, else `pid:<host>:<pid>:<start ticks>` of `pid` (default: us)."""
    if pid is None and os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    pid = pid or os.getpid()
    return f"pid:{socket.gethostname()}:{pid}:{_process_start_ticks(pid)}"


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from `scontrol show job`, or None when SLURM no longer knows the job."""
    try:
        done = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise RunLockedError(f"the run lock belongs to SLURM job {job_id}, and scontrol is not available here to "
                             f"check whether it still runs") from None
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:
            return None
        raise RunLockedError(f"cannot ask SLURM about job {job_id}: {done.stderr.strip()}")
    for field in done.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def owner_alive(owner: str) -> bool:
    kind, _, rest = owner.partition(":")
    if kind == "slurm":
        return slurm_job_state(rest) not in ENDED_STATES | {None}
    if kind == "pid":
        host, pid, ticks = rest.rsplit(":", 2)
        if host != socket.gethostname():
            raise RunLockedError(f"the run lock belongs to process {pid} on host {host}; this host cannot tell whether "
                                 f"it still runs")
        return _process_start_ticks(int(pid)) == ticks
    raise RunLockedError(f"unreadable run lock owner {owner!r}")


@dataclass
class RunLock:
    path: Path
    owner: str
    reentered: bool = False  # the owner already held it (a requeued job; a trainer under its launcher)

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        with _guard(self.path):
            if _read(self.path).get("owner") == self.owner:
                self.path.unlink()


class _guard:
    """Serialises check-and-take between launchers (flock on a side file next to the lock)."""

    def __init__(self, lock_path: Path):
        self.path = lock_path.with_name(f".{lock_path.name}.guard")

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {"owner": "unreadable"}


def acquire_run_lock(run_dir: str | Path, owner: str | None = None) -> RunLock:
    """Take `run_dir/RUN_LOCK` for `owner` (default: $SESSA_RUN_LOCK_OWNER, else `current_owner()`).

    Succeeds when there is no lock, the lock is already the owner's (a requeued job, or a trainer
    under its launcher), or its owner has ended; raises RunLockedError naming a live owner.
    """
    owner = owner or os.environ.get(OWNER_ENV) or current_owner()
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with _guard(path):
        held = _read(path)
        if held and held.get("owner") != owner and owner_alive(held["owner"]):
            raise RunLockedError(f"{path.parent} is in use by {held['owner']} (since {held.get('since')}, host "
                                 f"{held.get('host')}); wait for it to end or cancel it. If it is gone, delete {path}")
        record = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "previous_owner": held.get("owner")}
        tmp = path.with_name(f".{LOCK_NAME}.{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)
    return RunLock(path, owner, reentered=held.get("owner") == owner)


def acquire_for_training(run_dir: str | Path) -> RunLock | None:
    """The trainer's hook, on every rank once the process group exists: rank 0 takes the lock (or
    re-enters its launcher's), every rank raises RunLockedError when another job owns the run. A
    lock taken here is released at exit; a launcher's lock stays with the launcher."""
    import atexit

    import torch.distributed as dist

    lock, error = None, ""
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            lock = acquire_run_lock(run_dir)
        except RunLockedError as err:
            error = str(err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunLockedError(error)
    if lock is not None and not lock.reentered:
        atexit.register(lock.release)
    return lock
