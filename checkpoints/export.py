"""Export a training checkpoint to Hugging Face, plain safetensors or the reference layout.

Memory stays bounded: the output shards are planned from the checkpoint's metadata (shapes only),
then each shard's tensors are read, converted, written and freed before the next shard, from a
torch_dist checkpoint (DCP reads only the requested chunks) and a DeepSpeed one alike (each tensor
gathered from the memory-mapped ZeRO partitions). Verification (on by default, every format) then
reads the checkpoint again independently and holds the model once (checkpoints/verify.py). Every
export carries `sessa_export.json`: source, step, tokens seen, config, git commit, tokenizer id,
converter version and the sha256 of every file written.
"""
import hashlib
import json
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.mup import feedback_query_multiplier, output_multiplier, query_multiplier
from model.reference import reference_inv_freq, reference_layer_kwargs

from . import layout
from .errors import CheckpointError
from .layout import hf_config_dict
from .readers import open_checkpoint
from .tokenizer import export_tokenizer, load_tokenizer_for
from .verify import verify_export

CONVERTER_VERSION = "1"
FORMATS = ("hf", "safetensors", "reference")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_DIR = Path(__file__).parent / "hf"


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    text = str(text).strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def model_config(common: dict) -> ModelConfig:
    """The ModelConfig saved with the checkpoint (never retyped)."""
    saved = dict(common["config"]["model"])
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def mup_multipliers(config: ModelConfig) -> dict:
    """μP's forward multipliers (model/mup.py) under the names of checkpoints/hf/configuration_sessa.py."""
    return {"query_multiplier": query_multiplier(config), "feedback_query_multiplier": feedback_query_multiplier(config),
            "logits_multiplier": output_multiplier(config)}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_strict(reader, config: ModelConfig) -> None:
    """Every model tensor of the checkpoint is consumed exactly once and every needed one exists."""
    needed = layout.native_names(config)
    duplicates = {n for n in needed if needed.count(n) > 1}
    if duplicates:
        raise CheckpointError(f"name table consumes {sorted(duplicates)} twice (converter bug)")
    missing = [n for n in needed if n not in reader.shapes]
    if missing:
        raise CheckpointError(f"checkpoint {reader.path} lacks tensor model.{missing[0]} ({len(missing)} missing); "
                              f"it does not match its saved config (num_layers={config.num_layers}, "
                              f"num_heads={config.num_heads}, tie_embeddings={config.tie_embeddings})")
    extra = sorted(set(reader.shapes) - set(needed))
    if extra:
        raise CheckpointError(f"checkpoint {reader.path} has tensor model.{extra[0]} that the name table does not "
                              f"consume ({len(extra)} extra); add it to checkpoints/layout.py or fix the config")
    if reader.chunks is not None:
        try:
            layout.check_tp_layout(config, reader.chunks, reader.common["layout"]["tp"])
        except ValueError as err:
            raise CheckpointError(f"checkpoint {reader.path}: {err}") from err
    embedding = layout.rules(config)[0].native[0]
    rows = reader.shapes[embedding][0]
    if rows != config.padded_vocab_size:
        raise CheckpointError(f"model.{embedding} has {rows} rows but vocab_size {config.vocab_size} padded to "
                              f"{config.vocab_pad_multiple} gives {config.padded_vocab_size}; the config does not match")


def plan_shards(entries, max_bytes: int, element_size: int) -> list[list]:
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = max(1, torch.Size(entry.shape).numel()) * element_size
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_sharded(reader, config, entries, out: Path, dtype, max_bytes: int, convert, name_of) -> dict:
    """Write `entries` shard by shard; returns the weight map (name -> file)."""
    shards = plan_shards(entries, max_bytes, torch.tensor([], dtype=dtype).element_size())
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        sources = reader.read([p for e in shard for p in e.native])
        tensors = {}
        for entry in shard:
            tensors[name_of(entry)] = convert(entry, sources).to(dtype).contiguous()
            weight_map[name_of(entry)] = filename
        del sources
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(max(1, torch.Size(e.shape).numel()) for e in entries) * torch.tensor([], dtype=dtype).element_size()
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return weight_map


