"""The "generate" metrics of pretrain/evaluate/tasks.py computed by hand, with plain full forwards of
the model (no decoding cache, no evaluator code), to check what the evaluator reports."""
import torch

from data_pipeline.tasks import encode_prompt


@torch.no_grad()
def generate_metrics(model, vocab_size: int, tokenizer, examples, separator: str) -> dict:
    """{"count", "exact_match", "token_accuracy"} as the evaluator defines them: greedy decoding after
    prompt + separator for (longest answer + 1) tokens, cut at end-of-text, whose text must equal the
    answer; the share of answer tokens that are the argmax given the true prefix, pooled over tokens."""
    model.eval()
    eot = tokenizer.eot_id
    prompts = [encode_prompt(tokenizer, e.prompt, separator).tolist() for e in examples]
    answers = [tokenizer.encode(e.answer) for e in examples]
    budget = max(len(a) for a in answers) + 1

    def argmax_next(rows: list[list[int]]) -> list[int]:  # rows of one length: one batched forward
        logits = model(torch.tensor(rows))[:, -1, :vocab_size]
        return logits.argmax(-1).tolist()

    matches, right, total = 0, 0, 0
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for members in by_length.values():
        rows = [list(prompts[i]) for i in members]
        for _ in range(budget):
            for row, token in zip(rows, argmax_next(rows)):
                row.append(token)
        for i, row in zip(members, rows):
            new = row[len(prompts[i]):]
            new = new[: new.index(eot)] if eot in new else new
            matches += tokenizer.decode(new) == examples[i].answer
    for prompt, answer in zip(prompts, answers):
        logits = model(torch.tensor([prompt + answer]))[0, len(prompt) - 1:-1, :vocab_size]
        right += int((logits.argmax(-1) == torch.tensor(answer)).sum())
        total += len(answer)
    return {"count": len(examples), "exact_match": matches / len(examples), "token_accuracy": right / total}
