"""Run tasks on a model: the in-training hook and the core of `python -m pretrain.evaluate`.

    from pretrain.evaluate import evaluate_tasks, load_tasks
    tasks = load_tasks("two_style,test.tsv", separator="\\n")      # once
    results = evaluate_tasks(model, tokenizer, tasks, dp_rank=r, dp_size=n, group=dp_group)
    # {task: {"accuracy": ..., "count": ..., "buckets": {...}}} identical on every rank

Each data-parallel rank scores examples[rank::size]; the per-bucket sums are gathered over `group`
(when torch.distributed is initialised) so every rank returns the same numbers, equal to a
single-process evaluation. The model must be whole on this rank apart from tensor-parallel
sharding (pipeline stages cannot decode); it is put in eval mode and restored afterwards.
"""
import torch
import torch.distributed as dist

from .tasks import Task, Tally, load_task, score_task


def load_tasks(specs, **options) -> list[Task]:
    """'a,b,file.tsv' or a list of names/paths/Tasks -> Tasks (options as `tasks.load_task`)."""
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    return [s if isinstance(s, Task) else load_task(s, **options) for s in specs]


def evaluate_tasks(model, tokenizer, tasks, *, dp_rank: int = 0, dp_size: int = 1, group=None,
                   max_length: int | None = None, progress: bool = False) -> dict:
    """Score this rank's share of every task and combine the shares over the data-parallel group."""
    tasks = load_tasks(tasks)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            share = task.examples[dp_rank::dp_size]
            bar = _progress_bar(task, len(share)) if progress else None
            try:
                tally = score_task(model, tokenizer, task, share, max_length=max_length, progress=bar)
            finally:
                if bar is not None:
                    bar.close()
            if dp_size > 1 and dist.is_initialized():
                gathered = [None] * dist.get_world_size(group)
                dist.all_gather_object(gathered, tally.sums, group=group)
                tally = Tally()
                for sums in gathered:
                    part = Tally()
                    part.sums = sums
                    tally.merge(part)
            results[task.name] = tally.result()
    finally:
        model.train(was_training)
    return results


def _progress_bar(task: Task, n: int):
    from tqdm import tqdm

    per_example = len(task.choices) if task.kind == "choice" else 1
    return tqdm(total=n * per_example, desc=task.name, unit="seq", dynamic_ncols=True, leave=False)


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """{task: {metric: v, "buckets": {field: {value: {metric: v}}}}} -> {"eval/task/metric": v,
    "eval/task/field=value/metric": v} (numbers only), for metrics.jsonl and wandb."""
    flat = {}
    for task, metrics in results.items():
        for name, value in metrics.items():
            if name == "buckets":
                for field, values in value.items():
                    for bucket, bucket_metrics in values.items():
                        for metric, v in bucket_metrics.items():
                            flat[f"{prefix}/{task}/{field}={bucket}/{metric}"] = v
            else:
                flat[f"{prefix}/{task}/{name}"] = value
    return flat


@torch.no_grad()
def evaluate_target(target, tasks, *, max_length: int | None = None, progress: bool = True) -> dict:
    """All tasks on a loaded `targets.Target` in this process. No truncation by default: test
    lengths beyond the training length are the point of the long-range tasks."""
    return evaluate_tasks(target.model, target.tokenizer, tasks, max_length=max_length, progress=progress)
