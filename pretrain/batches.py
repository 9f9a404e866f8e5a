"""From a loader batch to what a model's forward takes, for both engines and both architectures.

    batch = model_inputs(loader_batch, config.data, device)
    per_token_loss = model(batch["inputs"], batch["labels"], **batch["model_kwargs"])
    total, count = masked_loss_sum(per_token_loss, batch["targets_mask"])

Targets count where the data's loss mask allows (answers only, for task data) and outside padding.
With data.document_masking the model sees each packed document alone (doc_ids) and, with
data.reset_positions, RoPE positions restart at every document. Under context parallelism
(`context_piece`) a rank keeps its piece of the inputs, labels and targets (contiguous or zigzag:
parallel.context_layout); doc_ids and position_ids stay whole (the mixers need every position's
document and position).
"""
import torch

from kernels.feedback_solve.context_parallel import context_positions
from model.parallel import context_layout

from .config import DataConfig


def model_inputs(batch: dict, data: DataConfig, device: torch.device) -> dict:
    tokens = batch["tokens"].to(device, non_blocking=True)
    doc_ids = batch["doc_ids"]
    targets_mask = doc_ids[:, 1:] >= 0  # padding only ends a split (or an unpacked task example)
    if "loss_mask" in batch:
        targets_mask = targets_mask & batch["loss_mask"][:, 1:].bool()
    kwargs = {}
    if data.document_masking:
        from model.documents import positions_from_doc_ids

        inputs_doc_ids = doc_ids[:, :-1].to(device, non_blocking=True)
        kwargs["doc_ids"] = inputs_doc_ids
        if data.reset_positions:
            kwargs["position_ids"] = positions_from_doc_ids(inputs_doc_ids)
    return {"inputs": tokens[:, :-1], "labels": tokens[:, 1:], "targets_mask": targets_mask.to(device),
            "model_kwargs": kwargs}


def context_piece(batch: dict, rank: int, size: int) -> dict:
    """`model_inputs(...)` with inputs, labels and targets cut to context-parallel rank `rank`'s
    positions in the layout the model's blocks use (`model.parallel.context_layout`)."""
    length = batch["inputs"].shape[1]
    try:
        piece = context_positions(length, size, rank, context_layout(), batch["inputs"].device)
    except ValueError as err:
        raise ValueError(f"{err} (data sequence length, parallel.context and parallel.context_layout)") from None
    return {**batch, **{key: batch[key][:, piece] for key in ("inputs", "labels", "targets_mask")}}


def masked_loss_sum(per_token_loss: torch.Tensor, targets_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token losses over the targets, number of targets); masked positions add 0."""
    return (per_token_loss.float() * targets_mask.to(per_token_loss.dtype)).sum(), targets_mask.sum()


def target_count(batch: dict) -> int:
    """Targets in a loader batch (no model run): what a step's loss is normalised by."""
    mask = batch["doc_ids"][:, 1:] >= 0
    if "loss_mask" in batch:
        mask = mask & batch["loss_mask"][:, 1:].bool()
    return int(mask.sum())
