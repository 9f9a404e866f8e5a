"""`python -m pretrain` that also measures the peak of the bytes autograd holds for the backward, for
tests/pretrain/test_trainer.py: recompute must lower it, not only keep the losses.

    python tests/pretrain/saved_bytes_run.py --config recipe.yaml [--a.b v ...]   # last line: peak saved bytes N

Every tensor packed for a backward (in the one training process) counts from when it is packed until
autograd drops it. What a non-reentrant checkpoint (model/recompute.py) keeps is packed by its own
hooks and is not counted; megatron's reentrant recompute packs its recomputed block during the
backward, where it counts for as long as it lives.
"""
import sys

import torch

import pretrain.__main__


class _Held:
    """A packed tensor; the live total drops when autograd releases it."""
    live = peak = 0

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.nbytes = tensor, tensor.numel() * tensor.element_size()
        _Held.live += self.nbytes
        _Held.peak = max(_Held.peak, _Held.live)

    def __del__(self):
        _Held.live -= self.nbytes


if __name__ == "__main__":
    with torch.autograd.graph.saved_tensors_hooks(_Held, lambda held: held.tensor):
        code = pretrain.__main__.main(sys.argv[1:])
    print(f"peak saved bytes {_Held.peak}")
    sys.exit(code)
