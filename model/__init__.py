"""The Sessa language model (SESSA.md), on megatron-core tensor-parallel layers."""
from .dependency_warnings import filter_known_dependency_warnings

filter_known_dependency_warnings()  # before megatron-core is first imported

from .config import ModelConfig, SessaConfig
from .init import init_weights
from .layer import LayerCache, SessaLayer, SessaMixer, SessaSubmodules
from .lm import SessaLM, count_parameters
from .parallel import ensure_model_parallel, megatron_config

__all__ = [
    "LayerCache",
    "ModelConfig",
    "SessaConfig",
    "SessaLM",
    "SessaLayer",
    "SessaMixer",
    "SessaSubmodules",
    "count_parameters",
    "ensure_model_parallel",
    "init_weights",
    "megatron_config",
]
