"""Fixes for megatron-core bugs that our checkpoints hit, applied once at start-up (GPU and CPU).

megatron-core 0.16.1, DistributedOptimizer with torch's Adam (no Apex / Transformer Engine):
loading a `fully_reshardable` optimizer checkpoint copies every key of the local Adam state from
the checkpoint, including the per-parameter "step" tensor, which that format does not store (it
restores "step" from the param groups beforehand). The load fails with KeyError: 'step'. The fix
skips state keys the checkpoint does not carry; "step" keeps the value restored from the groups.
"""
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_applied = False


def apply_megatron_fixes() -> None:
    global _applied
    if _applied:
        return
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
    _applied = True
