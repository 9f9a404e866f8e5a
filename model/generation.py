"""Incremental decoding (SESSA.md §4): prefill once, then one token per step from the caches."""
import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from .layer import LayerCache


def empty_caches(model, batch_size: int) -> list:
    """One zero-length cache per block of `model` (a SessaLM), on its device and dtype: a LayerCache
    per Sessa block, a KVCache per attention block, a MambaCache (convolution inputs and scan state)
    per Mamba-2 block, None per MLP block (model/blocks.py, model/mamba.py)."""
    weight = next(model.parameters())
    caches = []
    for layer in model.layers:
        if hasattr(layer, "empty_cache"):  # the hybrid blocks
            caches.append(layer.empty_cache(batch_size, weight.dtype, weight.device))
            continue
        mixer = layer.mixer
        d = model.sessa.head_size

        def empty(*shape):
            return torch.empty(*shape, dtype=weight.dtype, device=weight.device)

        caches.append(LayerCache(
            keys=empty(batch_size, mixer.local_kv_heads, 0, d),
            values=empty(batch_size, mixer.local_kv_heads, 0, d),
            feedback_keys=empty(batch_size, 0, model.sessa.hidden_size) if model.sessa.feedback else None,
            feedback_states=empty(batch_size, 0, mixer.local_heads * d) if model.sessa.feedback else None,
        ))
    return caches


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]; temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already cover top_p (the first always stays).
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """prompt [B, T0] -> [B, T0 + n] with n <= max_new_tokens (stops early once all rows hit eos_id)."""
    vocab_size = model.sessa.vocab_size
    if model.sessa.arch == "transformer":  # TransformerLM: megatron's key/value cache, sized up front
        caches = model.empty_caches(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    else:
        caches = empty_caches(model, prompt.shape[0])
    tokens = prompt
    step_input = prompt
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits, caches = model(step_input, caches=caches)
        last = gather_from_tensor_model_parallel_region(logits[:, -1])[:, :vocab_size]  # drop vocab padding
        next_token = sample_next_token(last, temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_token = next_token.masked_fill(finished, eos_id)
            finished |= next_token == eos_id
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        step_input = next_token[:, None]
        if eos_id is not None and bool(finished.all()):
            break
    return tokens
