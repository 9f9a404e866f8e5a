"""Weight initialisation that does not depend on the parallel layout.

Every parameter is drawn in full from a generator seeded by (seed, global parameter name) and each
rank keeps its own tensor-parallel slice, so TP=2 and PP=2 models start from exactly the weights
of the single-process model.
"""
import math
import zlib

import torch
from megatron.core import parallel_state

from .config import ModelConfig
from .mup import init_std_multiplier


def global_named_parameters(model):
    """(name, param) with local layer indices replaced by global layer numbers; a lone SessaLayer's
    parameters are named as in the model (`layers.<layer_number>.`)."""
    if not hasattr(model, "layers"):  # one SessaLayer
        for name, param in model.named_parameters():
            yield f"layers.{model.layer_number}.{name}", param
        return
    layer_numbers = [layer.layer_number for layer in model.layers]
    for name, param in model.named_parameters():
        if name.startswith("layers."):
            _, local, rest = name.split(".", 2)
            name = f"layers.{layer_numbers[int(local)]}.{rest}"
        yield name, param


def _full_shape(param) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return shape


def _local_slice(param, full: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, size = param.partition_dim, param.shape[param.partition_dim]
    return full.narrow(dim, parallel_state.get_tensor_model_parallel_rank() * size, size)


def uninitialised(weight) -> None:
    """Megatron's init hook for every linear and embedding: the real values come from
    `init_weights` (layout independent), drawn after construction."""


def _draw(name: str, shape: list[int], fan_in: int, config: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    def uniform(bound):  # PyTorch's nn.Linear default, as the reference leaves it
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)

    def normal(std):
        return torch.empty(shape).normal_(0.0, std, generator=gen)

    reference = config.init_scheme == "reference"
    # Mamba-2 blocks (model/mamba.py), as mamba-ssm initialises them in either scheme: A in [1, 16],
    # dt log-uniform in [1e-3, 1e-1] (floored at 1e-4) through softplus, D = 1, convs as nn.Conv1d.
    if name.endswith(".A_log"):
        return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()
    if name.endswith(".dt_bias"):
        dt = torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp().clamp(min=1e-4)
        return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)
    if name.endswith(".D"):
        return torch.ones(shape)
    if ".conv_" in name:
        return uniform(1.0 / math.sqrt(fan_in))  # fan-in: the kernel size (depthwise)
    if name.endswith("norm.weight") or name.endswith("gamma_bias"):
        return torch.ones(shape)  # LayerNorm scale; gamma_bias starts at 1.0
    if name.endswith("norm.bias"):
        return torch.zeros(shape)
    if name == "embedding.weight":
        return normal(1.0 if reference else config.init_std)  # nn.Embedding's default is N(0, 1)
    if reference:
        return uniform(1.0 / math.sqrt(fan_in))
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = config.init_std * init_std_multiplier(name, len(shape), config) if config.mup else config.init_std
    if name.endswith("out_proj.weight"):  # residual-branch outputs, GPT-2 style
        return normal(std / math.sqrt(2 * config.num_layers))
    return normal(std)


@torch.no_grad()
def init_weights(model, seed: int = 0) -> None:
    """Initialise `model` (a SessaLM, one pipeline stage of it, or one SessaLayer) per
    `model.sessa.init_scheme` (with `model.mup`, μP's std per parameter role, model/mup.py);
    parameters on the meta device are left as they are."""
    params = dict(global_named_parameters(model))
    for name, param in params.items():
        if param.is_meta:
            continue
        shape = _full_shape(param)
        weight_name = name.removesuffix("bias") + "weight" if name.endswith(".bias") else name
        weight_shape = _full_shape(params[weight_name])
        fan_in = weight_shape[-1] if weight_shape else 1  # a bias' fan-in is its weight's
        if name == "output_layer.weight" and model.sessa.tie_embeddings:
            name = "embedding.weight"  # the last pipeline stage's copy of the tied matrix
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        full = _draw(name, shape, fan_in, model.sessa, gen)
        param.copy_(_local_slice(param, full).to(param.dtype))
