"""`python -m pretrain` with a NaN injected into the model's output at chosen training steps (a
forward hook on the real model), for tests/pretrain/test_nonfinite.py.

    python tests/pretrain/nonfinite_run.py 3,4 --config recipe.yaml [--a.b v ...]    # exits as pretrain does
"""
import sys

import torch

import pretrain.__main__
import pretrain.loop


def main(steps: set[int], argv: list[str]) -> int:
    build = pretrain.loop.Trainer.__init__

    def init_with_fault(trainer, config):
        build(trainer, config)

        def poison(module, inputs, output):
            step = trainer.state.step + 1  # the step being computed
            return output * float("nan") if torch.is_grad_enabled() and step in steps else output

        trainer.engine.chunks[-1].register_forward_hook(poison)

    pretrain.loop.Trainer.__init__ = init_with_fault
    return pretrain.__main__.main(argv)


if __name__ == "__main__":
    sys.exit(main({int(s) for s in sys.argv[1].split(",")}, sys.argv[2:]))
