"""SessaLayer / SessaLM: parity with the reference, chunked == dense, decoding, training, config."""
import pytest
import torch
from reference_layer import ReferenceLayer, reference_state_dict

from model import ModelConfig, SessaLayer, SessaLM, count_parameters, init_weights
from model.generation import empty_caches, generate, sample_next_token


def small_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, feedback_chunk_size=16)
    fields.update(overrides)
    return ModelConfig(**fields)


def build_lm(config, seed=0, dtype=torch.float32):
    model = SessaLM(config)
    init_weights(model, seed)
    return model.to(dtype)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (1, 1)], ids=["gqa", "mha", "single-head"])
def test_layer_matches_reference_transcription(heads, kv_heads):
    config = small_config(num_heads=heads, num_kv_heads=kv_heads, init_scheme="reference")
    layer = SessaLayer(config).double()
    with torch.no_grad():  # random non-trivial weights everywhere, including gamma
        for p in layer.parameters():
            p.normal_(0, 0.3)
    reference = ReferenceLayer(32, heads, kv_heads).double()
    reference.load_state_dict(reference_state_dict(layer))
    x = torch.randn(3, 50, 32, dtype=torch.float64)
    ours, _ = layer(x.transpose(0, 1))
    torch.testing.assert_close(ours.transpose(0, 1), reference(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (1, 1)], ids=["gqa", "single-head"])
