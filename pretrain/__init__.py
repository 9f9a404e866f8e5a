"""Pretraining loop for Sessa models on megatron-core (see pretrain/__main__.py for usage)."""
from model.dependency_warnings import filter_known_dependency_warnings

filter_known_dependency_warnings()  # every entry point (training, evaluation, scaling) imports megatron-core
