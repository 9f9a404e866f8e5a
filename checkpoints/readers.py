"""Read training checkpoints (megatron torch_dist or DeepSpeed ZeRO) on one CPU process, a few
tensors at a time.

`open_checkpoint(path, step)` accepts a run directory (`runs/NAME`), its `checkpoints/` folder or
one `iter_NNNNNNN/` directory and returns a reader with:
  - `common`: the saved common state (config, tokenizer_id, layout, step, consumed_tokens);
  - `shapes`: native name -> global shape of every model tensor;
  - `read(names)`: those tensors, full (all tensor-parallel shards reassembled), fp32 as saved.

megatron `torch_dist` checkpoints are torch.distributed.checkpoint directories whose metadata
records every ShardedTensor's global shape and the chunk each rank wrote; DCP's planner stitches
the chunks into the requested full tensors, so any (TP, PP, DP) layout reads the same way and no
distributed model is built. DeepSpeed checkpoints are read by `deepspeed_format.DeepSpeedCheckpoint`,
which gathers each tensor from the ranks' memory-mapped ZeRO partitions.
"""
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .deepspeed_format import TRAINER_STATE, DeepSpeedCheckpoint
from .errors import CheckpointError
from .manager import CheckpointManager

MODEL_PREFIX = "model."


def resolve_step_dir(path: Path, step: int | None = None) -> Path:
    """runs/NAME | runs/NAME/checkpoints | .../iter_NNNNNNN -> the iter directory to read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory, its checkpoints/ folder or an iter_* directory")
    if (path / "metadata.json").is_file() or (path / TRAINER_STATE).is_file():  # an iter_NNNNNNN directory
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


def open_checkpoint(path, step: int | None = None):
    """Auto-detect the checkpoint format of `path` (megatron torch_dist or DeepSpeed) and return its reader."""
    step_dir = resolve_step_dir(Path(path), step)
    if (step_dir / "metadata.json").is_file():
        return MegatronReader(step_dir)
    if (step_dir / TRAINER_STATE).is_file():
        return DeepSpeedCheckpoint(step_dir)
    raise CheckpointError(f"{step_dir} is neither a megatron torch_dist checkpoint (metadata.json) nor a DeepSpeed "
                          f"checkpoint of this recipe (trainer_state.pt)")