# --- export --------------------------------------------------------------------------------------
def export(source, to: str, out, *, step: int | None = None, dtype: str = "fp32", max_shard_size: str = "5GB",
           verify: bool = True, dry_run: bool = False, tokenizer_spec: str | None = None, log=print) -> dict:
    if to not in FORMATS:
        raise CheckpointError(f"--to must be one of {FORMATS}, got {to!r}")
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    reader = open_checkpoint(source, step)
    common = reader.common
    config = model_config(common)
    if config.arch == "transformer" and reader.format != "megatron torch_dist":
        raise CheckpointError(f"{reader.path}: exporting a Transformer-arm checkpoint of the DeepSpeed engine is not "
                              f"supported; train the arm with `engine: megatron` to export it, or read its weights "
                              f"with `python -m checkpoints.deepspeed_format consolidate`")
    if config.arch == "transformer" and to == "reference":
        raise CheckpointError("--to reference writes Sessa layers for the public reference implementation; this "
                              "checkpoint is the Transformer arm (model.arch: transformer): use --to hf (Llama) "
                              "or --to safetensors")
    if config.mup and to == "reference":
        raise CheckpointError("--to reference: the public reference layer has no μP multipliers and this "
                              "checkpoint was trained with model.mup: true; use --to hf (it carries them) or "
                              "--to safetensors")
    check_strict(reader, config)
    entries = layout.entries(config, reader.shapes)
    torch_dtype = DTYPES[dtype]
    out = Path(out)
    log(f"source {reader.path} ({reader.format}, layout {common.get('layout')}, step {common.get('step')}); "
        f"{len(entries)} tensors -> {to} in {out}")
    tokenizer = load_tokenizer_for(common, tokenizer_spec) if to == "hf" else None
    if to == "reference":
        try:
            reference_args = reference_layer_kwargs(config)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    if dry_run:
        for entry in entries:
            log(f"  {' + '.join('model.' + p for p in entry.native)} -> {entry.target} {list(entry.shape)}")
        return {"dry_run": True, "tensors": len(entries)}
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    max_bytes = parse_size(max_shard_size)

    if to == "hf":
        write_sharded(reader, config, entries, out, torch_dtype, max_bytes,
                      lambda e, src: layout.fuse(e, src, config), lambda e: e.target)
        export_tokenizer(tokenizer, config, out)
        eos = tokenizer.encoding._special_tokens.get("<|endoftext|>")
        hf_config = hf_config_dict(config, torch_dtype, eos) | (mup_multipliers(config) if config.mup else {})
        (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eos, "eos_token_id": eos, "do_sample": False}, indent=2) + "\n")
        if config.arch == "sessa":  # the Transformer arm is transformers' own LlamaForCausalLM
            for name in ("configuration_sessa.py", "modeling_sessa.py"):
                shutil.copyfile(HF_DIR / name, out / name)
    elif to == "safetensors":  # our native names, full tensors (vocabulary padding kept)
        names = layout.native_names(config)
        native = [layout.Entry(n, (n,), reader.shapes[n], False, None) for n in names]
        write_sharded(reader, config, native, out, torch_dtype, max_bytes, lambda e, src: src[e.target],
                      lambda e: e.target)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    else:
        write_reference(reader, config, entries, out, torch_dtype, reference_args)
    report = None
    if verify:
        report = verify_export(reader, config, out, to, dtype=torch_dtype, tokenizer=tokenizer, log=log)
    write_manifest(out, reader, config, to, dtype, tokenizer, report)
    log(f"exported to {out}")
    return {"out": str(out), "report": report}


def write_reference(reader, config, entries, out: Path, dtype, layer_args: dict) -> None:
    """layers/{i}.safetensors with the reference layer's exact names (its state dict, RoPE buffer
    included), lm.safetensors with the LM parts under HF names, config.json holding exactly the
    reference constructor's arguments (`SessaLayer(**config)`), lm_config.json the rest."""
    (out / "layers").mkdir()
    inv_freq = reference_inv_freq(config.head_size)
    for i in range(config.num_layers):
        layer = [e for e in entries if e.layer == i]
        sources = reader.read([p for e in layer for p in e.native])
        tensors = {layout.reference_name(e.target, i): layout.fuse(e, sources, config).to(dtype).contiguous()
                   for e in layer}
        tensors[layout.ROPE_BUFFER] = inv_freq.clone()  # a buffer of the reference layer (fp32)
        save_file(tensors, str(out / "layers" / f"{i}.safetensors"), metadata={"format": "pt"})
    rest = [e for e in entries if e.layer is None]
    sources = reader.read([p for e in rest for p in e.native])
    save_file({e.target: layout.fuse(e, sources, config).to(dtype).contiguous() for e in rest},
              str(out / "lm.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(layer_args, indent=2) + "\n")
    (out / "lm_config.json").write_text(json.dumps({
        "num_layers": config.num_layers, "vocab_size": config.vocab_size, "tie_embeddings": config.tie_embeddings,
        "norm_eps": config.norm_eps, "layer_files": "layers/{i}.safetensors: SessaLayer(**config.json).state_dict()",
        "lm_file": "lm.safetensors: model.embed_tokens.weight, model.norm.weight/bias, lm_head.weight if untied",
    }, indent=2) + "\n")


def write_manifest(out: Path, reader, config, to, dtype, tokenizer, report) -> None:
    common = reader.common
    files = {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {
        "converter": "sessa-pretrain checkpoints", "converter_version": CONVERTER_VERSION,
        "format": to, "dtype": dtype, "source": str(reader.path.resolve()), "source_format": reader.format,
        "source_layout": common.get("layout"), "step": common.get("step"),
        "tokens_seen": common.get("consumed_tokens"), "run_name": common["config"].get("run_name"),
        "config": common["config"], "model": config.to_dict(), "tokenizer_id": common.get("tokenizer_id"),
        "tokenizer_spec": tokenizer.spec if tokenizer is not None else None, "git_commit": git_commit(),
        "tied_embeddings": config.tie_embeddings, "vocab_padding_stripped": to != "safetensors",
        "verification": report, "files": files,
    }
    (out / "sessa_export.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
