"""Evaluation tasks: the built-in registry, task files, and how each kind of task is scored.

A task is one of three kinds:
  - "choice": classification over a closed label set. Every candidate answer is scored by its
    log-likelihood after `prompt + separator` (candidate + end-of-text, exactly the tokens the
    model was trained to produce), the best one is the prediction: `accuracy`.
  - "generate": open answers. Greedy decoding after `prompt + separator` up to end-of-text:
    `exact_match` (decoded text == answer); teacher-forced `token_accuracy` (share of answer tokens
    whose argmax prediction is right, given the true prefix).
  - "loss": documents scored token by token: `loss` and `perplexity`, overall and by position
    bucket (0-1k, 1k-2k, 2k-4k, ...), the long-context diagnostic.

Task files are read by `data_pipeline.tasks.read_task_file` (TSV/CSV with a header row, JSONL); a
file is a "choice" task when its answers form a small closed set (`closed_label_set`) or a
`choices` file is given, else "generate". Examples' extra fields named in `bucket_fields`
(default: lag, length, position when present) split every metric into buckets.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.tasks import TaskExample, closed_label_set, encode_prompt, read_task_file

from .scoring import greedy_generate, score_continuations

DEFAULT_BUCKET_FIELDS = ("lag", "length", "position")
DEFAULT_SEPARATOR = "\n"  # data_pipeline's default (TaskSpec.separator)
POSITION_EDGES = (0, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class TaskError(ValueError):
    """A task that cannot be built; the message names the task or file and what to fix."""


@dataclass
class Task:
    name: str
    kind: str  # "choice" | "generate" | "loss" (module docstring)
    examples: list = field(default_factory=list)  # TaskExample (choice, generate) or document strings (loss)
    choices: list[str] | None = None  # the label set of a "choice" task
    separator: str = DEFAULT_SEPARATOR
    bucket_fields: tuple[str, ...] = ()
    binned: tuple[str, ...] = ()  # bucket fields with many numeric values: power-of-two ranges


# --- the registry -------------------------------------------------------------------------------
def _pydocs(n: int = 16) -> Task:
    """Position-bucketed loss on the last `n` documents of the bundled Python docs corpus (held out
    only for runs that did not train on the built-in corpus)."""
    from data_pipeline.readers import BUILTIN_CORPUS, iter_documents

    docs = [d.text for d in iter_documents(str(BUILTIN_CORPUS))]
    return Task("pydocs", "loss", docs[-n:])


BUILTIN = {"pydocs": _pydocs}
BUILTIN_TEST_EXAMPLES = 200  # test examples drawn for a synthetic task named on the command line


def known_tasks() -> list[str]:
    from data_pipeline.synthetic import GENERATORS

    return sorted(set(BUILTIN) | set(GENERATORS))


def synthetic_task(name: str, *, n: int = BUILTIN_TEST_EXAMPLES, trained_sources=(),
                   separator: str = DEFAULT_SEPARATOR) -> Task:
    """The test split of a synthetic task (data_pipeline.synthetic). When the target was trained on
    that task (its data manifest's sources name it), the same seed and knobs are used, so the
    examples are the held-out test split of its own data; else the defaults with seed 0."""
    from data_pipeline.synthetic import generate, make_generator

    seed, knobs = 0, {}
    for source in trained_sources:
        if source.get("synthetic") == name:
            seed = source.get("seed", 0)
            knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in source.get("knobs", {}).items()}
    examples = []
    for i, row in enumerate(generate(name, 0, seed, n_val=0, n_test=n, **knobs)):
        prompt, answer, split = row.pop("prompt"), row.pop("answer"), row.pop("split")
        examples.append(TaskExample(prompt, answer, f"{name} (seed {seed}) test example {i}", split, row))
    labels = getattr(make_generator(name, **knobs), "labels", None)  # classification tasks know their label set
    return file_task(name, examples, choices=labels() if labels else None, separator=separator)


# --- task files ----------------------------------------------------------------------------------
def read_choices(path) -> list[str]:
    """A label file: one label per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"choices file {path} does not exist")
    labels = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) < 2:
        raise TaskError(f"choices file {path} has {len(labels)} label(s); a classification needs at least 2")
    return labels


