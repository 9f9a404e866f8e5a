"""`python -m pretrain` whose in-training task evaluation raises (a fault injected into the real
evaluator's entry point), for tests/pretrain/test_task_training.py: training must go on.

    python tests/pretrain/eval_failure_run.py --config recipe.yaml [--a.b v ...]
"""
import sys

import pretrain.__main__
import pretrain.evaluate


def _broken(*args, **kwargs):
    raise RuntimeError("injected evaluation failure")


if __name__ == "__main__":
    pretrain.evaluate.evaluate_tasks = _broken
    sys.exit(pretrain.__main__.main(sys.argv[1:]))
