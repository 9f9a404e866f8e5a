"""Scaling-law harness: FLOP ledger, sweep planner, launch, collect, fits, plots, Sessa vs Transformer.

    python -m pretrain.scaling plan|launch|collect|fit|plot|compare --help
"""
