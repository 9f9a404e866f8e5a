"""Every shipped recipe in configs/ loads and builds its model, for each engine it allows, on the meta
device (no memory: the 7B recipe builds in seconds)."""
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))


def _engines(path: str) -> list[str]:
    engines = []
    for engine in ("megatron", "deepspeed"):
        try:
            load_config(REPO / path, ["--engine", engine])
            engines.append(engine)
        except ConfigError as err:  # e.g. pipeline parallelism needs the megatron engine
            assert engine == "deepspeed", f"{path} does not load with engine: megatron: {err}"
    return engines


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_loads_and_builds_on_meta(path):
    from model import cpu_compat
    from model.flops import count_params
    from model.parallel import ensure_model_parallel
    from model.transformer import build_model, megatron_config_for

    if not torch.cuda.is_available():
        cpu_compat.enable()  # the Transformer arm seeds megatron's CUDA RNG tracker
    assert _engines(path), path
    config = load_config(REPO / path)
    ensure_model_parallel()  # one process: the model is built whole, as a TP=1 rank would
    megatron_config = megatron_config_for(config.model, sequence_parallel=False, calculate_per_token_loss=True)
    with torch.device("meta"):
        model = build_model(config.model, megatron_config)
    built = sum(p.numel() for p in model.parameters())
    assert built == count_params(config.model), (path, built, count_params(config.model))
    assert all(p.device.type == "meta" for p in model.parameters())
