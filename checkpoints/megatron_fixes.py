"""Fixes for megatron-core bugs that our checkpoints hit, applied once at start-up (GPU and CPU).

megatron-core 0.16.1, DistributedOptimizer with torch's Adam (no Apex / Transformer Engine):
loading a `fully_reshardable` optimizer checkpoint copies every key of the local Adam state from
the checkpoint, including the per-parameter "step" tensor, which that format does not store (it
restores "step" from the param groups beforehand). The load fails with KeyError: 'step'. The fix
skips state keys the checkpoint does not carry; "step" keeps the value restored from the groups.

Same setting, before a load: `sharded_state_dict(is_loading=True)` reads the optimizer's own state
dict and asserts all parameters share one "step", which fails for a fresh torch Adam with no state
at all. `initialise_optimizer_state` gives every parameter zero moments and step 0 first; the load
then overwrites them in place.

And after a load: megatron puts ONE "step" tensor object into every parameter's state; torch's Adam
increments `state["step"]` in place per parameter, so a shared tensor advances once per parameter
per step and the bias correction is wrong from the first step after a resume.
`load_optimizer_state` loads and then gives each parameter its own copy.

And on a machine without CUDA: megatron's torch_dist save calls `torch.cuda.synchronize()` and
`torch.cuda.current_device()` unconditionally, which raise there; CheckpointManager saves inside
`cuda_calls_on_cpu()`, which answers both for the CPU during the save only.

And on a stop signal: megatron's torch_dist save sends its results through one multiprocessing
Manager process per rank, spawned at the first save and kept. SLURM's SIGTERM (cancel, preemption,
`scancel --signal=TERM`) reaches every process of the job step; the Manager died of it and the
checkpoint the trainer writes on that signal failed (BrokenPipeError). A spawned process starts
with the parent's ignored signals, so `apply_megatron_fixes` starts that Manager up front with
SIGTERM and SIGUSR1 ignored.
"""
import contextlib
import signal

import torch

_applied = False


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """Within: `torch.cuda.synchronize()` is a no-op and `torch.cuda.current_device()` is "cpu" when
    torch has no CUDA (megatron's torch_dist save calls both unconditionally); unchanged otherwise."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize, torch.cuda.current_device = (lambda device=None: None), (lambda: "cpu")
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


def apply_megatron_fixes() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states_present_in_checkpoint(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_present_in_checkpoint
    from megatron.core.dist_checkpointing.strategies.filesystem_async import _get_write_results_queue

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        _get_write_results_queue()  # the Manager, ignoring the stop signals the trainer handles
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _applied = True


@torch.no_grad()
def initialise_optimizer_state(optimizer) -> None:
    """Zero Adam moments and step for every parameter that has no state yet (megatron optimizer)."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param]["step"] = torch.zeros((), dtype=torch.float32)
                    inner.state[param]["exp_avg"] = torch.zeros_like(param)
                    inner.state[param]["exp_avg_sq"] = torch.zeros_like(param)


def load_optimizer_state(optimizer, state_dict) -> None:
    optimizer.load_state_dict(state_dict)
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param_state in chained.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].clone()
