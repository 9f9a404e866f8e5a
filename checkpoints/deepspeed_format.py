"""DeepSpeed checkpoints as the DeepSpeed engine (pretrain/engines/deepspeed.py) writes them: read
them tensor by tensor, consolidate them with DeepSpeed's own tools, convert them to DeepSpeed's
universal form. No process group is needed.

    python -m checkpoints.deepspeed_format to-universal runs/x/checkpoints/iter_0000100   # resume at another DP size / stage
    python -m checkpoints.deepspeed_format consolidate runs/x/checkpoints/iter_0000100 model_fp32.pt

Layout of one `iter_NNNNNNN/` directory (tensor-parallel size 1 for everything here):
  - `mp_rank_00_model_states.pt` (stages 0-2; stage 3: `zero_pp_rank_R_mp_rank_00_model_states.pt`
    per rank): the module state and `param_shapes`, the parameters of each optimizer group in order;
  - `*zero_pp_rank_R_mp_rank_00_optim_states.pt` per data-parallel rank R (stages 1-3): that rank's
    fp32 master partition of each group (stages 1/2: `single_partition_of_fp32_groups`, the group's
    flat vector cut into equal pieces; stage 3: `fp32_flat_groups`, every parameter cut into
    ceil(numel / ranks) pieces, rank R's pieces concatenated) and the Adam moments;
  - `trainer_state.pt` (the loop's common state: step, tokens, scheduler, config, tokenizer id, plus
    layout, `zero_stage` and `scalar_params`, the 0-dim parameters trained as shape [1]) and
    `trainer_rank_NNNNN.pt` per rank (RNG, data-loader position);
  - after `to-universal`, `universal/`: DeepSpeed's universal checkpoint, which a resume at another
    data-parallel size or ZeRO stage loads.
"""
import argparse
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .errors import CheckpointError

UNIVERSAL = "universal"  # sub-directory of a checkpoint written by `to-universal`
TRAINER_STATE = "trainer_state.pt"
RANK_STATE_GLOB = "trainer_rank_*.pt"
_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def rank_state_name(rank: int) -> str:
    return f"trainer_rank_{rank:05d}.pt"


def read_trainer_state(checkpoint: Path) -> dict:
    """The common state the DeepSpeed engine saved with the checkpoint (no tensors)."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} has no {TRAINER_STATE}; it was not written by engine: deepspeed")
    return torch.load(path, weights_only=False)


def _require_tp1(checkpoint: Path, common: dict, what: str) -> None:
    if common["layout"]["tp"] != 1:
        raise CheckpointError(f"{checkpoint} was saved with parallel.tensor={common['layout']['tp']}; {what} "
                              f"is supported for tensor-parallel size 1 only")


def _load_mapped(path: Path) -> dict:
    """torch.load with the file memory-mapped: only the pickled structure is read; a tensor's bytes are
    read when it is used, and released (munmap) when the last reference to the load goes away."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _read_range(flats: list[torch.Tensor], start: int, length: int) -> list[torch.Tensor]:
    """Views of elements [start, start + length) of the concatenation of `flats` (never formed)."""
    pieces, offset = [], 0
    for flat in flats:
        lo, hi = max(start - offset, 0), min(start + length - offset, flat.numel())
        if lo < hi:
            pieces.append(flat[lo:hi])
        offset += flat.numel()
    if sum(p.numel() for p in pieces) != length:
        raise CheckpointError(f"elements [{start}, {start + length}) lie outside the saved partitions ({offset})")
    return pieces


