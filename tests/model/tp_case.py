"""The models and batch shared by the tensor-parallel test and its torchrun worker."""
import dataclasses

import torch

from model import ModelConfig

CONFIG = ModelConfig(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     feedback_impl="chunked", feedback_chunk_size=8, vocab_pad_multiple=64)
# (name, model config, sequence parallel): grouped-query and full multi-head attention, with and
# without megatron's sequence parallelism.
CASES = [
    ("gqa", CONFIG, False),
    ("gqa_sp", CONFIG, True),
    ("mha", dataclasses.replace(CONFIG, num_kv_heads=4), False),
    ("mha_sp", dataclasses.replace(CONFIG, num_kv_heads=4), True),
]


def make_tokens(config: ModelConfig = CONFIG) -> torch.Tensor:
    """[2, 33]: 32 inputs, divisible by the tensor-parallel size for sequence parallelism."""
    return torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(11))
