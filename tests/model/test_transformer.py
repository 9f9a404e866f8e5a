"""The Transformer++ arm (model/transformer.py): interface parity with SessaLM, causality, checkpoints,
the fused attention core against megatron's unfused one, packed documents, cached decoding, TP=2."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.config import ModelConfig

HERE = Path(__file__).parent
TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


@pytest.fixture(scope="module", autouse=True)
def cpu_megatron():
    if not torch.cuda.is_available():
        from model import cpu_compat

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


def build_with(layer_spec=None, dtype=torch.float64, seed=0, **fields):
    """A TransformerLM with the given layer spec (None: the fused default), initialised then cast."""
    from model.parallel import ensure_model_parallel
    from model.transformer import TransformerLM, init_model_weights, transformer_megatron_config

    config = ModelConfig(**{"arch": "transformer", "vocab_size": 300, "hidden_size": 64, "num_layers": 2,
                            "num_heads": 4, "num_kv_heads": 2} | fields)
    ensure_model_parallel()
    model = TransformerLM(config, transformer_megatron_config(config), layer_spec=layer_spec)
    init_model_weights(model, seed)
    return model.to(dtype)


def local_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def logits_and_grads(model, tokens, **kwargs):
    """Logits and every parameter's gradient of a fixed random projection of them."""
    model.zero_grad()
    logits = model(tokens, **kwargs)
    weights = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(7))
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kv_heads", [2, 4, 1], ids=["gqa", "mha", "mqa"])
def test_fused_attention_equals_megatron_local_attention(dtype, kv_heads):
    fused, local = build_with(dtype=dtype, num_kv_heads=kv_heads), build_with(local_spec(), dtype, num_kv_heads=kv_heads)
    assert fused.state_dict().keys() == local.state_dict().keys()
    assert fused.sharded_state_dict().keys() == local.sharded_state_dict().keys()
    tokens = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(3))
    logits, grads = logits_and_grads(fused, tokens)
    expected, expected_grads = logits_and_grads(local, tokens)
    torch.testing.assert_close(logits, expected, **TOLERANCES[dtype])
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCES[dtype], msg=name)
    torch.testing.assert_close(fused(tokens, tokens), local(tokens, tokens), **TOLERANCES[torch.float32])


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return out


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "megatron_local"])
def test_causal_attention_never_holds_a_sequence_by_sequence_tensor(fused):
    T = 97  # no other dimension of the model has this size
    model = build_with(None if fused else local_spec(), torch.float32)
    tokens = torch.randint(0, 300, (1, T + 1), generator=torch.Generator().manual_seed(4))
    with ShapeRecorder() as recorder:
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    square = [shape for shape in recorder.shapes if shape.count(T) >= 2]
    assert bool(square) != fused, square[:3]  # the recorder does see megatron's T x T scores


def packed_documents(lengths_per_row):
    from model.documents import positions_from_doc_ids

    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths_per_row])
    return doc_ids, positions_from_doc_ids(doc_ids)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_packed_documents_equal_each_document_alone(dtype):
    model = build_with(dtype=dtype)
    lengths = [[5, 1, 9, 7], [13, 1, 8]]
    doc_ids, positions = packed_documents(lengths)
    tokens = torch.randint(0, 300, (2, 22), generator=torch.Generator().manual_seed(5))
    model.zero_grad()
    packed = model(tokens, doc_ids=doc_ids, position_ids=positions)
    weights = torch.randn(packed.shape, dtype=dtype, generator=torch.Generator().manual_seed(6))
    (packed * weights).sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for row, row_lengths in enumerate(lengths):
        start = 0
        for length in row_lengths:
            piece = slice(start, start + length)
            alone = model(tokens[row:row + 1, piece])
            torch.testing.assert_close(packed[row:row + 1, piece], alone, **TOLERANCES[dtype])
            (alone * weights[row:row + 1, piece]).sum().backward()  # gradients accumulate over documents
            start += length
    for name, p in model.named_parameters():  # sums over all positions: tolerance relative to the tensor's scale
        tolerance = TOLERANCES[dtype]["atol"]
        torch.testing.assert_close(packed_grads[name], p.grad, atol=tolerance * p.grad.abs().max().item(),
                                   rtol=tolerance, msg=name)


