"""The maximal-update parametrisation (μP; Yang et al., Tensor Programs V) of the recipe's models.

`model.mup: true` with `model.mup_base_width` D0 (and `model.mup_base_head_size` d0, default
D0 / num_heads) makes a model of width D train like its base of width D0 at the same learning rate:
with the width multiplier m = D / D0, every parameter gets one of four roles (docs/mup.md):

    role        which parameters                                   init std      Adam LR   forward
    embedding   embedding.weight                                   init_std      lr        -
    output      output_layer.weight (the LM head, tied or not)     init_std      lr        logits / m
    vector      biases, norms, gamma_bias, Mamba's A_log/dt_bias/D,
                the depthwise convs (fan-in: the kernel size)      as without μP lr        -
    hidden      every other matrix (both dimensions grow with D)   init_std/√m   lr / m    -
    readout     gamma_ctx (D -> 1), Mamba's B_proj/C_proj (D -> N) init_std/m    lr / m    -

and the attention logits scale as 1/d rather than 1/√d: the forward branch's and the `*` blocks'
queries are multiplied by √(d0 / d), the feedback branch's q_b by √(D0 / D). At m = 1 (and d = d0)
every factor is 1: the base model is the model without μP. `model.mup: false` touches nothing.
The roles are read from the parameter's name (any prefix: a DDP wrapper's `module.`, a stage's
local layer numbers), so the engines' optimizer groups and `model.init` agree by construction.
"""
import math

from .config import ModelConfig

READOUT_SUFFIXES = ("gamma_ctx.weight", "B_proj.weight", "C_proj.weight")  # fan-out finite: N or 1
ROLES = ("embedding", "output", "vector", "hidden", "readout")


def width_multiplier(config: ModelConfig) -> float:
    """m = hidden_size / mup_base_width (1 without μP)."""
    return config.hidden_size / config.mup_base_width if config.mup else 1.0


def parameter_role(name: str, ndim: int) -> str:
    """The μP role (ROLES) of a parameter of the model, by its name and number of dimensions."""
    if name.endswith("embedding.weight"):
        return "embedding"
    if name.endswith("output_layer.weight"):
        return "output"
    if ndim <= 1 or ".conv_" in name:
        return "vector"
    if name.endswith(READOUT_SUFFIXES):
        return "readout"
    return "hidden"


def init_std_multiplier(name: str, ndim: int, config: ModelConfig) -> float:
    """What the `scaled` scheme's normal std of this parameter is multiplied by."""
    role, m = parameter_role(name, ndim), width_multiplier(config)
    return {"hidden": 1 / math.sqrt(m), "readout": 1 / m}.get(role, 1.0)


def lr_multiplier(name: str, ndim: int, config: ModelConfig) -> float:
    """What optim.lr (and optim.min_lr) is multiplied by for this parameter's Adam group."""
    return 1 / width_multiplier(config) if parameter_role(name, ndim) in ("hidden", "readout") else 1.0


def output_multiplier(config: ModelConfig) -> float:
    """The LM head's logits are multiplied by 1 / m."""
    return 1 / width_multiplier(config)


def query_multiplier(config: ModelConfig) -> float:
    """Forward-branch and `*` queries: √(d0 / d), so q.k / √d becomes q.k √d0 / d."""
    return math.sqrt(config.mup_base_head_size / config.head_size) if config.mup else 1.0


def feedback_query_multiplier(config: ModelConfig) -> float:
    """The feedback branch's q_b: √(D0 / D), so q_b.k_b / √D becomes q_b.k_b √D0 / D."""
    return math.sqrt(config.mup_base_width / config.hidden_size) if config.mup else 1.0

