"""Submit pretraining to SLURM: checks the recipe, fills in the resources, calls sbatch.

    python -m launch.slurm [options] --config configs/1.3b.yaml [--section.field value ...]
    python -m launch.slurm --nodes 4 --gpus-per-node 8 --time 24:00:00 --partition gpu --config configs/1.3b.yaml
    python -m launch.slurm --chain 5 --time 4:00:00 --config configs/7b.yaml        # no requeue: 5 jobs, afterany
    python -m launch.slurm --sweep sweep.txt --max-parallel 4 --train.max_steps 2000  # one array task per line
    python -m launch.slurm --prepare --parts 16 --time 4:00:00 --source web/ --tokenizer o200k_base \
        --seq-len 8192 --out data/web      # 16 array tasks (prepare --part I/16), then the merge (afterok)

Resources come from the flags, else from the recipe's `launch:` section (nodes, gpus_per_node, time,
partition, account, term_grace_s), else the defaults; GPUs per node default to what SLURM reports
for the partition's nodes (0 on CPU nodes).

Every recipe is loaded with pretrain.config first (unknown fields, bad values, a world size that does
not divide by TP x PP, or a global batch that does not divide by the data-parallel layout fail here,
not in the queue). The job runs launch/slurm/pretrain.sbatch from the current directory; its log is
`<logs>/<job name>-<job id>.out` (arrays: `-<array id>_<index>.out`). Prints one job id per line.
A sweep file lists one run per line, `<recipe.yaml> [--section.field value ...]` (`#` comments);
overrides given here apply to every line first, each line's own come after (and win); every line
must name its own run directory (`--run_name ...`).

With --prepare the other arguments are `python -m data_pipeline prepare`'s: they are checked (and the
sources cut into pieces, which must be at least --parts) before sbatch; launch/slurm/prepare.sbatch
runs part I of N as array task I on one node with --cpus-per-rank CPUs (default: a whole node of the
partition, one tokeniser each), then `python -m data_pipeline merge OUT` as a job that starts once
every part has succeeded. Prints the array's job id, then the merge's.
"""
import argparse
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .job import BadInput, read_sweep, split_train_args, sweep_entry

SBATCH_SCRIPT = Path(__file__).resolve().with_name("pretrain.sbatch")
PREPARE_SCRIPT = SBATCH_SCRIPT.with_name("prepare.sbatch")
REPO = SBATCH_SCRIPT.parents[2]


def parse_time(limit: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit)
    if not match:
        raise BadInput(f"--time {limit!r} is not a SLURM time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)")
    days, a, b, c = (int(x) if x else None for x in match.groups())
    if days is not None:  # D-H[:M[:S]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:
        return (a * 60 + b) * 60 + c
    return a * 60 + (b or 0)


def load_recipe(train_args: list[str]):
    """The RunConfig the trainer will build from these arguments."""
    from pretrain.config import ConfigError, load_config  # imports torch: only here

    config, overrides = split_train_args(train_args)
    try:
        return load_config(config, overrides)
    except ConfigError as err:
        raise BadInput(f"{config}: {err}") from None


