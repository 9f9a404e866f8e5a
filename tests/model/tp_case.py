"""The models and batch shared by the tensor-parallel test and its torchrun worker."""
import dataclasses

import torch

from model import ModelConfig
from model.documents import positions_from_doc_ids

CONFIG = ModelConfig(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     feedback_impl="chunked", feedback_chunk_size=8, vocab_pad_multiple=64)
# (name, model config, sequence parallel, packed documents): grouped-query and full multi-head
# attention, with and without megatron's sequence parallelism, document masking and the feedback branch.
CASES = [
    ("gqa", CONFIG, False, False),
    ("gqa_sp", CONFIG, True, False),
    ("mha", dataclasses.replace(CONFIG, num_kv_heads=4), False, False),
    ("mha_sp", dataclasses.replace(CONFIG, num_kv_heads=4), True, False),
    ("gqa_docs", CONFIG, False, True),
    ("gqa_sp_docs", CONFIG, True, True),
    ("no_feedback_sp_docs", dataclasses.replace(CONFIG, feedback=False), True, True),
]
# Four ranks: one query and one key/value head each (the feedback solve on 8 of the 32 columns).
TP4_CASES = [
    ("mha_tp4", dataclasses.replace(CONFIG, num_kv_heads=4), False, False),
    ("mha_sp_docs_tp4", dataclasses.replace(CONFIG, num_kv_heads=4), True, True),
]

# Hybrid stacks (model.layer_pattern, model/blocks.py): each block type alone, and mixed.
HYBRID = dataclasses.replace(CONFIG, num_layers=4, layer_pattern="S*-S", ffn_hidden_size=48)
MAMBA = dict(mamba_state_size=8, mamba_head_size=16, mamba_chunk_size=8)
HYBRID_CASES = [
    ("attention_only", dataclasses.replace(CONFIG, layer_pattern="**"), True, True),
    ("mlp_only", dataclasses.replace(CONFIG, layer_pattern="--", ffn_hidden_size=48), True, False),
    ("hybrid", HYBRID, False, False),
    ("hybrid_sp_docs", HYBRID, True, True),
    ("hybrid_no_feedback_docs", dataclasses.replace(HYBRID, feedback=False), False, True),
    # Mamba-2 blocks (model/mamba.py): heads and B/C state rows sharded, 4 heads of 16, state 8
    ("mamba_only_sp_docs", dataclasses.replace(HYBRID, num_layers=2, layer_pattern="MM", **MAMBA), True, True),
    ("mamba_mixed", dataclasses.replace(HYBRID, layer_pattern="SM*-", **MAMBA), False, False),
    ("mamba_mixed_docs", dataclasses.replace(HYBRID, layer_pattern="SM*-", **MAMBA), False, True),
]


def make_tokens(config: ModelConfig = CONFIG) -> torch.Tensor:
    """[2, 33]: 32 inputs, divisible by the tensor-parallel size for sequence parallelism."""
    return torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(11))


def make_documents(packed: bool) -> dict:
    """forward() keywords for the 32 inputs: doc_ids and restarted positions (two packed rows)."""
    if not packed:
        return {}
    lengths = [[5, 1, 11, 1, 9, 5], [17, 1, 14]]
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    return {"doc_ids": doc_ids, "position_ids": positions_from_doc_ids(doc_ids)}