def file_task(name: str, examples: list[TaskExample], *, choices: list[str] | None = None,
              separator: str = DEFAULT_SEPARATOR, bucket_fields=None) -> Task:
    """Examples -> a "choice" task (closed label set or `choices`) or a "generate" task."""
    if not examples:
        raise TaskError(f"task {name} has no examples")
    labels = list(choices) if choices is not None else closed_label_set(e.answer for e in examples)
    if labels is not None:
        allowed = set(labels)
        for example in examples:
            if example.answer not in allowed:
                raise TaskError(f"{example.where}: answer {example.answer!r} is not in the label set "
                                f"{sorted(allowed)[:20]}{' ...' if len(allowed) > 20 else ''}; fix the row or "
                                f"the --choices file")
    if bucket_fields is None:
        bucket_fields = tuple(f for f in DEFAULT_BUCKET_FIELDS if f in examples[0].fields)
    else:
        for f in bucket_fields:
            if f not in examples[0].fields:
                raise TaskError(f"{examples[0].where}: no field {f!r} to bucket by "
                                f"(fields: {sorted(examples[0].fields)})")
    binned = tuple(f for f in bucket_fields if _many_numbers([e.fields.get(f) for e in examples]))
    return Task(name, "choice" if labels is not None else "generate", examples, labels, separator,
                tuple(bucket_fields), binned)


MAX_EXACT_BUCKETS = 8


def _many_numbers(values) -> bool:
    try:
        numbers = {float(v) for v in values}
    except (TypeError, ValueError):
        return False
    return len(numbers) > MAX_EXACT_BUCKETS


def range_bucket(value) -> str:
    """A number -> its power-of-two range, '0', '1', '2-3', '4-7', ..., '256-511'."""
    n = int(float(value))
    if n < 2:
        return str(n)
    lo = 1 << (n.bit_length() - 1)
    return f"{lo}-{2 * lo - 1}"


def load_task(spec: str, *, prompt_field: str = "prompt", answer_field: str = "answer",
              text_field: str | None = None, choices=None, separator: str | None = None,
              split: str | None = None, split_field: str | None = None, bucket_fields=None,
              limit: int | None = None, trained_sources=()) -> Task:
    """A built-in name or a task file path -> Task.

    With `text_field` the file holds documents (JSONL, that field) and the task is "loss".
    `split` keeps only rows of that split (needs `split_field`). `trained_sources`: the training
    data manifest's sources (a synthetic task reuses the seed and knobs it was trained with)."""
    if spec in BUILTIN:
        task = BUILTIN[spec]()
    elif not _looks_like_file(spec) and spec in known_tasks():
        task = synthetic_task(spec, n=limit or BUILTIN_TEST_EXAMPLES, trained_sources=trained_sources,
                              separator=separator if separator is not None else DEFAULT_SEPARATOR)
    elif _looks_like_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise TaskError(f"task file {path} does not exist")
        if text_field is not None:
            from data_pipeline.readers import iter_documents

            task = Task(path.stem, "loss", [d.text for d in iter_documents(str(path), text_field)])
        else:
            try:
                examples = read_task_file(path, prompt_field, answer_field, split_field)
            except DataError as err:
                raise TaskError(str(err)) from err
            if split is not None:
                examples = [e for e in examples if e.split == split]
            labels = read_choices(choices) if isinstance(choices, (str, Path)) else choices
            task = file_task(path.stem, examples, choices=labels, separator=separator or DEFAULT_SEPARATOR,
                             bucket_fields=bucket_fields)
    else:
        raise TaskError(f"unknown task {spec!r}: built-in tasks are {', '.join(known_tasks())}; or pass a task "
                        f"file (.tsv, .csv, .jsonl)")
    if limit is not None:
        task.examples = task.examples[:limit]
    return task


def _looks_like_file(spec: str) -> bool:
    return "/" in spec or Path(spec).suffix.lower() in (".tsv", ".csv", ".jsonl", ".json", ".ndjson", ".gz", ".xz",
                                                        ".bz2", ".txt")