def check_layout(run, config: str, world_size: int) -> None:
    """The recipe's parallel layout and global batch must divide over `world_size` ranks."""
    model_parallel = run.parallel.tensor * run.parallel.pipeline * run.parallel.context  # ranks per model replica
    if world_size % model_parallel:
        raise BadInput(f"{config}: {world_size} ranks do not divide by parallel.tensor x parallel.pipeline x "
                       f"parallel.context = {model_parallel}")
    manifest = Path(run.data.path) / "manifest.json"
    if manifest.is_file():
        seq_len = json.loads(manifest.read_text())["seq_len"]
        per_step = run.train.micro_batch_size * seq_len * (world_size // model_parallel)
        if run.train.global_batch_tokens % per_step:
            raise BadInput(f"{config}: train.global_batch_tokens ({run.train.global_batch_tokens}) is not a multiple "
                           f"of micro_batch_size x seq_len x data-parallel size = {per_step} on {world_size} ranks")


def _gres_gpus(gres: str) -> int:
    """GPUs in one node's GRES string as sinfo prints it: 'gpu:8', 'gpu:h100:4(S:0-1),shard:8', '(null)'."""
    for item in re.sub(r"\(.*?\)", "", gres).split(","):
        parts = item.split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            return int(parts[-1])
    return 0


def sinfo_nodes(partition: str | None) -> list[tuple[str, int]] | None:
    """(GRES, CPUs) of each node of the partition as sinfo reports them, None when sinfo does not answer.
    Asked once per partition and SLURM configuration: a reachable controller answers at once, but
    without one sinfo retries for a minute (cut to 10 s here), and a submission asks for GPUs and CPUs."""
    return _sinfo_nodes(partition, os.environ.get("SLURM_CONF"))


@functools.lru_cache(maxsize=None)
def _sinfo_nodes(partition: str | None, slurm_conf: str | None) -> list[tuple[str, int]] | None:
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%G|%c", *([f"--partition={partition}"] if partition else [])],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    nodes = [line.strip().rsplit("|", 1) for line in done.stdout.splitlines() if "|" in line]
    nodes = [(gres, int(cpus)) for gres, cpus in nodes if cpus.isdigit()]
    return nodes if done.returncode == 0 and nodes else None


def detect_gpus_per_node(partition: str | None) -> tuple[int, str]:
    """(GPUs per node, where that number comes from): SLURM's GRES of the partition's nodes (the
    fewest, so that any node fits), else this machine's GPUs (nvidia-smi), else 0."""
    nodes = sinfo_nodes(partition)
    if nodes:
        return min(_gres_gpus(gres) for gres, _ in nodes), f"sinfo GRES of partition {partition or '(default)'}"
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        return sum(line.startswith("GPU") for line in done.stdout.splitlines()), "nvidia-smi on this machine"
    except (OSError, subprocess.TimeoutExpired):
        return 0, "sinfo answered nothing and there is no nvidia-smi"


def detect_cpus_per_node(partition: str | None) -> int | None:
    """The fewest CPUs of the partition's nodes (sinfo), so that any node fits; None when sinfo does not answer."""
    nodes = sinfo_nodes(partition)
    return min(cpus for _, cpus in nodes) if nodes else None


def check_cpus_fit(ranks_per_node: int, cpus_per_rank: int, partition: str | None, explicit: bool) -> None:
    """Refuse before sbatch a request the nodes cannot hold (SLURM would queue it forever or reject it)."""
    available = detect_cpus_per_node(partition)
    needed = ranks_per_node * cpus_per_rank
    if available is None or needed <= available:
        return
    source = "--cpus-per-rank" if explicit else "data.num_workers + 1"
    raise BadInput(f"{ranks_per_node} rank(s) per node x {cpus_per_rank} CPUs per rank ({source}) = {needed} CPUs, "
                   f"but the nodes of partition {partition or '(default)'} have {available} (sinfo); lower "
                   f"--data.num_workers (a rank uses it + 1 CPUs), --cpus-per-rank or --ranks-per-node")


RESOURCES = ("nodes", "gpus_per_node", "time", "partition", "account", "term_grace_s")


def resolve_resources(opts, runs: list, names: list[str]) -> dict:
    """Each resource from its flag, else the recipes' `launch:` section (sweep lines must agree), else
    the default; gpus_per_node -1 (the default) is detected (detect_gpus_per_node)."""
    from pretrain.config import LaunchConfig

    default = LaunchConfig()
    flags = {"nodes": opts.nodes, "gpus_per_node": opts.gpus_per_node, "time": opts.time,
             "partition": opts.partition, "account": opts.account, "term_grace_s": opts.term_grace}
    chosen = {}
    for name in RESOURCES:
        if flags[name] is not None:
            chosen[name] = flags[name]
            continue
        values = {getattr(run.launch, name) for run in runs}
        if len(values) > 1:
            raise BadInput(f"the sweep's recipes ask for different launch.{name} ({', '.join(map(str, sorted(values)))})"
                           f" but an array has one; give --{name.replace('_', '-')}")
        chosen[name] = values.pop()
        if name == "time" and chosen[name]:
            try:
                parse_time(chosen[name])
            except BadInput:
                raise BadInput(f"{names[0]}: launch.time {chosen[name]!r} is not a SLURM time (M, M:S, H:M:S, "
                               f"D-H, D-H:M, D-H:M:S)") from None
    if chosen["gpus_per_node"] == default.gpus_per_node:
        chosen["gpus_per_node"], source = detect_gpus_per_node(chosen["partition"] or None)
        print(f"launch: {chosen['gpus_per_node']} GPU(s) per node ({source}; set launch.gpus_per_node or "
              f"--gpus-per-node to choose)", file=sys.stderr)
    if chosen["nodes"] < 1 or chosen["gpus_per_node"] < 0 or chosen["term_grace_s"] < 1:
        raise BadInput(f"--nodes ({chosen['nodes']}) and --term-grace ({chosen['term_grace_s']}) must be >= 1, "
                       f"--gpus-per-node ({chosen['gpus_per_node']}) >= 0")
    return chosen


def build_submission(opts, train_args: list[str]) -> tuple[list[str], dict]:
    """(sbatch arguments except the dependency, environment for pretrain.sbatch); checks the recipes."""
    if opts.sweep:
        lines = [sweep_entry(opts.sweep, index, train_args) for index in range(len(read_sweep(opts.sweep)))]
    else:
        lines = [train_args]
    names = [split_train_args(line)[0] for line in lines]
    runs = [load_recipe(line) for line in lines]
    res = resolve_resources(opts, runs, names)
    ranks_per_node = opts.ranks_per_node or res["gpus_per_node"] or 1
    world_size = res["nodes"] * ranks_per_node
    for run, name in zip(runs, names):
        check_layout(run, name, world_size)
    if opts.sweep:
        dirs = [str(run.run_dir) for run in runs]
        if len(set(dirs)) != len(dirs):
            raise BadInput(f"sweep {opts.sweep}: runs share a run directory ({', '.join(dirs)}); give each line "
                           f"its own --run_name")
        job_name = opts.job_name or f"sweep-{Path(opts.sweep).stem}"
    else:
        job_name = opts.job_name or runs[0].run_name
    if res["time"] and parse_time(res["time"]) <= opts.signal_lead:
        raise BadInput(f"--time {res['time']} is not longer than --signal-lead {opts.signal_lead} s; lengthen --time "
                       f"or shorten --signal-lead")
    cpus_per_rank = opts.cpus_per_rank or max(run.data.num_workers for run in runs) + 1
    check_cpus_fit(ranks_per_node, cpus_per_rank, res["partition"] or None, explicit=bool(opts.cpus_per_rank))
    logs = Path(opts.logs)
    args = ["--parsable", f"--job-name={job_name}", f"--nodes={res['nodes']}",
            f"--signal=B:USR1@{opts.signal_lead}", "--open-mode=append",
            f"--output={logs / ('%x-%A_%a.out' if opts.sweep else '%x-%j.out')}",
            "--no-requeue" if opts.chain > 1 or opts.no_requeue else "--requeue"]
    if opts.launcher == "torchrun":
        args += ["--ntasks-per-node=1", f"--cpus-per-task={ranks_per_node * cpus_per_rank}"]
    else:
        args += [f"--ntasks-per-node={ranks_per_node}", f"--cpus-per-task={cpus_per_rank}"]
    if res["gpus_per_node"]:
        args.append(f"--gpus-per-node={res['gpus_per_node']}")
    for flag in ("time", "partition", "account"):
        if res[flag]:
            args.append(f"--{flag}={res[flag]}")
    if opts.qos:
        args.append(f"--qos={opts.qos}")
    if opts.sweep:
        args.append(f"--array=0-{len(runs) - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else ""))
    args += opts.sbatch_arg
    env = {"SESSA_LAUNCH": opts.launcher, "SESSA_RANKS_PER_NODE": str(ranks_per_node), "SESSA_REPO": str(REPO),
           "SESSA_REQUEUE": "0" if opts.chain > 1 or opts.no_requeue else "1",
           "SESSA_MAX_RESTARTS": str(opts.max_restarts), "SESSA_TERM_GRACE_S": str(res["term_grace_s"])}
    if opts.sweep:
        env["SESSA_SWEEP"] = str(Path(opts.sweep).resolve())
    return args, env


def sbatch(command: list[str], env: dict, dry_run: bool, number: int) -> str:
    """Run one sbatch command (dry_run: print it) and print its job id; returns it ('<job N>' dry)."""
    if dry_run:
        print(" ".join(f"{k}={v}" for k, v in env.items()), " ".join(command))
        return f"<job {number}>"
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        raise BadInput(f"sbatch failed: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    print(job_id, flush=True)
    return job_id


def submit(opts, train_args: list[str]) -> list[str]:
    args, env = build_submission(opts, train_args)
    if not opts.dry_run:
        Path(opts.logs).mkdir(parents=True, exist_ok=True)  # SLURM does not create it: the job would fail
    job_ids, dependency = [], opts.dependency
    for _ in range(opts.chain):
        command = ["sbatch", *args, *([f"--dependency={dependency}"] if dependency else []), str(SBATCH_SCRIPT),
                   *train_args]
        job_ids.append(sbatch(command, env, opts.dry_run, len(job_ids) + 1))
        dependency = f"afterany:{job_ids[-1]}"
    return job_ids


def build_prepare_submission(opts, prepare_args: list[str]) -> tuple[list[str], list[str], str]:
    """(sbatch arguments of the parts' array, of the merge job, each without its dependency and
    script; prepare's --out); checks prepare's arguments and that the sources make >= --parts pieces."""
    from data_pipeline.__main__ import build_parser
    from data_pipeline.parts import plan_pieces, select_part

    if opts.sweep or opts.chain > 1 or opts.nodes not in (None, 1):
        raise BadInput("--prepare runs each part on one node: --sweep, --chain and --nodes do not apply")
    if opts.parts is None or opts.parts < 1:
        raise BadInput("--prepare needs --parts N (N >= 1): array task I prepares part I of N")
    try:
        args = build_parser().parse_args(["prepare", *prepare_args])
    except SystemExit:  # argparse printed what is wrong
        raise BadInput(f"prepare does not take these arguments: {' '.join(prepare_args)} (python -m data_pipeline "
                       f"prepare --help)") from None
    if args.part is not None:
        raise BadInput("give --parts N, not --part: array task I prepares --part I/N")
    if args.format != "text":
        raise BadInput("--prepare cuts text sources into parts; prepare task files (--format task) in one job")
    piece_bytes = int(args.piece_mb * 1e6)
    try:
        select_part(plan_pieces(args.source, piece_bytes), 0, opts.parts, piece_bytes)
    except (ValueError, FileNotFoundError) as err:
        raise BadInput(str(err)) from None
    out = Path(args.out)
    if not args.overwrite and out.is_dir() and any(out.iterdir()):
        raise BadInput(f"--out {out} is not empty; pass --overwrite to prepare it again")
    cpus = opts.cpus_per_rank or detect_cpus_per_node(opts.partition) or 1
    name, logs = opts.job_name or f"prepare-{out.name}", Path(opts.logs)
    common = [f"--{flag}={getattr(opts, flag)}" for flag in ("time", "partition", "account", "qos")
              if getattr(opts, flag)]
    common += opts.sbatch_arg
    array = ["--parsable", f"--job-name={name}", "--nodes=1", "--ntasks=1", f"--cpus-per-task={cpus}",
             f"--array=0-{opts.parts - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else ""),
             f"--output={logs / '%x-%A_%a.out'}", *common]
    merge = ["--parsable", f"--job-name={name}-merge", "--nodes=1", "--ntasks=1", "--cpus-per-task=1",
             f"--output={logs / '%x-%j.out'}", *common]
    return array, merge, args.out


def submit_prepare(opts, prepare_args: list[str]) -> list[str]:
    """Submit the parts' array and the merge after it; returns [array job id, merge job id]."""
    array, merge, out = build_prepare_submission(opts, prepare_args)
    if not opts.dry_run:
        Path(opts.logs).mkdir(parents=True, exist_ok=True)
    env = {"SESSA_REPO": str(REPO)}
    parts = sbatch(["sbatch", *array, *([f"--dependency={opts.dependency}"] if opts.dependency else []),
                    str(PREPARE_SCRIPT), "prepare", str(opts.parts), *prepare_args], env, opts.dry_run, 1)
    merged = sbatch(["sbatch", *merge, f"--dependency=afterok:{parts}", str(PREPARE_SCRIPT), "merge", out],
                    env, opts.dry_run, 2)
    return [parts, merged]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, help="nodes (default: the recipe's launch.nodes, else 1)")
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs to request per node, 0: none (default: the recipe's launch.gpus_per_node, else "
                             "what sinfo reports for the partition's nodes, 0 on CPU nodes)")
    parser.add_argument("--ranks-per-node", type=int, help="training processes per node (default: GPUs, else 1)")
    parser.add_argument("--cpus-per-rank", type=int, help="CPUs per rank (default: data.num_workers + 1); with "
                                                          "--prepare, per part (default: a whole node)")
    parser.add_argument("--launcher", choices=("torchrun", "srun"), default="torchrun",
                        help="torchrun: one srun task per node running torchrun; srun: one srun task per rank")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the recipe's launch.time, else the "
                                       "partition's)")
    parser.add_argument("--partition", help="default: the recipe's launch.partition, else the cluster's default")
    parser.add_argument("--account", help="default: the recipe's launch.account, else yours")
    parser.add_argument("--qos")
    parser.add_argument("--job-name", help="default: the run name (sweeps: sweep-<file name>)")
    parser.add_argument("--signal-lead", type=int, default=300,
                        help="seconds before the time limit at which the ranks get SIGUSR1 and save (default 300)")
    parser.add_argument("--term-grace", type=int,
                        help="seconds the ranks get to save after SIGTERM (cancel, preemption) before they are "
                             "killed (default: the recipe's launch.term_grace_s, 20; keep it below KillWait)")
    parser.add_argument("--max-restarts", type=int, default=20, help="requeue at most this often (default 20)")
    parser.add_argument("--no-requeue", action="store_true", help="never requeue (the run stops at the time limit)")
    parser.add_argument("--chain", type=int, default=1,
                        help="submit N jobs, each --dependency=afterany on the previous, without requeue")
    parser.add_argument("--dependency", help="dependency of the (first) job, passed to sbatch")
    parser.add_argument("--sweep", help="sweep file: a job array with one run per line")
    parser.add_argument("--max-parallel", type=int, help="at most this many array tasks at once")
    parser.add_argument("--prepare", action="store_true",
                        help="prepare a corpus instead: the other arguments are `python -m data_pipeline prepare`'s; "
                             "--parts array tasks, then the merge")
    parser.add_argument("--parts", type=int, help="with --prepare: the number of parts (array tasks)")
    parser.add_argument("--logs", default="logs/slurm", help="folder for the job logs (default logs/slurm)")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="extra sbatch argument, e.g. --sbatch-arg=--exclusive (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch commands instead of submitting")
    opts, train_args = parser.parse_known_args(argv)
    if opts.chain < 1:
        parser.error("--chain must be >= 1")
    return opts, train_args


def main(argv=None) -> int:
    opts, train_args = parse_args(argv)
    try:
        if opts.prepare:
            submit_prepare(opts, train_args)
            return 0
        if opts.sweep:
            if any(a == "--config" or a.startswith("--config=") for a in train_args):
                raise BadInput("with --sweep the recipes come from the sweep file; give only common overrides here")
        else:
            split_train_args(train_args)
        submit(opts, train_args)
    except BadInput as err:
        print(f"launch error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
