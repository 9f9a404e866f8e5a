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

    def argmax(rows: list[list[int]]) -> torch.Tensor:  # rows of one length: one batched forward
        return model(torch.tensor(rows))[:, :, :vocab_size].argmax(-1)

    def same_length(sequences) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for i, sequence in enumerate(sequences):
            groups.setdefault(len(sequence), []).append(i)
        return list(groups.values())

    matches, right = 0, 0
    for members in same_length(prompts):
        rows = [list(prompts[i]) for i in members]
        for _ in range(budget):
            for row, token in zip(rows, argmax(rows)[:, -1].tolist()):
                row.append(token)
        for i, row in zip(members, rows):
            new = row[len(prompts[i]):]
            new = new[: new.index(eot)] if eot in new else new
            matches += tokenizer.decode(new) == examples[i].answer
    forced = [p + a for p, a in zip(prompts, answers)]
    for members in same_length(forced):
        predicted = argmax([forced[i] for i in members])
        for row, i in enumerate(members):
            start = len(prompts[i])
            right += int((predicted[row, start - 1:-1] == torch.tensor(answers[i])).sum())
    total = sum(len(a) for a in answers)
    return {"count": len(examples), "exact_match": matches / len(examples), "token_accuracy": right / total}
