"""Write a DeepSpeed hostfile (`HOST slots=N` per node) for the DeepSpeed launcher.

    python -m launch.deepspeed_hostfile --slots 8 node1 node2 > hostfile   # named hosts
    python -m launch.deepspeed_hostfile --slots 8 > hostfile               # inside a SLURM job: its nodes

Then start one launcher per node, without ssh (node N = its line in the hostfile, from 0):

    deepspeed --hostfile hostfile --no_ssh --node_rank N --master_addr node1 --master_port 29500 \\
        --no_local_rank --module pretrain --config configs/1.3b.yaml --engine deepspeed

The launcher sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT for each rank, which
`pretrain.distributed` reads. `--no_local_rank` is needed: our entry point takes only
`--section.field value` overrides. Under SLURM, `SESSA_LAUNCH=deepspeed sbatch launch/slurm/pretrain.sbatch`
(one srun task per rank) needs neither hostfile nor launcher.
"""
import argparse
import os
import subprocess
import sys


def slurm_hosts(environ=os.environ) -> list[str]:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return []
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return done.stdout.split()


def hostfile(hosts: list[str], slots: int) -> str:
    if slots < 1:
        raise ValueError(f"--slots must be >= 1, got {slots}")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"hosts must be distinct (one line per node), got {hosts}")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.deepspeed_hostfile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hosts", nargs="*", help="node names, in node-rank order (default: the SLURM job's nodes)")
    parser.add_argument("--slots", type=int, required=True, help="ranks (GPUs) per node")
    args = parser.parse_args(argv)
    hosts = args.hosts or slurm_hosts()
    if not hosts:
        parser.error("name the hosts, or run inside a SLURM job (SLURM_JOB_NODELIST)")
    try:
        sys.stdout.write(hostfile(hosts, args.slots))
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
