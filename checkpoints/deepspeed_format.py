"""DeepSpeed checkpoints as the DeepSpeed engine (pretrain/engines/deepspeed.py) writes them, and the
tools that read them without a process group:

    python -m checkpoints.deepspeed_format to-universal runs/x/checkpoints/iter_0000100   # resume at another DP size / stage
    python -m checkpoints.deepspeed_format consolidate runs/x/checkpoints/iter_0000100 model_fp32.pt

Layout of an `iter_NNNNNNN` directory: DeepSpeed's `mp_rank_XX_model_states.pt` and
`*zero_pp_rank_*_optim_states.pt`; `trainer_state.pt` (the loop's common state: step, tokens, scheduler,
config, tokenizer id, plus layout, zero_stage and the scalar parameters trained as shape [1]);
`trainer_rank_NNNNN.pt` per rank (RNG, data-loader position); after `to-universal`, a `universal/`
DeepSpeed universal checkpoint that a resume at another data-parallel size or ZeRO stage loads.
"""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

TRAINER_STATE = "trainer_state.pt"
RANK_STATE_GLOB = "trainer_rank_*.pt"
UNIVERSAL = "universal"  # sub-directory of a checkpoint written by `to-universal`


def rank_state_name(rank: int) -> str:
    return f"trainer_rank_{rank:05d}.pt"


def to_universal(checkpoint: Path) -> Path:
    """Write `checkpoint/universal/` with DeepSpeed's ds_to_universal (atomically: a temporary
    directory renamed into place); the original checkpoint stays as it is."""
    checkpoint = Path(checkpoint)
    common = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
    if common["layout"]["tp"] != 1:
        raise ValueError(f"{checkpoint} was saved with parallel.tensor={common['layout']['tp']}; universal "
                         f"conversion is supported for tensor-parallel size 1 only")
    final, tmp, staged = checkpoint / UNIVERSAL, checkpoint / f".{UNIVERSAL}.tmp", checkpoint / f".{UNIVERSAL}.input"
    for path in (tmp, staged):
        shutil.rmtree(path, ignore_errors=True)
    # ds_to_universal writes every module-state entry as a tensor; megatron's linears add
    # `_extra_state: None`. It reads a staged copy without them (optimizer shards linked, not copied);
    # the universal checkpoint then gets the original module states, which a strict load expects.
    staged.mkdir()
    model_files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
    for path in checkpoint.iterdir():
        if path.is_file() and path not in model_files:
            (staged / path.name).symlink_to(path.resolve())
    for path in model_files:
        state = torch.load(path, map_location="cpu", weights_only=False)
        state["module"] = {k: v for k, v in state["module"].items() if torch.is_tensor(v)}
        torch.save(state, staged / path.name)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(staged),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if common["zero_stage"] <= 2:
        command.append("--inject_missing_state")  # stages 1/2 checkpoints lack the fields it reads
    done = subprocess.run(command, capture_output=True, text=True)
    shutil.rmtree(staged)
    if done.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    for path in model_files:
        shutil.copy2(path, tmp / path.name)
    (checkpoint / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer, not ours
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def consolidated_state_dict(checkpoint: Path) -> dict:
    """One fp32 state dict (SessaLM parameter names, CPU tensors) from a DeepSpeed checkpoint
    saved at tensor-parallel size 1, for export or `SessaLM.load_state_dict`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = Path(checkpoint)
    common = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
    if common["layout"]["tp"] != 1:
        raise ValueError(f"{checkpoint} was saved with parallel.tensor={common['layout']['tp']}; consolidation "
                         f"is supported for tensor-parallel size 1 only")
    if common["zero_stage"] == 0:  # no ZeRO shards: the module state holds the weights
        state = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    state = {k: v.float().contiguous() for k, v in state.items() if torch.is_tensor(v)}  # not megatron's _extra_state
    for name in common["scalar_params"]:  # trained as shape [1], see pretrain/engines/deepspeed.py
        state[name] = state[name].reshape(())
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints.deepspeed_format", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    universal = commands.add_parser("to-universal", help="add a universal checkpoint to an iter_NNNNNNN directory")
    universal.add_argument("checkpoint", type=Path)
    consolidate = commands.add_parser("consolidate", help="write one fp32 state dict (torch.save)")
    consolidate.add_argument("checkpoint", type=Path)
    consolidate.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    if args.command == "to-universal":
        print(f"wrote {to_universal(args.checkpoint)}")
    else:
        state = consolidated_state_dict(args.checkpoint)
        torch.save(state, args.output)
        print(f"wrote {args.output}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.2f}M values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
