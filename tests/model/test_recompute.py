"""Activation recomputation (model/recompute.py; train.recompute in the megatron engine): the same
outputs and gradients, bit for bit, and fewer bytes kept for the backward."""
import pytest
import torch

from model import ModelConfig, SessaLM, ensure_model_parallel, init_weights, megatron_config
from model.recompute import recompute_blocks, torch_checkpoint


def _saved_bytes_and_grads(mode: str):
    ensure_model_parallel()
    config = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=2, feedback_impl="chunked",
                         feedback_chunk_size=16)
    model = SessaLM(config, megatron_config(config))
    init_weights(model, seed=3)
    recompute_blocks(model, mode, torch_checkpoint)
    tokens = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    forward_bytes = sum(saved)
    loss.backward()
    return forward_bytes, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recompute_modes_are_exact_and_keep_less():
    base_bytes, base_loss, base_grads = _saved_bytes_and_grads("none")
    previous = base_bytes
    for mode in ("selective", "full"):
        saved, loss, grads = _saved_bytes_and_grads(mode)
        assert torch.equal(loss, base_loss), mode
        for name, grad in base_grads.items():
            assert torch.equal(grads[name], grad), (mode, name)
        assert saved < previous, (mode, saved, previous)  # full keeps less than selective, less than none
        previous = saved


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="recompute mode must be one of"):
        recompute_blocks(object(), "some", torch_checkpoint)
