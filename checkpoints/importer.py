"""Import a Hugging Face export back into a training run, for continued pretraining.

    python -m checkpoints import HF_DIR --config configs/X.yaml --out runs/NAME [--section.field value ...]

Builds the recipe's trainer on one process (TP = PP = 1), loads the exported weights through the
same name table as export (fused tensors split, vocabulary padding re-added as zero rows) and saves
step 0 as a megatron `torch_dist` checkpoint with a fresh optimizer. `python -m pretrain --config
configs/X.yaml --run_name NAME --runs_dir runs` then resumes from it at any TP/PP/DP layout
(checkpoints reshard). The recipe's model shape and tokenizer must match the export's.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import layout
from .export import sessa_config_from_hf
from .readers import CheckpointError


class HFWeights:
    """Tensors of an HF export (one file or an index of shards), read one at a time."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                self.files = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{self.dir} has no model.safetensors(.index.json); is it an `export --to hf` output?")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"{self.dir} lacks tensor {name}; the export is incomplete or for another config")
        with safe_open(str(self.dir / self.files[name]), "pt") as f:
            return f.get_tensor(name)


def native_state_from_hf(directory: Path, config) -> dict[str, torch.Tensor]:
    """HF tensors -> our native global names, strict both ways."""
    weights = HFWeights(directory)
    entries = layout.entries(config, _native_shapes(config))
    extra = sorted(set(weights.files) - {e.target for e in entries})
    if extra:
        raise CheckpointError(f"{directory} has tensor {extra[0]} that the name table does not consume "
                              f"({len(extra)} extra); export and config disagree (num_heads, tie_embeddings?)")
    state = {}
    for entry in entries:
        state.update(layout.split(entry, weights.get(entry.target), config))
    return state


def _native_shapes(config) -> dict[str, tuple[int, ...]]:
    """Global shapes of our parameters, from a one-process model on the meta device."""
    from model.lm import SessaLM
    from model.init import global_named_parameters
    from model.parallel import ensure_model_parallel

    ensure_model_parallel()
    with torch.device("meta"):
        model = SessaLM(config)
    return {name: tuple(p.shape) for name, p in global_named_parameters(model)}


def import_hf(source, config_path, out, overrides=()) -> Path:
    from data_pipeline.manifest import read_manifest
    from pretrain.config import load_config

    source, out = Path(source), Path(out)
    hf_config = json.loads((source / "config.json").read_text())
    if hf_config.get("model_type") != "sessa":
        raise CheckpointError(f"{source}/config.json has model_type {hf_config.get('model_type')!r}, expected 'sessa'")
    config = load_config(config_path, [*overrides, "--runs_dir", str(out.parent), "--run_name", out.name,
                                       "--parallel.tensor", "1", "--parallel.pipeline", "1",
                                       "--parallel.virtual_stages", "1", "--parallel.sequence_parallel", "false"])
    differing = [f"{k}: export {v!r} vs config {getattr(config.model, k)!r}"
                 for k, v in sessa_config_from_hf(hf_config).items() if getattr(config.model, k) != v]
    if differing:
        raise CheckpointError(f"{config_path} does not describe the exported model ({'; '.join(differing)}); "
                              f"set these model fields in the recipe or with --model.FIELD")
    provenance = source / "sessa_export.json"
    if provenance.is_file():
        exported_id = json.loads(provenance.read_text()).get("tokenizer_id")
        data_id = read_manifest(config.data.path)["tokenizer_id"]
        if exported_id and exported_id != data_id:
            raise CheckpointError(f"the export was trained with tokenizer {exported_id} but {config.data.path} uses "
                                  f"{data_id}; prepare the data with the export's tokenizer")
    if (out / "checkpoints").exists():
        raise CheckpointError(f"{out}/checkpoints exists; import into a new run directory")
    state = native_state_from_hf(source, config.model)

    from checkpoints.megatron_fixes import initialise_optimizer_state
    from pretrain.trainer import Trainer

    trainer = Trainer(config)
    try:
        dtype = trainer.chunks[0].embedding.weight.dtype
        trainer.chunks[0].load_global_state_dict({k: v.to(dtype) for k, v in state.items()})
        initialise_optimizer_state(trainer.optimizer)
        trainer.save()
    finally:
        trainer.close()
    print(f"imported {source} into {out} (step 0); continue with: python -m pretrain --config {config_path} "
          f"--runs_dir {out.parent} --run_name {out.name}")
    return out