# --- scoring --------------------------------------------------------------------------------------
class Tally:
    """Sums and counts per (bucket, metric), mergeable across data-parallel ranks."""

    def __init__(self):
        self.sums: dict[tuple[str, str, str], list[float]] = {}  # (field, value, metric) -> [sum, count]

    def add(self, metric: str, value: float, count: float = 1, buckets=(), *, overall: bool = True) -> None:
        """Add `value` over `count` items to the metric, overall and in each (field, value) bucket."""
        for key in [("", "", metric)] * overall + [(f, v, metric) for f, v in buckets]:
            entry = self.sums.setdefault(key, [0.0, 0.0])
            entry[0] += value
            entry[1] += count

    def merge(self, other: "Tally") -> None:
        for key, (s, c) in other.sums.items():
            entry = self.sums.setdefault(key, [0.0, 0.0])
            entry[0] += s
            entry[1] += c

    def result(self) -> dict:
        """{metric: mean, "count": examples, "buckets": {field: {value: {metric: mean, "count": n}}}}"""
        out, buckets = {}, {}
        for (f, v, metric), (s, c) in sorted(self.sums.items(), key=lambda kv: _bucket_order(kv[0])):
            target = out if not f else buckets.setdefault(f, {}).setdefault(v, {})
            if metric == "count":
                target["count"] = int(s)
                continue
            mean = s / c if c else float("nan")
            target[metric] = mean
            if metric == "loss":
                target["perplexity"] = math.exp(mean) if mean < 700 else float("inf")
        if buckets:
            out["buckets"] = buckets
        return out


def _bucket_order(key):
    f, v, metric = key
    try:
        number = float(v.split("-")[0].rstrip("k")) * (1024 if v.split("-")[0].endswith("k") else 1)
    except ValueError:
        number = math.inf
    return f, number, v, metric


def position_bucket(position: int, edges=POSITION_EDGES) -> str:
    """0-based token position -> '0-1k', '1k-2k', '2k-4k', ... (the last bucket is open: '128k+')."""
    def name(n):
        return f"{n // 1024}k" if n else "0"

    for lo, hi in zip(edges, edges[1:]):
        if position < hi:
            return f"{name(lo)}-{name(hi)}"
    return f"{name(edges[-1])}+"


def _buckets(example, task: Task):
    return [(f, range_bucket(example.fields.get(f)) if f in task.binned else str(example.fields.get(f)))
            for f in task.bucket_fields]


def score_task(model, tokenizer, task: Task, examples=None, *, max_length: int | None = None,
               progress=None) -> Tally:
    """Score `examples` (default: all of the task's) on a model held by this process."""
    examples = task.examples if examples is None else examples
    tally = Tally()
    if not examples:
        return tally
    eot = tokenizer.eot_id
    if task.kind == "loss":
        docs = [tokenizer.encode(text) for text in examples]
        docs = [d[:max_length + 1] if max_length else d for d in docs]
        docs = [d for d in docs if len(d) > 1]
        scores = score_continuations(model, [(d[:1], d[1:]) for d in docs], progress=progress)
        for score in scores:
            nll, correct = -score.logprobs, score.correct.double()  # target t + 1 is predicted at position t
            tally.add("count", 1, 0)
            tally.add("loss", float(nll.sum()), len(nll))
            tally.add("token_accuracy", float(correct.sum()), len(nll))
            for lo, hi in zip(POSITION_EDGES, POSITION_EDGES[1:] + (len(nll),)):
                if lo >= len(nll):
                    break
                bucket = [("position", position_bucket(lo))]
                tally.add("count", 1, 0, bucket, overall=False)
                tally.add("loss", float(nll[lo:hi].sum()), len(nll[lo:hi]), bucket, overall=False)
                tally.add("token_accuracy", float(correct[lo:hi].sum()), len(nll[lo:hi]), bucket, overall=False)
        return tally
    prompts = [encode_prompt(tokenizer, e.prompt, task.separator).tolist() for e in examples]
    if task.kind == "choice":
        candidates = [tokenizer.encode(c) + [eot] for c in task.choices]
        requests = [(p, c) for p in prompts for c in candidates]
        scores = score_continuations(model, requests, max_length=max_length, progress=progress)
        k = len(candidates)
        for i, example in enumerate(examples):
            lls = [s.loglikelihood for s in scores[i * k:(i + 1) * k]]
            predicted = task.choices[max(range(k), key=lls.__getitem__)]
            buckets = _buckets(example, task)
            tally.add("count", 1, 0, buckets)
            tally.add("accuracy", float(predicted == example.answer), 1, buckets)
        return tally
    answers = [tokenizer.encode(e.answer) for e in examples]
    forced = score_continuations(model, [(p, a) for p, a in zip(prompts, answers)], max_length=max_length,
                                 progress=progress)
    generated = greedy_generate(model, prompts, max(len(a) for a in answers) + 1, eos_id=eot)
    for example, score, new in zip(examples, forced, generated):
        buckets = _buckets(example, task)
        tally.add("count", 1, 0, buckets)
        tally.add("exact_match", float(tokenizer.decode(new) == example.answer), 1, buckets)
        tally.add("token_accuracy", float(score.correct.sum()), len(score.correct), buckets)
    return tally
