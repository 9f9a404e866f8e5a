"""Checkpointing: sharded save/resume/reshard on megatron-core dist_checkpointing."""
from .manager import CheckpointManager

__all__ = ["CheckpointManager"]
