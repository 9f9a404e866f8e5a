"""Evaluation of trained models: `python -m pretrain.evaluate` (see __main__.py), the in-training
hook `evaluate_tasks` (evaluator.py), the lm-evaluation-harness model `sessa` (harness.py) and the
paper's comparison table (table.py). Names are imported on first use, so the lm-eval start-up hook
(lm_eval_hook.py) stays light."""
_EXPORTS = {"evaluate_tasks": "evaluator", "flat_metrics": "evaluator", "load_tasks": "evaluator",
            "Task": "tasks", "TaskError": "tasks", "known_tasks": "tasks", "load_task": "tasks",
            "load_target": "targets"}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = sorted(_EXPORTS)
