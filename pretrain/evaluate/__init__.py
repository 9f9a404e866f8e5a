"""Evaluation of trained models: `python -m pretrain.evaluate` (see __main__.py), the in-training
hook `evaluate_tasks`, the lm-evaluation-harness model `sessa` (harness.py) and the paper's table."""
from .evaluator import evaluate_tasks, flat_metrics, load_tasks
from .tasks import Task, TaskError, known_tasks, load_task

__all__ = ["Task", "TaskError", "evaluate_tasks", "flat_metrics", "known_tasks", "load_task", "load_tasks"]
