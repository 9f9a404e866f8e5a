"""Verification of an export against the checkpoint, read independently of the exporter's reader:
a megatron torch_dist checkpoint by torch.distributed.checkpoint's own loader (the state dict rebuilt
from the checkpoint's metadata alone, every shard stitched by DCP), a DeepSpeed checkpoint by
DeepSpeed's own zero_to_fp32 consolidation. A bug in the streaming readers therefore shows.

  - `--to safetensors`: every exported tensor equals the independently read one (rounded to the
    export dtype), and the names match exactly;
  - `--to hf` and `--to reference`: our native model with the independently read weights against the
    exported model in fp32 (the HF export loaded as it is; the reference export's layer files loaded
    into the same HF modules, which use the reference's names), on fixed text and random ids at
    lengths that cross the feedback chunk size.

The model comparison passes when max |Δlogit| <= 1e-4, top-1 is identical everywhere, and the
exported model's prefill logits equal its token-by-token decoding with the cache. The report lists
every layer's max |Δhidden| (embedding output, each layer, final logits) and names the first layer
that diverges. Verification holds the model in memory once (the export itself streams).
"""
import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from .deepspeed_format import DeepSpeedCheckpoint, consolidated_state_dict
from .errors import CheckpointError
from .tokenizer import TOKENIZER_SAMPLE

TOLERANCE = 1e-4
# A small or briefly trained model's layers add tiny updates to the residual stream, which an
# absolute tolerance cannot see; each layer's update (output - input) must also agree relatively.
RELATIVE_TOLERANCE = 1e-3
MODEL_PREFIX = "model."


class VerificationError(CheckpointError):
    pass


class _ModelLoadPlanner(_EmptyStateDictLoadPlanner):
    """DCP's planner that rebuilds a state dict from the checkpoint's metadata, limited to `model.*`
    (megatron's metadata has no planner_data, which the planner's own key filter needs)."""

    def _should_include_key(self, key: str, metadata) -> bool:
        return key.startswith(MODEL_PREFIX)


def independent_state_dict(reader) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors (native names, fp32), read without `reader.read`: DeepSpeed's
    own consolidation, or torch.distributed.checkpoint loading every `model.*` entry its metadata
    lists into an empty state dict."""
    if isinstance(reader, DeepSpeedCheckpoint):
        return consolidated_state_dict(reader.path)
    state = {}
    # What torch's own dcp_to_torch_save does: an empty state dict that the planner fills from metadata.
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(reader.path)), planner=_ModelLoadPlanner(),
                     no_dist=True)
    return {k[len(MODEL_PREFIX):]: v.float() for k, v in state.items() if torch.is_tensor(v)}


def native_model(state: dict[str, torch.Tensor], config, dtype=torch.float32):
    """Our model (SessaLM, or TransformerLM for the Transformer arm; one process, fp32) with the
    weights of `state`, rounded through `dtype` first."""
    from model.parallel import ensure_model_parallel

    ensure_model_parallel()
    weights = {k: v.to(dtype).float() for k, v in state.items()}
    if config.arch == "transformer":
        from model import cpu_compat
        from model.transformer import TransformerLM

        from .layout import unstacked_state_dict

        if not torch.cuda.is_available():
            cpu_compat.enable()  # megatron's RNG tracker and RoPE assume a CUDA device
        model = TransformerLM(dataclasses.replace(config, dtype="float32")).eval()
        model.load_global_state_dict(unstacked_state_dict(weights, config))
        return model
    from model.lm import SessaLM

    model = SessaLM(dataclasses.replace(config, dtype="float32", feedback_impl="chunked")).eval()
    model.load_global_state_dict(weights)
    return model


@torch.no_grad()
def native_hidden_states(model, tokens):
    """tokens [B, T] -> (embedding output, each layer's output) as [B, T, D], and logits [B, T, V]."""
    if model.sessa.arch == "transformer":
        return _transformer_hidden_states(model, tokens)
    hidden = model.embedding(tokens).transpose(0, 1)
    states = [hidden.transpose(0, 1)]
    for layer in model.layers:
        hidden, _ = layer(hidden)
        states.append(hidden.transpose(0, 1))
    logits = model.lm_head(hidden)
    return states, logits.transpose(0, 1)[..., : model.sessa.vocab_size]


def _transformer_hidden_states(model, tokens):
    """The same for megatron's GPTModel, read by forward hooks; the last state is the final norm's
    output, as Llama's `hidden_states` report it."""
    states = []
    hooks = [model.embedding.register_forward_hook(lambda m, i, out: states.append(out.transpose(0, 1)))]
    hooks += [layer.register_forward_hook(lambda m, i, out: states.append(out[0].transpose(0, 1)))
              for layer in model.decoder.layers]
    try:
        logits = model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    states[-1] = model.decoder.final_layernorm(states[-1])
    return states, logits[..., : model.sessa.vocab_size]


def verification_inputs(config, tokenizer=None, seed: int = 0) -> list[torch.Tensor]:
    C = config.feedback_chunk_size
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, config.vocab_size, (2, 2 * C + 3), generator=gen),
              torch.randint(0, config.vocab_size, (1, C + 1), generator=gen)]
    if tokenizer is not None:
        ids = tokenizer.encoding.encode(TOKENIZER_SAMPLE * 4, allowed_special="all")[: 3 * C + 5]
        inputs.insert(0, torch.tensor([ids]))
    return inputs


