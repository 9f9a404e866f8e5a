"""Known warnings of dependencies that say nothing a user of this recipe can act on, filtered narrowly
(by message and the module that raises them); every other warning still shows.

- megatron-core announces at import that Transformer Engine / Apex are absent and it uses its local
  (PyTorch) kernels: this recipe never uses either.
- megatron-core's distributed optimizer and DDP call `all_gather_into_tensor` / `reduce_scatter_tensor`,
  which torch 2.13 deprecates (FutureWarning once per process and rank), and its checkpoint loader
  calls `torch.distributed.checkpoint.load_state_dict`, deprecated for `load`: megatron's to update.
- torch.distributed.checkpoint says it "assumes the intent is to load in a single process" even when
  the caller asks for exactly that (`no_dist=True`, the export tools' readers).
"""
import warnings

_MEGATRON = r"megatron\.core(\..*)?"


def filter_known_dependency_warnings() -> None:
    for message in (r"Transformer Engine and Apex are not installed", r"Apex is not installed"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=_MEGATRON)
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated",
                                category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning,
                            module=r"megatron\.core\.dist_checkpointing\.strategies\.torch")
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized, "
                            r"assuming the intent is to load in a single process", category=UserWarning,
                            module=r"torch\.distributed\.checkpoint(\..*)?")
