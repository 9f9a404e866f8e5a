"""Verification of an export: our native model and the exported HF model, both in fp32, on fixed text
and random ids at lengths that cross the feedback chunk size.

Passes when max |Δlogit| <= 1e-4, top-1 is identical everywhere, and the exported model's prefill
logits equal its token-by-token decoding with the cache. The report lists every layer's max
|Δhidden| (embedding output, each layer, final logits) and names the first layer that diverges.
"""
import dataclasses

import torch

from .readers import CheckpointError

TOLERANCE = 1e-4
# A small or briefly trained model's layers add tiny updates to the residual stream, which an
# absolute tolerance cannot see; each layer's update (output - input) must also agree relatively.
RELATIVE_TOLERANCE = 1e-3


class VerificationError(CheckpointError):
    pass


def native_model(reader, config, dtype=torch.float32):
    """Our SessaLM (one process) with the checkpoint's weights; rounded through `dtype` if not fp32."""
    from model.lm import SessaLM
    from model.parallel import ensure_model_parallel

    from . import layout

    ensure_model_parallel()
    cfg = dataclasses.replace(config, dtype="float32", feedback_impl="chunked")
    model = SessaLM(cfg).eval()
    state = reader.read(layout.native_names(config))
    state = {k: v.to(dtype).float() for k, v in state.items()}
    model.load_global_state_dict(state)
    return model


@torch.no_grad()
def native_hidden_states(model, tokens):
    """tokens [B, T] -> (embedding output, each layer's output) as [B, T, D], and logits [B, T, V]."""
    hidden = model.embedding(tokens).transpose(0, 1)
    states = [hidden.transpose(0, 1)]
    for layer in model.layers:
        hidden, _ = layer(hidden)
        states.append(hidden.transpose(0, 1))
    logits, _ = model.output_layer(model.final_norm(hidden), weight=model.output_weight())
    return states, logits.transpose(0, 1)[..., : model.sessa.vocab_size]


def verification_inputs(config, tokenizer=None, seed: int = 0) -> list[torch.Tensor]:
    C = config.feedback_chunk_size
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, config.vocab_size, (2, 2 * C + 3), generator=gen),
              torch.randint(0, config.vocab_size, (1, C + 1), generator=gen)]
    if tokenizer is not None:
        from .export import TOKENIZER_SAMPLE

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
    from .hf import SessaForCausalLM

    return SessaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def verify_export(reader, config, out, *, dtype=torch.float32, tokenizer=None, log=print) -> dict:
    native = native_model(reader, config, dtype)
    return compare(native, load_exported(out), verification_inputs(config, tokenizer), log=log)
