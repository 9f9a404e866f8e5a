"""The Hugging Face package for Sessa: `register()` makes AutoConfig / AutoModelForCausalLM know
model_type "sessa" without remote code; exports carry copies of these two flat files (auto_map)."""
from .configuration_sessa import ModelConfig as SessaHFConfig
from .modeling_sessa import SessaCache, SessaForCausalLM, SessaModel, chunked_feedback_solve

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("sessa", SessaHFConfig)
    AutoModel.register(SessaHFConfig, SessaModel)
    AutoModelForCausalLM.register(SessaHFConfig, SessaForCausalLM)
    _registered = True


__all__ = ["SessaHFConfig", "SessaForCausalLM", "SessaModel", "SessaCache", "chunked_feedback_solve", "register"]
