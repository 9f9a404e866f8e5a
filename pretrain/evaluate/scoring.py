"""Scoring primitives on a whole model held by this process (SessaLM or TransformerLM; tensor-parallel
shards are fine: logits are gathered over the tensor-parallel group).

    scores = score_continuations(model, [(context_ids, continuation_ids), ...])
    scores[i].logprobs   # log p(continuation token | everything before it), one per token
    scores[i].correct    # whether the greedy (argmax) token equals it, one per token
    new = greedy_generate(model, [prompt_ids, ...], max_new_tokens=8, eos_id=eot)

Sequences are batched by length under a token budget and right-padded: the models are causal, so
padding after a sequence never changes its scores.
"""
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from model.generation import generate

BATCH_TOKENS = 8192  # padded tokens per forward pass on a CPU
# On a GPU a forward of 8192 tokens of a small model is all launch overhead: a batch may hold up to
# this many logits (2^26: 256 MiB in fp32, e.g. 65,536 tokens of the 260-symbol chars vocabulary).
GPU_BATCH_LOGITS, GPU_BATCH_TOKENS_MAX = 2**26, 65536


def batch_tokens_for(model) -> int:
    """Padded tokens per forward pass: BATCH_TOKENS on a CPU; on a GPU as many as keep the logits
    under GPU_BATCH_LOGITS (at least BATCH_TOKENS, at most GPU_BATCH_TOKENS_MAX)."""
    if model_device(model).type == "cpu":
        return BATCH_TOKENS
    return min(GPU_BATCH_TOKENS_MAX, max(BATCH_TOKENS, GPU_BATCH_LOGITS // vocab_size(model)))


@dataclass
class Score:
    logprobs: torch.Tensor  # [n] float64, one per continuation token
    correct: torch.Tensor  # [n] bool: argmax prediction == the token

    @property
    def loglikelihood(self) -> float:
        return float(self.logprobs.sum())

    @property
    def greedy(self) -> bool:
        return bool(self.correct.all())


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def vocab_size(model) -> int:
    return model.sessa.vocab_size


@torch.no_grad()
def log_softmax_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, T] -> log-probabilities [B, T, V] (fp32, real vocabulary, all tensor-parallel shards)."""
    logits = model(tokens)
    logits = gather_from_tensor_model_parallel_region(logits)[..., : vocab_size(model)]
    return torch.log_softmax(logits.float(), dim=-1)


def _batches(order: list[int], lengths: list[int], batch_tokens: int):
    """Indices in `order` (longest first) grouped so that rows x longest length <= batch_tokens."""
    batch = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def score_continuations(model, requests, *, max_length: int | None = None, batch_tokens: int | None = None,
                        progress=None) -> list[Score]:
    """requests: (context_ids, continuation_ids) pairs, context non-empty -> one Score per request.

    With `max_length`, context tokens are dropped from the left so the model sees at most
    max_length tokens (the continuation is always scored in full). batch_tokens: padded tokens per
    forward pass (default batch_tokens_for(model))."""
    device = model_device(model)
    batch_tokens = batch_tokens or batch_tokens_for(model)
    inputs, n_cont = [], []
    for context, continuation in requests:
        if not len(context) or not len(continuation):
            raise ValueError("score_continuations needs a non-empty context and continuation for every request")
        sequence = list(context) + list(continuation)
        if max_length is not None:
            sequence = sequence[-(max_length + 1):]
        inputs.append(sequence)
        n_cont.append(len(continuation))
    lengths = [len(s) - 1 for s in inputs]
    order = sorted(range(len(inputs)), key=lambda i: -lengths[i])
    scores: list[Score | None] = [None] * len(inputs)
    for batch in _batches(order, lengths, batch_tokens):
        width = lengths[batch[0]]
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, : lengths[i]] = torch.tensor(inputs[i][:-1])
        logprobs = log_softmax_logits(model, tokens.to(device))
        for row, i in enumerate(batch):
            n, end = n_cont[i], lengths[i]
            targets = torch.tensor(inputs[i][-n:], device=device)
            rows = logprobs[row, end - n: end]
            scores[i] = Score(rows.gather(-1, targets[:, None])[:, 0].double().cpu(),
                              (rows.argmax(-1) == targets).cpu())
        if progress is not None:
            progress.update(len(batch))
    return scores


@torch.no_grad()
def greedy_generate(model, prompts, max_new_tokens: int, *, eos_id: int | None = None, batch_size: int = 32,
                    progress=None) -> list[list[int]]:
    """Greedy continuation of each prompt (ids), at most max_new_tokens, cut before the first eos_id.

    Prompts of equal length decode together, from the decoding caches of `model.generation`
    (Sessa's per-layer caches, megatron's key/value cache for the Transformer arm)."""
    device = model_device(model)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    out: list[list[int] | None] = [None] * len(prompts)
    for _, members in sorted(by_length.items()):
        for start in range(0, len(members), batch_size):
            batch = members[start: start + batch_size]
            prompt = torch.tensor([list(prompts[i]) for i in batch], dtype=torch.long, device=device)
            tokens = generate(model, prompt, max_new_tokens, temperature=0, eos_id=eos_id)
            for row, i in enumerate(batch):
                new = tokens[row, prompt.shape[1]:].tolist()
                out[i] = new[: new.index(eos_id)] if eos_id in new else new
            if progress is not None:
                progress.update(len(batch))
    return out

