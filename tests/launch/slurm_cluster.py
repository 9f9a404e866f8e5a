"""A real SLURM cluster on this machine for the launch tests (Debian 12: slurm-wlm 22.05, munge).

Several `NodeName`s on 127.0.0.1 with their own ports emulate nodes: each `slurmd -N nX` runs in its
own mount and UTS namespace, with hostname nX and a private /etc/hosts that maps every node name to
127.0.0.1, so jobs see themselves on distinct nodes and node names resolve inside them. No systemd
or cgroups (`proctrack/linuxproc`, `task/none`); munge, config, state and logs live in one scratch
folder, clients find the cluster through SLURM_CONF. Needs root (munged runs as user munge,
slurmd/slurmctld as root). Short scheduler intervals and `cred_expire=5` let a requeued job
restart after ~6 s instead of ~2 min.

    cluster = SlurmCluster(folder, nodes=4, cpus_per_node=2); cluster.start(); ...; cluster.stop()
    python tests/launch/slurm_cluster.py FOLDER     # start one by hand; Ctrl-C stops it
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "TIMEOUT"}


class ClusterError(RuntimeError):
    pass


def _run(command: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


# Debian installs the daemons in /usr/sbin, which a restricted PATH (a non-login root shell, a CI runner) may lack.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def missing_binaries(path: str | None = None, sbin_dirs: tuple[str, ...] = SBIN_DIRS) -> tuple[list[str], list[str]]:
    """(binaries found neither on PATH nor in the sbin directories, sbin directories that hold some of them
    but are not on PATH). `path` defaults to $PATH."""
    path = os.environ.get("PATH", "") if path is None else path
    on_path = path.split(os.pathsep)
    missing, extra_dirs = [], []
    for binary in BINARIES:
        if shutil.which(binary, path=path):
            continue
        found = next((d for d in sbin_dirs if shutil.which(binary, path=d)), None)
        if found is None:
            missing.append(binary)
        elif found not in on_path and found not in extra_dirs:
            extra_dirs.append(found)
    return missing, extra_dirs


def ensure_installed() -> list[str]:
    """apt-get install the SLURM and munge packages when their binaries are missing. Returns the sbin
    directories that hold some of them but are not on PATH (the cluster adds them to its PATH)."""
    missing, extra_dirs = missing_binaries()
    if not missing:
        return extra_dirs
    if os.geteuid() != 0:
        raise ClusterError(f"SLURM is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", *PACKAGES]):
        done = _run(command, timeout=900, env=env)
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    missing, extra_dirs = missing_binaries()
    if missing:
        raise ClusterError(f"installed {' '.join(PACKAGES)} but {', '.join(missing)} are still missing "
                           f"(looked on PATH={os.environ.get('PATH', '')} and in {', '.join(SBIN_DIRS)})")
    return extra_dirs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, folder: Path, nodes: int = 4, cpus_per_node: int = 2):
        self.folder = Path(folder)
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.conf = self.folder / "slurm.conf"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- bring-up ---------------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> None:
        if os.geteuid() != 0:
            raise ClusterError("the test cluster runs slurmd/slurmctld as root and munged as user munge: run as root")
        extra_dirs = ensure_installed()
        if extra_dirs:  # daemons and clients are spawned through self.env's PATH
            self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *extra_dirs])
        probe = _run(["unshare", "--mount", "--uts", "--propagation", "private", "true"])
        if probe.returncode != 0:
            raise ClusterError(f"mount/UTS namespaces are unavailable (unshare: {probe.stderr.strip()}); the emulated "
                               f"nodes need them for their own hostnames and /etc/hosts")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)  # munged checks every directory above its socket
        try:
            self._start_munge()
            self._write_config()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for name in self.node_names:
                hosts = self.folder / "hosts"
                script = (f"mount --bind {hosts} /etc/hosts && hostname {name} && "
                          f"exec slurmd -D -N {name} -f {self.conf}")
                self._spawn(f"slurmd-{name}", ["unshare", "--mount", "--uts", "--propagation", "private",
                                               "sh", "-c", script])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        keys, run = self.folder / "munge", self.folder / "munge-run"
        for path, mode in ((keys, 0o700), (run, 0o755)):
            path.mkdir(exist_ok=True)
            shutil.chown(path, "munge", "munge")
            path.chmod(mode)
        key = keys / "munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        self.munge_socket = run / "munge.sock"
        self._spawn("munged", ["setpriv", "--reuid=munge", "--regid=munge", "--clear-groups", "munged", "-F",
                               f"--socket={self.munge_socket}", f"--key-file={key}", f"--pid-file={run / 'munged.pid'}",
                               f"--seed-file={keys / 'seed'}", f"--log-file={keys / 'munged.log'}"])
        deadline = time.time() + 30
        while not self.munge_socket.exists():
            self._check_alive()
            if time.time() > deadline:
                raise ClusterError("munged did not create its socket within 30 s")
            time.sleep(0.1)

    def _write_config(self) -> None:
        f = self.folder
        for name in self.node_names:
            (f / "spool" / name).mkdir(parents=True, exist_ok=True)
        (f / "state").mkdir(exist_ok=True)
        (f / "log").mkdir(exist_ok=True)
        host = socket.gethostname()
        (f / "hosts").write_text(f"127.0.0.1 localhost {host}\n127.0.0.1 {' '.join(self.node_names)}\n")
        nodes = "\n".join(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={name} Port={_free_port()} "
                          f"CPUs={self.cpus_per_node} State=UNKNOWN" for name in self.node_names)
        plugins = next((p for p in ("/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib/aarch64-linux-gnu/slurm-wlm")
                        if Path(p).is_dir()), None)
        self.conf.write_text(f"""\
