"""Training state shared by the loop and both engines: counters, RNG streams, the learning-rate
schedule, parameter groups, and the checks a resume makes before loading anything.

What a checkpoint holds besides the engine's model/optimizer state (the same for both engines):
  common   {"step", "consumed_tokens", "skipped_steps", "scheduler", "config", "tokenizer_id", "layout"}
  per rank {"rng": rng_state(), "data": the loader's state_dict()} (data: one per data-parallel rank)
"""
import random
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from model.config import ModelConfig

from .config import ConfigError, RunConfig

SHAPE_FIELDS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                "tie_embeddings", "vocab_pad_multiple", "feedback", "layer_pattern")
MAMBA_SHAPE_FIELDS = ("mamba_state_size", "mamba_head_size", "mamba_expand", "mamba_conv_kernel")  # with `M` blocks


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included: their data is consumed)
    consumed_tokens: int = 0
    skipped_steps: int = 0  # steps whose update was dropped (train.nonfinite: skip)
    last_saved_step: int | None = None

    def common(self) -> dict:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens, "skipped_steps": self.skipped_steps}

    def restore(self, common: dict, saved_at: int) -> None:
        self.step, self.consumed_tokens = common["step"], common["consumed_tokens"]
        self.skipped_steps = common.get("skipped_steps", 0)  # checkpoints written before it existed
        self.last_saved_step = saved_at


def layout_of(env) -> dict:
    """The parallel layout a checkpoint records (a resume at another one reshards)."""
    return {"world_size": env.world_size, "tp": env.tp_size, "pp": env.pp_size, "dp": env.dp_size, "cp": env.cp_size}


def no_weight_decay(param, name: str) -> bool:
    """Norms, biases and the gamma gate are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or ".gamma_" in name


def build_scheduler(optimizer, config: RunConfig) -> OptimizerParamScheduler:
    """Warmup + cosine or WSD decay to optim.min_lr over train.max_steps; the config wins over a
    checkpoint's schedule (a run extended by raising max_steps decays over the new length)."""
    steps, schedule, optim = config.train.max_steps, config.schedule, config.optim
    wsd = schedule.style == "wsd"
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=steps,
        lr_decay_style="WSD" if wsd else "cosine",
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=steps, wd_incr_style="constant",
        wsd_decay_steps=max(1, round(schedule.wsd_decay_fraction * steps)) if wsd else None,
        lr_wsd_decay_style=schedule.wsd_decay_style if wsd else None,
    )


# --- random streams ----------------------------------------------------------------------------
def seed_everything(seed: int, rank: int) -> None:
    """Per-rank streams for anything random; weights do not depend on them (init is seeded by name)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


# --- resume checks -----------------------------------------------------------------------------
MUP_FIELDS = {"mup": False, "mup_base_width": None, "mup_base_head_size": None}  # model/mup.py; value: before μP


def check_checkpoint_compatible(common: dict, where, config: RunConfig, tokenizer_id: str) -> None:
    """Refuse a checkpoint of another model shape or tokenizer, naming what differs and what to do."""
    saved, ours = common["config"]["model"], config.model.to_dict()
    # fields added after a checkpoint was written keep their old meaning
    defaults = {"feedback": True, "layer_pattern": ""} | {k: getattr(ModelConfig, k) for k in MAMBA_SHAPE_FIELDS}
    fields = SHAPE_FIELDS + (MAMBA_SHAPE_FIELDS if "M" in ours["layer_pattern"] else ())
    differing = [f"{k}: checkpoint {saved.get(k, defaults.get(k))!r} vs config {ours[k]!r}" for k in fields
                 if saved.get(k, defaults.get(k)) != ours[k]]
    if differing:
        raise ConfigError(f"checkpoint {where} was saved for another model shape ({'; '.join(differing)}); "
                          f"use the checkpoint's model settings or a new run_name / --checkpoint.resume false")
    mup = [f"{k}: checkpoint {saved.get(k, default)!r} vs config {ours[k]!r}" for k, default in MUP_FIELDS.items()
           if saved.get(k, default) != ours[k]]  # a checkpoint from before μP: the model without it
    if mup:
        raise ConfigError(f"checkpoint {where} was trained with other μP settings ({'; '.join(mup)}): μP sets every "
                          f"parameter's learning rate and the forward multipliers, so a change would train another "
                          f"model; resume with the checkpoint's model.mup / mup_base_width / mup_base_head_size, or "
                          f"start a new run_name")
    if common["tokenizer_id"] != tokenizer_id:
        raise ConfigError(f"checkpoint {where} was trained with tokenizer {common['tokenizer_id']!r} but "
                          f"{config.data.path} uses {tokenizer_id!r}; prepare the data with the "
                          f"checkpoint's tokenizer or start a new run")


def restore_loader(loader, data_states: list[dict], dp_rank: int, dp_size: int) -> None:
    """Load every saved data-parallel rank's loader position into this rank's loader; another DP size,
    worker count or batch shape re-deals what is left of the epoch (data_pipeline.loader). A mixture's
    state at a step boundary is the same on every rank and loads at any layout (data_pipeline.mixture)."""
    from data_pipeline.loader import merge_dp_states
    from data_pipeline.mixture import MixtureLoader, merge_mixture_states

    if isinstance(loader, MixtureLoader):
        loader.load_state_dict(merge_mixture_states(data_states, dp_rank, dp_size))
        return
    shape = ("dp_size", "workers", "lanes")
    saved_layout, our_layout = data_states[0].get("layout"), loader.state_dict()["layout"]
    if saved_layout is None or all(saved_layout[k] == our_layout[k] for k in shape):
        loader.load_state_dict(data_states[dp_rank])  # (a mixture's state is refused there, naming it)
    else:
        loader.load_state_dict(merge_dp_states(data_states, dp_rank, dp_size))
