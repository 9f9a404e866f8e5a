"""With document masking the FLOP ledger counts only the (query, key) pairs a document can see
("model" convention): per-token parts unchanged, attention and feedback scaled by the visible share."""
import pytest
import torch

from model import ModelConfig
from model.documents import visible_pairs
from model.flops import ledger


def test_visible_pairs_per_document_and_row():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1], [3, 3, 3, 3, 3], [0, 1, 2, 3, -1]])
    assert visible_pairs(doc_ids) == (6 + 3) + 15 + 5  # 3- and 2-token documents; one of 5; five of 1


def test_one_document_is_the_causal_ledger_and_fewer_pairs_cost_less():
    config = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4)
    book = ledger(config, 128)
    assert book.per_token_visible(1.0) == pytest.approx(book.per_token("model"))
    pairwise = sum(v for k, v in book.forward.items() if k.startswith(("attention", "feedback")))
    assert book.per_token("model") - book.per_token_visible(0.25) == pytest.approx(3 * 0.75 * pairwise)
    assert book.per_token_visible(0.25, training=False) < book.per_token("model", training=False)