def test_default_positions_and_one_document_reproduce_the_plain_forward():
    model = build_with(dtype=torch.float64)
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(8))
    plain = model(tokens)
    torch.testing.assert_close(model(tokens, position_ids=torch.arange(20).expand(2, 20)), plain, atol=0, rtol=0)
    one_doc = model(tokens, doc_ids=torch.zeros(2, 20, dtype=torch.int32))
    torch.testing.assert_close(one_doc, plain, **TOLERANCES[torch.float64])
    shifted = model(tokens, position_ids=torch.arange(3, 23).expand(2, 20))  # RoPE is relative
    torch.testing.assert_close(shifted, plain, atol=1e-7, rtol=1e-6)  # megatron's RoPE angles are float32
    with pytest.raises(ValueError, match=r"doc_ids must have shape \[batch, seq_len\]"):
        model(tokens, doc_ids=torch.zeros(2, 19, dtype=torch.int64))
    with pytest.raises(ValueError, match="doc_ids must be an integer tensor"):
        model(tokens, doc_ids=torch.zeros(2, 20))


def generate_without_cache(model, prompt, max_new_tokens, **sampling):
    """The reference: a full forward over everything so far for every new token."""
    from model.generation import sample_next_token

    tokens = prompt
    for _ in range(max_new_tokens):
        last = model(tokens)[:, -1, :model.sessa.vocab_size]
        tokens = torch.cat((tokens, sample_next_token(last, **sampling)[:, None]), dim=1)
    return tokens


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_k=40, top_p=0.95)],
                         ids=["greedy", "sampled"])
