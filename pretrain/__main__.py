"""Pretrain a Sessa model.

    python -m pretrain --config configs/tiny.yaml [--section.field value ...]       # one process
    torchrun --nproc-per-node 8 -m pretrain --config configs/1.3b.yaml              # one node
    torchrun --nproc-per-node 8 -m pretrain --config configs/1.3b.yaml --engine deepspeed --deepspeed.stage 2
Restarting the same command resumes from the run's `latest` checkpoint.
"""
import argparse
import sys

from .config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from data_pipeline.mixture import SourceExhausted

    from .loop import NonFiniteError, Trainer  # heavy imports after the config is known to be valid
    from .runlock import RunLockedError

    trainer = None
    try:
        trainer = Trainer(config)
        trainer.train()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RunLockedError as err:
        print(f"run locked: {err}", file=sys.stderr)
        return 4  # launch/local.sh and pretrain.sbatch use the same code
    except NonFiniteError as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 5
    except SourceExhausted as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 6
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
