"""Import a Hugging Face export back into a training run, for continued pretraining.

    python -m checkpoints import HF_DIR --config configs/X.yaml --out runs/NAME [--model.FIELD value ...]

Builds the recipe's model on one process (TP = PP = 1), copies the exported weights into it one
tensor at a time through the same name table as export (fused tensors split, vocabulary padding
re-added as zero rows) and saves it as step 0 of a megatron `torch_dist` checkpoint holding the
model only (`weights_only` in its common state): no trainer, optimizer or data loader is built.
`python -m pretrain --config configs/X.yaml --run_name NAME --runs_dir runs` (engine: megatron)
then starts from these weights with a fresh optimizer, schedule and data order, at any TP/PP/DP
layout (checkpoints reshard). The recipe's model shape and tokenizer must match the export's. Peak memory: the model
once, plus one tensor.
"""
import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from model.config import ModelConfig

from . import layout
from .errors import CheckpointError
from .manager import CheckpointManager

# Saved in the common state of an imported checkpoint: the run starts from its weights (step 0).
WEIGHTS_ONLY = "weights_only"


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


def recipe_tree(config_path: Path, overrides=()) -> dict:
    """The recipe YAML with `--model.FIELD value` overrides applied (values parsed as YAML)."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise CheckpointError(f"config file {config_path} does not exist; recipes live in configs/")
    tree = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(tree.get("model"), dict):
        raise CheckpointError(f"{config_path}: the 'model' section is required")
    overrides = list(overrides)
    while overrides:
        flag = overrides.pop(0)
        flag, value = flag.split("=", 1) if "=" in flag else (flag, overrides.pop(0) if overrides else None)
        if value is None or not flag.startswith("--model.") or flag.count(".") != 1:
            raise CheckpointError(f"import takes overrides of the model section only, as --model.FIELD value; got {flag!r}")
        tree["model"][flag[len("--model."):]] = yaml.safe_load(value)
    return tree


def import_hf(source, config_path, out, overrides=()) -> Path:
    from data_pipeline.manifest import read_manifest

    source, out = Path(source), Path(out)
    hf_config = json.loads((source / "config.json").read_text())
    if hf_config.get("model_type") != "sessa":
        raise CheckpointError(f"{source}/config.json has model_type {hf_config.get('model_type')!r}, expected 'sessa'")
    tree = recipe_tree(config_path, overrides)
    try:
        config = ModelConfig(**tree["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: model section: {err}") from None
    differing = [f"{k}: export {v!r} vs config {getattr(config, k)!r}"
                 for k, v in layout.model_fields_from_hf(hf_config).items() if getattr(config, k) != v]
    if differing:
        raise CheckpointError(f"{config_path} does not describe the exported model ({'; '.join(differing)}); "
                              f"set these model fields in the recipe or with --model.FIELD")
    data_path = tree.get("data", {}).get("path")
    if data_path is None:
        raise CheckpointError(f"{config_path}: data.path is required (the tokenizer of the data must be the export's)")
    tokenizer_id = read_manifest(data_path)["tokenizer_id"]
    provenance = source / "sessa_export.json"
    if provenance.is_file():
        exported_id = json.loads(provenance.read_text()).get("tokenizer_id")
        if exported_id and exported_id != tokenizer_id:
            raise CheckpointError(f"the export was trained with tokenizer {exported_id} but {data_path} uses "
                                  f"{tokenizer_id}; prepare the data with the export's tokenizer")
    manager = CheckpointManager(out / "checkpoints")
    if manager.root.exists():
        raise CheckpointError(f"{manager.root} exists; import into a new run directory")

    model = model_from_hf(source, config)
    tree = {**tree, "model": config.to_dict(), "run_name": out.name, "runs_dir": str(out.parent)}
    common = {"step": 0, "consumed_tokens": 0, "skipped_steps": 0, WEIGHTS_ONLY: True, "config": tree,
              "tokenizer_id": tokenizer_id, "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "cp": 1},
              "imported_from": str(source.resolve())}
    manager.save(0, {"model": model.sharded_state_dict(prefix="model."), **common})
    print(f"imported {source} into {out} (step 0, weights only); continue with: python -m pretrain --config "
          f"{config_path} --runs_dir {out.parent} --run_name {out.name}")
    return out


def model_from_hf(source: Path, config: ModelConfig):
    """Our SessaLM (one process) holding the export's weights, filled one exported tensor at a time;
    strict both ways (every exported tensor consumed, every parameter filled)."""
    from model.lm import SessaLM
    from model.parallel import ensure_model_parallel

    ensure_model_parallel()
    weights = HFWeights(source)
    model = SessaLM(config)
    params = dict(model.named_parameters())
    entries = layout.entries(config, {name: tuple(p.shape) for name, p in params.items()})
    extra = sorted(set(weights.files) - {e.target for e in entries})
    if extra:
        raise CheckpointError(f"{source} has tensor {extra[0]} that the name table does not consume "
                              f"({len(extra)} extra); export and config disagree (num_heads, tie_embeddings?)")
    filled = set()
    with torch.no_grad():
        for entry in entries:
            try:
                pieces = layout.split(entry, weights.get(entry.target), config)
            except ValueError as err:
                raise CheckpointError(f"{source}: {err}") from None
            for name, tensor in pieces.items():
                params[name].copy_(tensor)
                filled.add(name)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise CheckpointError(f"the name table leaves parameter {unfilled[0]} unfilled (converter bug)")
    return model