@torch.no_grad()
def compare(native, hf_model, inputs, log=print, tolerance: float = TOLERANCE) -> dict:
    """Both models on `inputs`; raises VerificationError naming the first diverging layer."""
    hf_model = hf_model.float().eval()
    worst, relative = {}, {}
    top1_mismatch = 0
    for tokens in inputs:
        ours, our_logits = native_hidden_states(native, tokens)
        out = hf_model(tokens, output_hidden_states=True)
        theirs = list(out.hidden_states)
        if len(theirs) != len(ours):
            raise VerificationError(f"exported model returned {len(theirs)} hidden states, expected {len(ours)}")
        names = ["embedding"] + [f"layer {i}" for i in range(len(ours) - 1)] + ["logits"]
        for i in range(1, len(ours)):
            update = (ours[i] - ours[i - 1]).float()
            error = (update - (theirs[i] - theirs[i - 1]).float()).abs().nan_to_num(float("inf")).max().item()
            rel = error / max(update.abs().max().item(), 1e-30)
            relative[names[i]] = max(relative.get(names[i], 0.0), rel)
        for name, a, b in zip(names, ours + [our_logits], theirs + [out.logits]):
            diff = (a.float() - b.float()).abs().nan_to_num(float("inf")).max().item()  # NaN counts as divergence
            worst[name] = max(worst.get(name, 0.0), diff)
        top1_mismatch += int((our_logits.argmax(-1) != out.logits.argmax(-1)).sum())
        # The exported model's cache: prefill half, then one token per step == one full forward.
        half = tokens.shape[1] // 2
        step = hf_model(tokens[:, :half], use_cache=True)
        decoded, cache = [step.logits], step.cache
        for t in range(half, tokens.shape[1]):
            step = hf_model(tokens[:, t:t + 1], cache=cache, use_cache=True)
            decoded.append(step.logits)
            cache = step.cache
        diff = (torch.cat(decoded, dim=1) - out.logits).abs().nan_to_num(float("inf")).max().item()
        worst["decode vs prefill"] = max(worst.get("decode vs prefill", 0.0), diff)
    def diverges(name):
        return worst[name] > tolerance or relative.get(name, 0.0) > RELATIVE_TOLERANCE

    lines = [f"  {name:>18}: max |diff| {value:.3e}"
             + (f", layer update rel. diff {relative[name]:.2e}" if name in relative else "")
             + ("  <-- diverges" if diverges(name) else "") for name, value in worst.items()]
    log("verification (native vs exported, fp32):\n" + "\n".join(lines) + f"\n  top-1 mismatches: {top1_mismatch}")
    report = {"max_abs_diff": worst, "layer_update_rel_diff": relative, "top1_mismatches": top1_mismatch,
              "tolerance": tolerance, "relative_tolerance": RELATIVE_TOLERANCE,
              "lengths": [list(t.shape) for t in inputs]}
    diverging = [name for name in worst if diverges(name)]
    if diverging or top1_mismatch:
        first = diverging[0] if diverging else "logits (top-1)"
        raise VerificationError(f"exported model differs from the checkpoint: first divergence at {first} "
                                f"(max |diff| {worst.get(first, float('nan')):.3e}, tolerance {tolerance}; layer "
                                f"update rel. diff {relative.get(first, 0.0):.2e}, tolerance {RELATIVE_TOLERANCE}); "
                                f"{top1_mismatch} top-1 mismatches")
    report["passed"] = True
    return report


