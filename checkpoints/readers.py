"""Read training checkpoints (megatron torch_dist or DeepSpeed ZeRO) on one CPU process.

`open_checkpoint(path, step)` accepts a run directory (`runs/NAME`), its `checkpoints/` folder or
one `iter_NNNNNNN/` directory and returns a reader with:
  - `common`: the saved common state (config, tokenizer_id, layout, step, consumed_tokens);
  - `shapes`: native name -> global shape of every model tensor;
  - `read(names)`: those tensors, full (all tensor-parallel shards reassembled), fp32 as saved.

megatron `torch_dist` checkpoints are torch.distributed.checkpoint directories whose metadata
records every ShardedTensor's global shape and the chunk each rank wrote; DCP's planner stitches
the chunks into the requested full tensors, so any (TP, PP, DP) layout reads the same way and no
distributed model is built. Tensors are read a few at a time (a layer, an output shard).
"""
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .manager import CheckpointManager

MODEL_PREFIX = "model."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or converted; the message says what to fix."""


def resolve_step_dir(path: Path, step: int | None = None) -> Path:
    """runs/NAME | runs/NAME/checkpoints | .../iter_NNNNNNN -> the iter directory to read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory, its checkpoints/ folder or an iter_* directory")
    if (path / "metadata.json").is_file() or (path / "trainer_state.pt").is_file():  # an iter_NNNNNNN directory
        if step is not None and not path.name.endswith(f"{step:07d}"):
            raise CheckpointError(f"{path} is the checkpoint of another step than --step {step}")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    manager = CheckpointManager(root)
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"{root} has no `latest` checkpoint; saved steps: {manager.saved_steps()} (use --step)")
    if not manager.step_dir(step).is_dir():
        raise CheckpointError(f"{root} has no checkpoint for step {step}; saved steps: {manager.saved_steps()}")
    return manager.step_dir(step)


class MegatronReader:
    format = "megatron torch_dist"

    def __init__(self, step_dir: Path):
        from megatron.core import dist_checkpointing

        self.path = Path(step_dir)
        info = json.loads((self.path / "metadata.json").read_text())
        if info.get("sharded_backend") != "torch_dist":
            raise CheckpointError(f"{self.path} uses backend {info.get('sharded_backend')!r}; only torch_dist is supported")
        self.common = dist_checkpointing.load_common_state_dict(str(self.path))
        self._storage = dcp.FileSystemReader(str(self.path))
        metadata = self._storage.read_metadata()
        self._meta = {}
        for key, value in metadata.state_dict_metadata.items():
            if key.startswith(MODEL_PREFIX) and isinstance(value, TensorStorageMetadata):
                self._meta[key[len(MODEL_PREFIX):]] = value
        self.shapes = {name: tuple(m.size) for name, m in self._meta.items()}
        # name -> [(offsets, sizes)] of the pieces the ranks wrote (one per tensor-parallel shard)
        self.chunks = {name: [(tuple(c.offsets), tuple(c.sizes)) for c in m.chunks] for name, m in self._meta.items()}

    def read(self, names) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self._meta]
        if missing:
            raise CheckpointError(f"{self.path} has no tensor {MODEL_PREFIX}{missing[0]}")
        state = {MODEL_PREFIX + n: torch.empty(self._meta[n].size, dtype=self._meta[n].properties.dtype)
                 for n in names}
        dcp.load(state, storage_reader=self._storage, no_dist=True)
        return {n: state[MODEL_PREFIX + n] for n in names}


class DeepSpeedReader:
    """A DeepSpeed ZeRO 0-3 checkpoint of `engine: deepspeed` (tensor-parallel size 1), consolidated by
    DeepSpeed's own zero_to_fp32 utilities (`pretrain.deepspeed_engine.consolidated_state_dict`).
    That utility merges every ZeRO partition at once, so this reader holds the fp32 model in memory
    (the torch_dist reader does not)."""

    def __init__(self, step_dir: Path):
        self.path = Path(step_dir)
        self.common = torch.load(self.path / "trainer_state.pt", weights_only=False)
        self.format = f"deepspeed ZeRO-{self.common['zero_stage']}"
        from pretrain.deepspeed_engine import consolidated_state_dict

        try:
            self._state = consolidated_state_dict(self.path)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        self.shapes = {name: tuple(t.shape) for name, t in self._state.items()}
        self.chunks = None  # consolidated by DeepSpeed: no shard layout to check

    def read(self, names) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self._state]
        if missing:
            raise CheckpointError(f"{self.path} has no tensor {missing[0]} after DeepSpeed consolidation")
        return {n: self._state[n] for n in names}


def open_checkpoint(path, step: int | None = None):
    """Auto-detect the checkpoint format of `path` (megatron torch_dist or DeepSpeed) and return its reader."""
    step_dir = resolve_step_dir(Path(path), step)
    if (step_dir / "metadata.json").is_file():
        return MegatronReader(step_dir)
    if (step_dir / "trainer_state.pt").is_file():
        return DeepSpeedReader(step_dir)
    raise CheckpointError(f"{step_dir} is neither a megatron torch_dist checkpoint (metadata.json) nor a DeepSpeed "
                          f"checkpoint of this recipe (trainer_state.pt)")
