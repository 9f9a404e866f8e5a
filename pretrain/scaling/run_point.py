"""Train one sweep point through the real trainer: `python -m pretrain.scaling.run_point --config X.yaml`.

Same arguments and exit codes as `python -m pretrain`. Bridge: until pretrain/trainer.py builds its
model chunks through `model.transformer.build_model` (either architecture) and counts FLOPs with
the ledger, this entry point routes those five names there, so `model.arch: transformer` points
train with the same trainer, data, schedule and checkpoints. It changes nothing once the trainer
imports `build_model` itself.
"""
import sys

from pretrain.__main__ import main


def _route_trainer_to_both_architectures() -> None:
    import pretrain.trainer as trainer
    from model.transformer import build_model, init_model_weights, megatron_config_for

    from .flops import count_params, flops_per_token

    if getattr(trainer, "build_model", None) is not None:
        return  # the trainer is wired already
    trainer.SessaLM = build_model
    trainer.megatron_config = megatron_config_for
    trainer.init_weights = init_model_weights
    trainer.count_parameters = count_params
    trainer.flops_per_token = flops_per_token


if __name__ == "__main__":
    _route_trainer_to_both_architectures()
    sys.exit(main())
