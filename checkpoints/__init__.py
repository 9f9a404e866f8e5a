"""Checkpointing: sharded save/resume/reshard on megatron-core dist_checkpointing."""
from model.dependency_warnings import filter_known_dependency_warnings

filter_known_dependency_warnings()  # before this package first imports megatron-core

from .manager import CheckpointManager  # noqa: E402

__all__ = ["CheckpointManager"]