def _copied(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces concatenated into a new tensor of its own (never a view of a mapped file)."""
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()


class DeepSpeedCheckpoint:
    """Tensors of a ZeRO 0-3 checkpoint, read a few at a time from memory-mapped files: each one is
    gathered from the ranks' fp32 partitions (stages 1-3) or the module state (stage 0), so the
    peak memory is the tensors asked for, not the model. Checkpoint-reader interface of readers.py:
    `common`, `shapes` (our parameter names, 0-dim gamma biases restored), `read(names)`."""

    chunks = None  # partitions are flat: there is no tensor-parallel shard layout to check

    def __init__(self, checkpoint: Path):
        self.path = Path(checkpoint)
        self.common = read_trainer_state(self.path)
        _require_tp1(self.path, self.common, "reading a DeepSpeed checkpoint")
        self.stage = self.common["zero_stage"]
        self.format = f"deepspeed ZeRO-{self.stage}"
        self._scalars = set(self.common.get("scalar_params", ()))
        model_file = self.path / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if self.stage == 3
                                  else "mp_rank_00_model_states.pt")
        if not model_file.is_file():
            raise CheckpointError(f"{self.path} lacks {model_file.name}; the DeepSpeed save is incomplete")
        model_state = _load_mapped(model_file)
        self._buffers = list(model_state.get("buffer_names", ()))
        # name -> (group, offset, numel, shape); offsets in the units of the stage's flat layout
        self._index: dict[str, tuple[int, int, int, torch.Size]] = {}
        if self.stage == 0:
            module = {k: v for k, v in model_state["module"].items() if torch.is_tensor(v)}
            self._index = {name: (0, 0, t.numel(), t.shape) for name, t in module.items()}
            self._optim_files = []
        else:
            self._optim_files = self._find_optim_files()
            self._index_partitions(model_state["param_shapes"])
        shapes = {name: tuple(shape) for name, (_, _, _, shape) in self._index.items()}
        for name in self._buffers:
            shapes[name] = tuple(model_state["module"][name].shape)
        self.shapes = {name: (() if name in self._scalars else shape) for name, shape in shapes.items()}
        self._shared = dict(model_state.get("shared_params") or {})  # alias -> source parameter
        for alias, source in self._shared.items():
            self.shapes[alias] = self.shapes[source]

    def _find_optim_files(self) -> list[Path]:
        by_rank = {}
        for path in self.path.glob("*_optim_states.pt"):
            match = _OPTIM_FILE.search(path.name)
            if match:
                by_rank[int(match.group(1))] = path
        ranks = self.common["layout"]["dp"]
        if sorted(by_rank) != list(range(ranks)):
            raise CheckpointError(f"{self.path} holds optimizer partitions of ranks {sorted(by_rank)} but was saved at "
                                  f"data-parallel size {ranks}; the DeepSpeed save is incomplete")
        return [by_rank[r] for r in range(ranks)]

    def _index_partitions(self, param_shapes: list[dict]) -> None:
        """Where each parameter lies in the flat partitions, from the saved shapes and partition sizes."""
        first = _load_mapped(self._optim_files[0])["optimizer_state_dict"]
        ranks = len(self._optim_files)
        if self.stage <= 2:
            paddings = first.get("param_alignment_paddings")
            for group, (shapes, partition) in enumerate(zip(param_shapes, first["single_partition_of_fp32_groups"])):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    self._index[name] = (group, offset, math.prod(shape), torch.Size(shape))
                    offset += math.prod(shape) + (paddings[group][i] if paddings else 0)
                if offset > partition.numel() * ranks:
                    raise CheckpointError(f"{self.path}: group {group} needs {offset} elements but its partitions hold "
                                          f"{partition.numel() * ranks}; the checkpoint does not match its param_shapes")
        else:
            offset = 0  # rank-local: every rank holds ceil(numel / ranks) elements of every parameter
            for shapes in param_shapes:
                for name, shape in shapes.items():
                    numel = math.prod(shape)
                    self._index[name] = (0, offset, numel, torch.Size(shape))
                    offset += math.ceil(numel / ranks)
            available = sum(flat.numel() for flat in first["fp32_flat_groups"])
            if offset != available:
                raise CheckpointError(f"{self.path}: the parameters need {offset} elements per rank but the partitions "
                                      f"hold {available}; the checkpoint does not match its param_shapes")

    def read(self, names) -> dict[str, torch.Tensor]:
        """Those tensors, full and fp32 (CPU, owning their memory). The files are mapped afresh for each
        tensor, so the pages read for one are released before the next: the peak is the tensors
        returned plus twice the largest (its pages and its copy)."""
        names = list(names)
        missing = [n for n in names if n not in self.shapes]
        if missing:
            raise CheckpointError(f"{self.path} has no tensor {missing[0]}")
        out = {name: self._read_one(name) for name in names}
        for name in names:
            if name in self._scalars or self._shared.get(name) in self._scalars:
                out[name] = out[name].reshape(())
        return out

    def _read_one(self, name: str) -> torch.Tensor:
        source = self._shared.get(name, name)
        if self.stage == 0 or source in self._buffers:
            model_file = "zero_pp_rank_0_mp_rank_00_model_states.pt" if self.stage == 3 else "mp_rank_00_model_states.pt"
            return _load_mapped(self.path / model_file)["module"][source].to(torch.float32, copy=True)
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        flats = [_load_mapped(f)["optimizer_state_dict"][key] for f in self._optim_files]
        group, offset, numel, shape = self._index[source]
        if self.stage == 3:  # rank r holds elements [r * piece, (r + 1) * piece) of the padded parameter
            piece = math.ceil(numel / len(flats))
            full = _copied([view for rank in flats for view in _read_range(rank, offset, piece)])[:numel]
        else:  # the group's flat vector, cut into equal pieces, one per rank
            full = _copied(_read_range([rank[group] for rank in flats], offset, numel))
        return full.to(torch.float32).view(shape)


def consolidated_state_dict(checkpoint: Path) -> dict:
    """One fp32 state dict (SessaLM parameter names, CPU tensors) by DeepSpeed's own zero_to_fp32
    utilities, for `SessaLM.load_state_dict` (and as the independent check of `DeepSpeedCheckpoint`).
    Holds the whole model in memory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = Path(checkpoint)
    common = read_trainer_state(checkpoint)
    _require_tp1(checkpoint, common, "consolidation")
    if common["zero_stage"] == 0:  # no ZeRO shards: the module state holds the weights
        state = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    state = {k: v.float().contiguous() for k, v in state.items() if torch.is_tensor(v)}  # not megatron's _extra_state
    for name in common["scalar_params"]:  # trained as shape [1] (DeepSpeed cannot broadcast 0-dim tensors)
        state[name] = state[name].reshape(())
    return state


def to_universal(checkpoint: Path) -> Path:
    """Write `checkpoint/universal/` with DeepSpeed's ds_to_universal (atomically: a temporary
    directory renamed into place); the original checkpoint stays as it is."""
    checkpoint = Path(checkpoint)
    common = read_trainer_state(checkpoint)
    _require_tp1(checkpoint, common, "universal conversion")
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
        raise CheckpointError(f"ds_to_universal failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    for path in model_files:
        shutil.copy2(path, tmp / path.name)
    (checkpoint / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer, not ours
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


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
    try:
        if args.command == "to-universal":
            print(f"wrote {to_universal(args.checkpoint)}")
        else:
            state = consolidated_state_dict(args.checkpoint)
            torch.save(state, args.output)
            print(f"wrote {args.output}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.2f}M values")
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
