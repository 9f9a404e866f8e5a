"""Activation recomputation for Sessa stacks: keep only each block's input in the forward and recompute
the block in the backward.

    recompute_blocks(model, "full", run)       # each SessaLayer
    recompute_blocks(model, "selective", run)  # each layer's mixer: attention + feedback solve, whose
                                               # activations grow with T; norms and linears stay stored
`run(function, x)` is the checkpoint implementation of the engine (torch.utils.checkpoint for the
megatron engine, DeepSpeed's for the DeepSpeed engine). Decoding (a cache) and no-grad forwards run
the block directly. Parameter names and the checkpoint layout are unchanged (the forward is wrapped
per instance). The Transformer arm uses megatron-core's own recomputation (TransformerConfig).
"""
import torch

RECOMPUTE_MODES = ("none", "selective", "full")


def recompute_blocks(model, mode: str, run) -> None:
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode must be one of {RECOMPUTE_MODES}, got {mode!r}")
    if mode == "none":
        return
    for layer in model.layers:
        module = layer if mode == "full" else getattr(layer, "mixer", None)
        if module is None:  # selective: hybrid attention / MLP blocks (model/blocks.py) keep their activations
            continue
        inner = module.forward

        def forward(x, cache=None, _inner=inner, **kwargs):
            if cache is not None or not torch.is_grad_enabled():  # decoding, evaluation
                return _inner(x, cache, **kwargs)
            return run(lambda h: _inner(h, None, **kwargs)[0], x), None

        module.forward = forward


def torch_checkpoint(function, x):
    """Non-reentrant torch checkpoint (the model draws no random numbers, so no RNG state to replay)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, x, use_reentrant=False)
