"""Load what `python -m pretrain.evaluate TARGET` evaluates: a whole model in one process and the
tokenizer it was trained with.

TARGET is one of
  - a run directory (`runs/NAME`: its `checkpoints/latest`, or `--step N`), its `checkpoints/`
    folder or one `iter_NNNNNNN/` directory: megatron `torch_dist` at any saved (TP, PP, DP)
    layout, or DeepSpeed ZeRO; read by `checkpoints.readers` (no distributed model is built);
  - a Hugging Face export (`python -m checkpoints export --to hf`), loaded into our own model
    through the export's name table (`checkpoints.importer`).
Both architectures (`model.arch` sessa | transformer). The tokenizer comes from the training data's
manifest (checkpoint) or the export's provenance file; its id must equal the recorded one.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints.readers import CheckpointError
from model.config import ModelConfig


class TargetError(CheckpointError):
    """A target that cannot be evaluated; the message says what to pass instead."""


@dataclass
class Target:
    model: torch.nn.Module  # SessaLM or TransformerLM, eval mode, whole model
    tokenizer: object  # data_pipeline.tokenizer.Tokenizer
    config: ModelConfig
    info: dict  # path, format, step, tokens seen, run name, training sequence length


def eval_config(config: ModelConfig, device: torch.device) -> ModelConfig:
    """The saved config for scoring: fp32 parameters, the feedback solve that suits `device`."""
    impl = "auto" if device.type == "cuda" else "chunked"
    return dataclasses.replace(config, dtype="float32", feedback_impl=impl)


def new_model(config: ModelConfig, device: torch.device) -> torch.nn.Module:
    """A one-process model of either architecture, eval mode, weights uninitialised (load or draw them)."""
    from model.parallel import ensure_model_parallel
    from model.transformer import build_model as build_chunk, megatron_config_for

    if not torch.cuda.is_available():
        from model import cpu_compat

        cpu_compat.enable()  # megatron's RNG tracker and RoPE assume a CUDA device
    ensure_model_parallel()
    # perform_initialization=False: no random draw for weights that are loaded (or drawn) next
    return build_chunk(config, megatron_config_for(config, perform_initialization=False)).to(device).eval()


def build_model(config: ModelConfig, state: dict, device: torch.device) -> torch.nn.Module:
    """`new_model` holding `state` (global native names, as the checkpoint readers return them)."""
    model = new_model(config, device)
    if config.arch == "transformer":
        state = module_names(model, state)
    model.load_global_state_dict({k: v.float().to(device) for k, v in state.items()})
    return model


def module_names(model, state: dict) -> dict:
    """Checkpoint names of the Transformer arm -> its module names: megatron saves the local spec's
    norms under TE's fused names (`sharded_state_dict_keys_map`: input_layernorm.weight is saved as
    self_attention.linear_qkv.layer_norm_weight)."""
    keys_map = model.decoder.layers[0].submodules_config.sharded_state_dict_keys_map
    out = {}
    for name, tensor in state.items():
        prefix, sep, rest = name.partition(".layers.")
        if sep and rest.split(".", 1)[0].isdigit():
            number, rest = rest.split(".", 1)
            for module_name, saved_name in keys_map.items():
                if rest.startswith(saved_name):
                    rest = module_name + rest[len(saved_name):]
            name = f"{prefix}.layers.{number}.{rest}"
        out[name] = tensor
    return out


def unstack_layers(state: dict, config: ModelConfig) -> dict:
    """megatron's GPTModel saves each per-layer tensor of the Transformer arm stacked over layers
    (`decoder.layers.mlp.linear_fc2.weight` [L, ...]); split those into `decoder.layers.{n}.*`."""
    out = {}
    for name, tensor in state.items():
        rest = name.removeprefix("decoder.layers.")
        if rest != name and not rest.split(".", 1)[0].isdigit():
            if tensor.shape[0] != config.num_layers:
                raise TargetError(f"{name} has {tensor.shape[0]} stacked layers, the saved config has "
                                  f"num_layers={config.num_layers}")
            out.update({f"decoder.layers.{n}.{rest}": tensor[n] for n in range(config.num_layers)})
        else:
            out[name] = tensor
    return out


def load_target(path, *, step: int | None = None, tokenizer_spec: str | None = None,
                device: str | torch.device = "cpu") -> Target:
    """A run/checkpoint directory or an HF export -> Target (see the module docstring)."""
    path, device = Path(path), torch.device(device)
    if not path.exists():
        raise TargetError(f"target {path} does not exist; pass a run directory (runs/NAME), a checkpoint "
                          f"directory or an HF export")
    if (path / "config.json").is_file() and not (path / "metadata.json").is_file():
        if step is not None:
            raise TargetError(f"{path} is an HF export (one step); --step applies to run directories")
        return _load_export(path, tokenizer_spec, device)
    return _load_checkpoint(path, step, tokenizer_spec, device)


def _load_checkpoint(path: Path, step, tokenizer_spec, device) -> Target:
    from checkpoints.export import model_config
    from checkpoints.readers import open_checkpoint
    from checkpoints.tokenizer import load_tokenizer_for

    reader = open_checkpoint(path, step)
    common = reader.common
    config = model_config(common)
    try:
        tokenizer = load_tokenizer_for(common, tokenizer_spec)
    except CheckpointError as err:
        raise TargetError(f"target {path} has no usable tokenizer: {err}") from err
    state = unstack_layers(reader.read(sorted(reader.shapes)), config)
    model = build_model(eval_config(config, device), state, device)
    info = {"path": str(reader.path), "format": reader.format, "step": common.get("step"),
            "tokens": common.get("consumed_tokens"), "run_name": common["config"].get("run_name"),
            "arch": config.arch, **_training_data(common["config"])}
    return Target(model, tokenizer, config, info)


def _training_data(run_config: dict) -> dict:
    """What the evaluation reuses from the training data's manifest, when it is still there: the
    sequence length and how task examples were formatted (separator, field names)."""
    from data_pipeline.manifest import read_manifest

    try:
        manifest = read_manifest(run_config["data"]["path"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return {"seq_len": None, "task_format": None, "sources": []}
    return {"seq_len": manifest.get("seq_len"), "task_format": manifest.get("task"),
            "sources": manifest.get("sources", [])}


def _load_export(path: Path, tokenizer_spec, device) -> Target:
    from checkpoints.export import model_config
    from checkpoints.importer import model_from_hf
    from checkpoints.layout import model_fields_from_hf
    from data_pipeline.tokenizer import load_tokenizer

    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type") != "sessa":
        raise TargetError(f"{path}/config.json has model_type {hf.get('model_type')!r}; only exports of this "
                          f"recipe (model_type 'sessa') can be evaluated")
    provenance_file = path / "sessa_export.json"
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    if provenance.get("config"):
        config = model_config({"config": provenance["config"]})
    else:
        config = ModelConfig(**model_fields_from_hf(hf))
    spec = tokenizer_spec or provenance.get("tokenizer_spec")
    if spec is None:
        raise TargetError(f"target {path} has no tokenizer: its sessa_export.json names no tokenizer_spec; pass "
                          f"--tokenizer SPEC (the tokenizer the model was trained with)")
    tokenizer = load_tokenizer(spec)
    expected = provenance.get("tokenizer_id")
    if expected and tokenizer.id != expected:
        raise TargetError(f"tokenizer {spec!r} has id {tokenizer.id} but {path} was trained with {expected}; "
                          f"pass the right --tokenizer")
    model = model_from_hf(path, eval_config(config, device)).to(device).eval()
    info = {"path": str(path), "format": "hf export", "step": provenance.get("step"),
            "tokens": provenance.get("tokens_seen"), "run_name": provenance.get("run_name"),
            "arch": config.arch, **_training_data(provenance.get("config") or {})}
    return Target(model, tokenizer, config, info)
