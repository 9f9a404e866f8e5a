"""Pretraining loop for Sessa models on megatron-core (see pretrain/__main__.py for usage)."""
