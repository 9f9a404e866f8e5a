"""Run megatron-core on a machine without a GPU (tests, the CPU quickstart). Never used on CUDA.

megatron-core assumes CUDA in a few places that are not about compute:
  - buffers are allocated on `torch.cuda.current_device()` (DDP grad buffers, p2p shapes);
  - `torch.cuda.synchronize()` around p2p communication;
  - the model-parallel RNG tracker saves/restores the CUDA generator;
  - the optimizers check `param.type() == "torch.cuda.FloatTensor"` to decide on fp32 masters;
  - a few tensors are created with a literal `device="cuda"` (optimizer, pipeline schedules).
`enable()` redirects exactly these to the CPU. It refuses to run when CUDA is available.
"""
import warnings

import torch
from torch.overrides import TorchFunctionMode

_enabled = False
_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites `device="cuda..."` arguments and `.cuda()` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)


def enable() -> None:
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("model.cpu_compat is for machines without a GPU; it must not patch a CUDA run")
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # RNG tracker's add()/fork()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: None  # the CPU generator is seeded by the trainer

    original_type = torch.Tensor.type

    def type_as_if_on_cuda(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = original_type(self)
            return _CPU_TO_CUDA_TYPE.get(name, name)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_as_if_on_cuda
    # megatron's optimizers probe `.grad` of their parameter views (non-leaf tensors): PyTorch warns at
    # the frame that reads it, which with the mode below is this module's. Harmless; megatron's code.
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor",
                            category=UserWarning, module=r"model\.cpu_compat")
    _CudaDeviceToCpu().__enter__()  # stays on the mode stack for the life of the process
    _enabled = True
