"""Training engines: what differs between megatron-core and DeepSpeed, behind one small interface.

The loop (pretrain/loop.py) owns data, schedule, logging, evaluation, checkpoint cadence and
preemption; an engine owns the model, the optimizer and their checkpoint format:

    Engine = engine_class(config)
    plan = Engine.resume_plan(manager, step)        # the loop's latest step, as this engine reads it
    engine = Engine(config, env, plan, seq_len=..., num_microbatches=...)
    engine.chunks                                   # this rank's model chunks (several with virtual stages)
    engine.optimizer                                # its param_groups are driven by the loop's scheduler
    result = engine.train_step(micro_batches)       # one optimizer step on the global batch -> StepResult
    engine.train_step(micro_batches, keep_update)   # megatron: keep_update(loss, grad_norm) False drops the update
    engine.reduction_wait_s                         # seconds waited at the gradient reduction so far (stragglers)
    total, count = engine.evaluate(micro_batches, n)  # summed masked loss and target count, all-reduced
    with engine.full_model() as model: ...          # the whole model on this rank (sampling), or None
    engine.save(step, common, rank_state)           # -> the published checkpoint directory (checkpoint.async_save:
                                                    #    written in the background, engine.checkpoints.finish_saves)
    restored = engine.load(plan)                    # -> Restored(common, data_states, rng)
    engine.banner()                                 # what the start line says about the engine

A micro-batch is the loader's dict plus "targets_mask" (bool [B, T]: positions whose loss counts) and,
with data.document_masking, "doc_ids"/"position_ids" [B, T] for the model (see pretrain/batches.py).
The loss of a step is the sum of per-token losses over the targets of the whole global batch divided
by their number, in both engines and every parallel layout.
"""
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig


@dataclass
class StepResult:
    loss: float  # mean over the global batch's target tokens (nan/inf when non-finite)
    grad_norm: float  # global gradient norm before clipping (nan/inf when non-finite)
    applied: bool  # False: the update was dropped (non-finite loss or gradients)


@dataclass
class ResumePlan:
    step: int
    directory: Path
    common: dict  # the checkpoint's common state (pretrain/state.py), read before the engine is built


@dataclass
class Restored:
    common: dict
    data_states: list[dict]  # one loader state per data-parallel rank of the saved run
    rng: dict | None  # this rank's RNG state; None when the world size changed


def engine_class(config: RunConfig):
    """The engine named by `engine:` (imported lazily: DeepSpeed is heavy and optional)."""
    if config.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine
    from .megatron import MegatronEngine

    return MegatronEngine


def load_model_weights(checkpoints, step: int, chunks) -> None:
    """The model tensors of checkpoint `step` (megatron torch_dist) into this rank's model chunks,
    resharded to their layout; nothing else of the checkpoint is read."""
    states = [chunk.sharded_state_dict(prefix="model.") for chunk in chunks]  # keys: global layer numbers
    loaded = checkpoints.load(step, {"model": {k: v for state in states for k, v in state.items()}})["model"]
    for chunk, state in zip(chunks, states):
        chunk.load_global_state_dict({k: loaded[k] for k in state}, prefix="model.")