def load_exported(out):
    if json.loads((Path(out) / "config.json").read_text())["model_type"] == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    from .hf import SessaForCausalLM

    return SessaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def load_reference_export(out, config):
    """A `--to reference` export as an HF model: the layer files hold the reference's names, which the
    HF layers share; lm.safetensors holds the HF names. Strict: every tensor consumed, none missing."""
    from model.reference import ROPE_BUFFER, reference_inv_freq

    from .hf import SessaForCausalLM, SessaHFConfig
    from .layout import hf_config_dict

    out = Path(out)
    hf = SessaForCausalLM(SessaHFConfig(**hf_config_dict(config, torch.float32, None))).float().eval()
    state = {}
    with safe_open(str(out / "lm.safetensors"), "pt") as f:
        state.update({k: f.get_tensor(k).float() for k in f.keys()})
    for i in range(config.num_layers):
        with safe_open(str(out / "layers" / f"{i}.safetensors"), "pt") as f:
            layer = {k: f.get_tensor(k) for k in f.keys()}
        rope = layer.pop(ROPE_BUFFER, None)
        if rope is None or not torch.equal(rope, reference_inv_freq(config.head_size)):
            raise VerificationError(f"{out}/layers/{i}.safetensors: {ROPE_BUFFER} is missing or differs from the "
                                    f"reference's 10000^(-2i/d)")
        state.update({f"model.layers.{i}.{k}": v.float() for k, v in layer.items()})
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VerificationError(f"reference export {out} does not fill the model: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
    return hf


def check_tensors(state: dict[str, torch.Tensor], out: Path, dtype) -> dict:
    """`--to safetensors`: the exported tensors are exactly `state` rounded to `dtype`."""
    out = Path(out)
    index = out / "model.safetensors.index.json"
    files = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else {k: "model.safetensors" for k in safe_open(str(out / "model.safetensors"), "pt").keys()})
    if set(files) != set(state):
        raise VerificationError(f"export {out} has tensors {sorted(set(files) - set(state))[:3]} the checkpoint lacks "
                                f"and lacks {sorted(set(state) - set(files))[:3]}")
    for name in sorted(state):
        with safe_open(str(out / files[name]), "pt") as f:
            exported = f.get_tensor(name)
        if exported.dtype != dtype or not torch.equal(exported, state[name].to(dtype)):
            raise VerificationError(f"export {out}: tensor {name} in {files[name]} differs from the checkpoint's")
    return {"tensors_equal": len(state), "passed": True}


def verify_export(reader, config, out, to: str, *, dtype=torch.float32, tokenizer=None, log=print) -> dict:
    """Check the export in `out` against the checkpoint of `reader`, read independently; raises
    VerificationError naming the first difference, returns the report."""
    state = independent_state_dict(reader)
    if to == "safetensors":
        report = check_tensors(state, out, dtype)
        log(f"verification: {report['tensors_equal']} tensors equal to the checkpoint's (read independently)")
        return report
    exported = load_exported(out) if to == "hf" else load_reference_export(out, config)
    return compare(native_model(state, config, dtype), exported, verification_inputs(config, tokenizer), log=log)
