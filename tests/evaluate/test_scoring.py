"""The scorer against direct forwards of the model: log-likelihoods, greedy flags, generation, and the
task metrics built on them (both architectures, in-process tiny models)."""
import math

import pytest
import torch

from data_pipeline.tasks import TaskExample, encode_prompt
from data_pipeline.tokenizer import load_tokenizer
from model.config import ModelConfig
from pretrain.evaluate.scoring import greedy_generate, score_continuations
from pretrain.evaluate.tasks import Task, file_task, position_bucket, score_task


def tiny_model(arch: str, **fields):
    """A randomly initialised model of `arch` on the `chars` vocabulary, built as the evaluator builds one."""
    from model.transformer import init_model_weights
    from pretrain.evaluate.targets import new_model

    config = ModelConfig(arch=arch, vocab_size=260, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         feedback_impl="chunked", feedback_chunk_size=8, init_scheme="reference", **fields)
    model = new_model(config, torch.device("cpu"))
    init_model_weights(model, seed=3)
    return model


@pytest.fixture(scope="module", params=["sessa", "transformer"])
def model(request):
    return tiny_model(request.param)


def direct_logprobs(model, sequence: list[int]) -> torch.Tensor:
    """log p(x_t | x_<t), t >= 1, from one unbatched forward, normalised over the real vocabulary
    (the embedding's padding rows are not tokens; an HF export strips them)."""
    tokens = torch.tensor([sequence])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens[:, :-1])[0, :, :260].double(), dim=-1)
    return logprobs.gather(-1, tokens[0, 1:, None])[:, 0]


def test_loglikelihoods_equal_a_direct_forward(model):
    gen = torch.Generator().manual_seed(0)
    requests = [(torch.randint(0, 256, (n,), generator=gen).tolist(), torch.randint(0, 256, (m,), generator=gen).tolist())
                for n, m in [(1, 1), (5, 3), (17, 1), (9, 12), (30, 2), (3, 20)]]
    scores = score_continuations(model, requests, batch_tokens=64)  # several batches, padded rows
    for (context, continuation), score in zip(requests, scores):
        expected = direct_logprobs(model, context + continuation)[-len(continuation):]
        torch.testing.assert_close(score.logprobs, expected, atol=2e-5, rtol=0)
        with torch.no_grad():
            logits = model(torch.tensor([context + continuation]))[0, :, :260]
        argmax = logits[len(context) - 1:-1].argmax(-1)
        assert score.correct.tolist() == (argmax == torch.tensor(continuation)).tolist()


def test_max_length_drops_context_from_the_left(model):
    context, continuation = list(range(10, 40)), [7, 8, 9]
    [score] = score_continuations(model, [(context, continuation)], max_length=12)
    expected = direct_logprobs(model, (context + continuation)[-13:])[-3:]
    torch.testing.assert_close(score.logprobs, expected, atol=2e-5, rtol=0)


def test_greedy_generation_is_the_argmax_chain(model):
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6], [5, 5, 5]]  # two lengths: two decoding groups
    generated = greedy_generate(model, prompts, 6)
    for prompt, new in zip(prompts, generated):
        sequence = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                sequence.append(int(model(torch.tensor([sequence]))[0, -1, :260].argmax()))
        assert new == sequence[len(prompt):]
    # eos cuts the continuation before it
    first = generated[0][2]
    [cut] = greedy_generate(model, prompts[:1], 6, eos_id=first)
    assert cut == generated[0][: generated[0].index(first)]


def test_task_metrics_from_the_scores(model):
    tok = load_tokenizer("chars")
    examples = [TaskExample("abc", "x", "f:2", fields={"lag": "1"}), TaskExample("abd", "y", "f:3", fields={"lag": "2"}),
                TaskExample("abe", "x", "f:4", fields={"lag": "1"}), TaskExample("abf", "y", "f:5", fields={"lag": "2"})]
    task = file_task("t", examples, separator="<|sep|>")
    assert task.kind == "choice" and task.choices == ["x", "y"] and task.bucket_fields == ("lag",)
    result = score_task(model, tok, task).result()
    predicted = []
    for e in examples:
        prompt = encode_prompt(tok, e.prompt, "<|sep|>").tolist()
        lls = {c: float(direct_logprobs(model, prompt + tok.encode(c) + [tok.eot_id])[-2:].sum()) for c in ("x", "y")}
        predicted.append(max(lls, key=lls.get))
    correct = [p == e.answer for p, e in zip(predicted, examples)]
    assert result["accuracy"] == pytest.approx(sum(correct) / 4) and result["count"] == 4
    assert result["buckets"]["lag"]["1"]["accuracy"] == pytest.approx((correct[0] + correct[2]) / 2)

    generate = Task("g", "generate", examples[:2], separator="<|sep|>", bucket_fields=("lag",))
    result = score_task(model, tok, generate).result()
    tokens_right, matches = 0, 0
    for e in examples[:2]:
        prompt = encode_prompt(tok, e.prompt, "<|sep|>").tolist()
        answer = tok.encode(e.answer)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer]))[0, :, :260]
        tokens_right += int(logits[len(prompt) - 1:-1].argmax(-1).eq(torch.tensor(answer)).sum())
        [new] = greedy_generate(model, [prompt], len(answer) + 1, eos_id=tok.eot_id)
        matches += tok.decode(new) == e.answer
    assert result["token_accuracy"] == pytest.approx(tokens_right / 2)
    assert result["exact_match"] == pytest.approx(matches / 2)


def test_loss_task_buckets_by_position(model):
    tok = load_tokenizer("chars")
    text = "".join(chr(97 + (i * 7) % 26) for i in range(1100))
    result = score_task(model, tok, Task("docs", "loss", [text, text[:50]])).result()
    nll = torch.cat([-direct_logprobs(model, tok.encode(t)) for t in (text, text[:50])])
    assert result["loss"] == pytest.approx(float(nll.mean()), abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    long = -direct_logprobs(model, tok.encode(text))
    buckets = result["buckets"]["position"]
    assert set(buckets) == {"0-1k", "1k-2k"} and buckets["1k-2k"]["count"] == 1
    assert buckets["1k-2k"]["loss"] == pytest.approx(float(long[1024:].mean()), abs=1e-5)
    assert position_bucket(0) == "0-1k" and position_bucket(2047) == "1k-2k" and position_bucket(5000) == "4k-8k"
