"""Train with the DeepSpeed engine, then write the live model's weights (gathered under ZeRO-3) to
OUT on rank 0, for comparison with the consolidated checkpoint (tests/pretrain/test_deepspeed.py).

    torchrun --nproc-per-node 2 tests/pretrain/ds_live_weights.py OUT --config recipe.yaml [--a.b v ...]
"""
import sys

import deepspeed
import torch

from pretrain.config import load_config
from pretrain.loop import Trainer


def main(out: str, argv: list[str]) -> None:
    assert argv[0] == "--config", "usage: OUT --config recipe.yaml [overrides]"
    config = load_config(argv[1], argv[2:] + ["--engine", "deepspeed"])
    trainer = Trainer(config)
    try:
        trainer.train()
        model = trainer.engine.chunks[0]
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=config.deepspeed.stage == 3):
            if trainer.env.rank == 0:
                torch.save({name: param.detach().clone() for name, param in model.named_parameters()}, out)
    finally:
        trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