@pytest.mark.parametrize("T", [1, 65, 257])
def test_layer_chunked_equals_dense_with_parameter_gradients(T, heads, kv_heads):
    grads = {}
    for impl in ("dense", "chunked"):
        config = small_config(num_heads=heads, num_kv_heads=kv_heads, feedback_impl=impl)
        layer = SessaLayer(config).double()
        torch.manual_seed(0)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.2)
        x = torch.randn(T, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y, _ = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads[impl] = {"output": y.detach(), **{n: p.grad for n, p in layer.named_parameters()}}
    for name, want in grads["dense"].items():
        torch.testing.assert_close(grads["chunked"][name], want, atol=1e-10, rtol=1e-10, msg=name)


def test_prefill_and_decode_match_full_forward():
    config = small_config(num_layers=3)
    model = build_lm(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        caches = empty_caches(model, 2)
        prefill_logits, caches = model(tokens[:, :25], caches=caches)
        step_logits = [prefill_logits]
        for t in range(25, 40):
            logits, caches = model(tokens[:, t : t + 1], caches=caches)
            step_logits.append(logits)
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generate_greedy_is_deterministic_and_respects_length():
    config = small_config()
    model = build_lm(config).eval()
    prompt = torch.randint(0, config.vocab_size, (2, 5))
    out_a = generate(model, prompt, 7, temperature=0)
    out_b = generate(model, prompt, 7, temperature=0)
    assert out_a.shape == (2, 12) and torch.equal(out_a, out_b) and torch.equal(out_a[:, :5], prompt)
    assert int(out_a.max()) < config.vocab_size  # padded vocabulary entries are never produced


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    top1 = {int(sample_next_token(logits, 1.0, top_k=1, generator=gen)) for _ in range(20)}
    assert top1 == {0}
    nucleus = {int(sample_next_token(logits, 1.0, top_p=0.8, generator=gen)) for _ in range(200)}
    assert nucleus == {0, 1}  # p = 0.71, 0.26, ...: the first two cover 0.8


def test_small_lm_overfits_a_batch_with_the_chunked_solve():
    config = small_config(feedback_impl="chunked", vocab_size=50)
    model = build_lm(config)
    batch = torch.randint(0, 50, (4, 33), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(batch[:, :-1], batch[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_parameter_counter_matches_module():
    for overrides in ({}, {"num_heads": 1, "num_kv_heads": 1}, {"tie_embeddings": False}, {"feedback": False}):
        config = small_config(**overrides)
        assert count_parameters(config) == sum(p.numel() for p in SessaLM(config).parameters())


@pytest.mark.parametrize("scheme", ["reference", "scaled"])
def test_init_is_seeded_and_schemes_differ(scheme):
    config = small_config(init_scheme=scheme)
    a, b, c = build_lm(config, seed=1), build_lm(config, seed=1), build_lm(config, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.numel() > 1 and "norm" not in name and not (scheme == "scaled" and name.endswith("bias")):
            assert not torch.equal(pa, pc), name
    out_proj = dict(a.named_parameters())["layers.0.out_proj.weight"]
    if scheme == "scaled":
        assert out_proj.std() < 0.02 / 1.5  # residual outputs scaled by 1/sqrt(2 L)


@pytest.mark.parametrize("fields,match", [
    (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
    (dict(hidden_size=36, num_heads=12), "even"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(gamma_max=1.0), "gamma_max"),
    (dict(gamma_max=0.0), "gamma_max"),
    (dict(feedback_impl="fast"), "feedback_impl"),
    (dict(init_scheme="xavier"), "init_scheme"),
    (dict(dtype="float8"), "dtype"),
    (dict(num_layers=0), "num_layers"),
])
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        small_config(**fields)


@pytest.mark.parametrize("scheme", ["reference", "scaled"])
def test_layer_built_directly_is_initialised_like_the_model(scheme):
    config = small_config(init_scheme=scheme)
    first, second = SessaLayer(config, layer_number=1), SessaLayer(config, layer_number=1)
    in_model = dict(build_lm(config, seed=0).layers[1].named_parameters())
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
        assert torch.equal(a, in_model[name]), name  # the model's layer 1 at the same seed
    other_seed = dict(SessaLayer(config, layer_number=1, init_seed=7).named_parameters())
    assert not torch.equal(other_seed["in_proj.weight"], first.in_proj.weight)
    lm = SessaLM(config)  # built directly: initialised too (seed 0), embedding included
    assert all(torch.isfinite(p).all() for p in lm.parameters())
    assert torch.equal(lm.embedding.weight, build_lm(config, seed=0).embedding.weight)


def test_without_feedback_the_layer_is_the_forward_branch():
    config = small_config(feedback=False)
    layer = SessaLayer(config).double()
    names = {name for name, _ in layer.named_parameters()}
    assert not {n for n in names if "fb_" in n or "gamma" in n}
    assert not any("fb_" in key or "gamma" in key for key in layer.sharded_state_dict())
    with_feedback = SessaLayer(small_config()).double()
    with torch.no_grad():  # same weights, and gamma = 0: the feedback branch adds nothing
        for name, param in layer.named_parameters():
            dict(with_feedback.named_parameters())[name].copy_(param)
        with_feedback.mixer.gamma_bias.zero_()
        with_feedback.mixer.gamma_ctx.weight.zero_()
    x = torch.randn(40, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x)[0], with_feedback(x)[0], atol=1e-12, rtol=1e-12)


def test_without_feedback_prefill_and_decode_match_full_forward():
    config = small_config(feedback=False)
    model = build_lm(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        logits, caches = model(tokens[:, :12], caches=empty_caches(model, 2))
        steps = [logits]
        for t in range(12, 20):
            logits, caches = model(tokens[:, t : t + 1], caches=caches)
            steps.append(logits)
    assert caches[0].feedback_keys is None and caches[0].feedback_states is None
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_perform_initialization_false_leaves_the_draw_to_the_caller(monkeypatch):
    from model import init as model_init
    from model import megatron_config

    drawn = []
    monkeypatch.setattr(model_init, "_draw", lambda *args: drawn.append(args[0]) or torch.zeros(args[1]))
    config = small_config()
    SessaLM(config, megatron_config(config, perform_initialization=False))
    SessaLayer(config, megatron_config(config, perform_initialization=False))
    assert not drawn
    SessaLayer(config)
    assert "layers.0.in_proj.weight" in drawn