def test_cached_generation_equals_full_forward(sampling):
    from model.generation import generate

    model = build_with(dtype=torch.float64)
    prompt = torch.randint(0, 300, (3, 6), generator=torch.Generator().manual_seed(9))
    expected = generate_without_cache(model, prompt, 10, **sampling,
                                      **({"generator": torch.Generator().manual_seed(1)} if sampling["temperature"] else {}))
    out = generate(model, prompt, 10, **sampling,
                   **({"generator": torch.Generator().manual_seed(1)} if sampling["temperature"] else {}))
    assert torch.equal(out, expected)
    assert model.training  # decoding ran megatron's inference path in eval mode and restored the mode
    caches = model.empty_caches(3, 16)
    logits, caches = model(prompt, caches=caches)
    torch.testing.assert_close(logits[:, -1], model(prompt)[:, -1], **TOLERANCES[torch.float64])
    assert caches.sequence_len_offset == 6
    with pytest.raises(ValueError, match="with caches"):
        model(prompt, caches=caches, doc_ids=torch.zeros(3, 6, dtype=torch.int64))


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "tp2.pt"
    env = {**os.environ, "PYTHONPATH": f"{HERE.parents[1]}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(HERE / "transformer_tp_worker.py"), str(out)], env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


def tp_cases():
    from tp_case import CASES

    return [(name, dataclasses.replace(config, arch="transformer"), sp, packed)
            for name, config, sp, packed in CASES if config.feedback]


@pytest.mark.slow
@pytest.mark.parametrize("case", tp_cases(), ids=[c[0] for c in tp_cases()])
def test_tensor_parallel_two_ranks_matches_one(tp2_results, case):
    from tp_case import make_documents, make_tokens

    from model.parallel import ensure_model_parallel
    from model.transformer import TransformerLM, init_model_weights, transformer_megatron_config

    name, config, _, packed = case
    ensure_model_parallel()
    tp2 = tp2_results[name]
    model = TransformerLM(config, transformer_megatron_config(config, params_dtype=torch.float64))
    init_model_weights(model, seed=3)
    tokens, documents = make_tokens(config), make_documents(packed)
    loss = model(tokens[:, :-1], tokens[:, 1:], **documents).mean()
    loss.backward()
    # The model runs in float64 but megatron's vocab-parallel cross entropy works in float32.
    torch.testing.assert_close(tp2["loss"], loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tp2["logits"], model(tokens[:, :-1], **documents).detach(), atol=1e-12, rtol=1e-12)
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(tp2["grads"][param_name], param.grad, atol=1e-8, rtol=1e-6, msg=param_name)
    if "generated" in tp2:
        from model.generation import generate

        assert torch.equal(tp2["generated"], generate(model, tokens[:, :5], 6, temperature=0))


def llama_state_dict(state_dict: dict, config: ModelConfig) -> dict:
    """Full TransformerLM tensors, named and laid out as a one-process model's `state_dict()` ->
    `LlamaForCausalLM` names, vocabulary padding removed (linear_fc1 is [gate; up])."""
    from model.transformer import split_qkv

    out = {"model.embed_tokens.weight": state_dict["embedding.word_embeddings.weight"][:config.vocab_size],
           "model.norm.weight": state_dict["decoder.final_layernorm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state_dict["output_layer.weight"][:config.vocab_size]
    for n in range(config.num_layers):
        ours, theirs = f"decoder.layers.{n}.", f"model.layers.{n}."
        q, k, v = split_qkv(state_dict[ours + "self_attention.linear_qkv.weight"], config)
        gate, up = state_dict[ours + "mlp.linear_fc1.weight"].chunk(2)
        out |= {
            theirs + "input_layernorm.weight": state_dict[ours + "input_layernorm.weight"],
            theirs + "self_attn.q_proj.weight": q,
            theirs + "self_attn.k_proj.weight": k,
            theirs + "self_attn.v_proj.weight": v,
            theirs + "self_attn.o_proj.weight": state_dict[ours + "self_attention.linear_proj.weight"],
            theirs + "post_attention_layernorm.weight": state_dict[ours + "pre_mlp_layernorm.weight"],
            theirs + "mlp.gate_proj.weight": gate,
            theirs + "mlp.up_proj.weight": up,
            theirs + "mlp.down_proj.weight": state_dict[ours + "mlp.linear_fc2.weight"],
        }
    return {name: tensor.contiguous() for name, tensor in out.items()}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_llama_export_matches_and_generates_with_a_cache(tie):
    """The arm is Llama: the converted weights give the same logits, and HF generate() (KV cache)
    gives our cached greedy generation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.generation import generate
    from model.transformer import llama_config_dict

    model = build_with(dtype=torch.float32, tie_embeddings=tie)
    fields = {k: v for k, v in llama_config_dict(model.sessa).items() if k not in ("model_type", "architectures")}
    hf = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).eval()
    missing, unexpected = hf.load_state_dict(llama_state_dict(model.state_dict(), model.sessa), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set())
    tokens = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens)[..., :300], **TOLERANCES[torch.float32])
        out = hf.generate(tokens[:, :5], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0,
                          return_dict_in_generate=True)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 12
    assert torch.equal(out.sequences, generate(model, tokens[:, :5], 8, temperature=0))


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_megatron_recompute_with_packed_documents_is_exact(recompute):
    """megatron's activation recomputation re-runs SDPAttention with the doc ids (a tensor through
    its checkpoint function): the same logits and gradients."""
    from model.parallel import ensure_model_parallel
    from model.transformer import TransformerLM, init_model_weights, transformer_megatron_config

    config = ModelConfig(arch="transformer", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    ensure_model_parallel()
    fields = {"recompute_granularity": recompute} | (
        {"recompute_method": "uniform", "recompute_num_layers": 1} if recompute == "full" else {})
    models = [TransformerLM(config, transformer_megatron_config(config, **extra)) for extra in ({}, fields)]
    doc_ids, positions = packed_documents([[5, 1, 9, 7], [13, 1, 8]])
    tokens = torch.randint(0, 300, (2, 22), generator=torch.Generator().manual_seed(12))
    results = []
    for model in models:
        init_model_weights(model, 0)
        model.double()
        results.append(logits_and_grads(model, tokens, doc_ids=doc_ids, position_ids=positions))
    (plain, plain_grads), (again, again_grads) = results
    torch.testing.assert_close(again, plain, atol=0, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(again_grads[name], grad, **TOLERANCES[torch.float64], msg=name)