ClusterName=sessatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={f / 'state'}
SlurmdSpoolDir={f / 'spool'}/%n
SlurmctldPidFile={f / 'slurmctld.pid'}
SlurmdPidFile={f / 'spool'}/%n/slurmd.pid
SlurmctldLogFile={f / 'log' / 'slurmctld.log'}
SlurmdLogFile={f / 'log'}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
DependencyParameters=kill_invalid_depend
MinJobAge=900
KillWait=15
InactiveLimit=0
{f'PluginDir={plugins}' if plugins else ''}
{nodes}
PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.folder / f"{name}.out", "w")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                stdin=subprocess.DEVNULL)
        log.close()

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise ClusterError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.folder / f"{name}.out"
        return path.read_text()[-chars:] if path.exists() else "(no log)"

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            self._check_alive()
            done = _run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env)
            states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
            if done.returncode == 0 and all(states.get(n, "").startswith("idle") for n in self.node_names):
                return
            if time.time() > deadline:
                raise ClusterError(f"nodes not idle after {timeout} s: {states or done.stderr}\n"
                                   f"{self.log_tail('slurmctld')}")
            time.sleep(0.5)

    # --- use ------------------------------------------------------------------------------------------
    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        done = _run(list(command), env={**self.env, **kwargs.pop("env", {})}, **kwargs)
        if check and done.returncode != 0:
            raise ClusterError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job` records of a job (one per array task), as field dicts."""
        done = self.run("scontrol", "-o", "show", "job", str(job_id))
        records = []
        for line in done.stdout.splitlines():
            record = {}
            for field in line.split():
                key, _, value = field.partition("=")
                record.setdefault(key, value)
            records.append(record)
        return records

    def wait(self, job_id: str, timeout: float) -> list[dict]:
        """Poll until the job (every array task) has ended for good; returns the final records.

        Polling `scontrol` instead of `sbatch --wait`, which returns tens of seconds late here.
        """
        deadline = time.time() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r["JobState"] in ENDED for r in records):
                return records
            if time.time() > deadline:
                raise ClusterError(f"job {job_id} still {[r['JobState'] for r in records]} after {timeout} s")
            time.sleep(1)

    # --- teardown -------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started (by pid)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            _run(["scancel", "--full", "--user", "root"], env=self.env, timeout=60)
            deadline = time.time() + 60
            while time.time() < deadline:
                done = _run(["squeue", "-h", "-o", "%i"], env=self.env, timeout=60)
                if done.returncode != 0 or not done.stdout.strip():
                    break
                time.sleep(1)
        order = [n for n in self.processes if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


if __name__ == "__main__":
    cluster = SlurmCluster(Path(sys.argv[1]))
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
