"""The model and batch shared by the tensor-parallel test and its torchrun worker."""
import torch

from model import SessaConfig

CONFIG = SessaConfig(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     feedback_impl="chunked", feedback_chunk_size=8, vocab_pad_multiple=64)


def make_tokens() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 30), generator=torch.Generator().manual_seed(11))
