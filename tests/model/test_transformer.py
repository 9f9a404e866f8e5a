"""The Transformer++ arm (model/transformer.py): interface parity with SessaLM, causality, checkpoints."""
import pytest
import torch

from model.config import ModelConfig


@pytest.fixture(scope="module", autouse=True)
def cpu_megatron():
    if not torch.cuda.is_available():
        from pretrain import cpu_compat

        cpu_compat.enable()  # megatron's RoPE moves its frequencies to "the current CUDA device"


def build(seed=0, **fields):
    from model.transformer import build_model, init_model_weights, megatron_config_for

    config = ModelConfig(arch="transformer", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, **fields)
    from model.parallel import ensure_model_parallel

    ensure_model_parallel()
    model = build_model(config, megatron_config_for(config))
    init_model_weights(model, seed)
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_parameter_count_and_no_biases(tie):
    model = build(tie_embeddings=tie)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - 320 * 64 * (1 if tie else 2)


def test_loss_is_per_token_and_causal():
    model = build()
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, tokens)
    assert loss.shape == (2, 24)
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 300
    again = model(changed, tokens)
    torch.testing.assert_close(again[:, :12], loss[:, :12])
    assert (again[:, 12:] - loss[:, 12:]).abs().max() > 1e-3


def test_checkpoint_round_trip_and_seeded_init():
    a, b = build(seed=0), build(seed=1)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a(tokens, tokens), b(tokens, tokens))
    assert "embedding.word_embeddings.weight" in a.sharded_state_dict()
    b.load_global_state_dict({f"model.{k}": v for k, v in a.state_dict().items()}, prefix="model.")
    torch.testing.assert_close(b(tokens, tokens), a(tokens, tokens))
    torch.testing.assert_close(build(seed=0)(tokens, tokens), a(tokens, tokens))  # init depends on the seed only


def test_learns_a_batch():
    model = build()
    tokens = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_rejects_a_sessa_config():
    from model.transformer import TransformerLM

    with pytest.raises(ValueError, match="arch"):
        TransformerLM(ModelConfig(vocab_size=300, hidden_size=64, num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="mamba", vocab_size=300, hidden_size=64, num_layers=1, num_heads=4)
