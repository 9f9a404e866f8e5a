"""Hybrid stacks (model.layer_pattern, model/blocks.py): Sessa (S), attention (*), SwiGLU MLP (-) and
Mamba-2 (M; more in test_mamba.py) blocks.

Each block type alone and mixed: TP=2 == TP=1 (tp_worker.py), pipeline stages == one process with
global block numbers in checkpoint keys, prefill + decode == full forward, packed == alone, the FLOP
ledger == FlopCounterMode, `*-*-` == the Transformer arm in parameters and FLOPs, an empty pattern
== today's model, and bad input errors.
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from tp_case import HYBRID_CASES, make_documents, make_tokens

from model import ModelConfig, SessaLM, count_parameters, init_weights
from model.blocks import AttentionBlock, MLPBlock
from model.documents import positions_from_doc_ids
from model.flops import flop_counter_formulas, ledger
from model.generation import empty_caches, generate
from model.init import global_named_parameters
from model.layer import SessaLayer

HERE = Path(__file__).parent


def config(pattern: str = "S*-S", **fields) -> ModelConfig:
    base = dict(vocab_size=61, hidden_size=32, num_layers=len(pattern) or 3, num_heads=4, num_kv_heads=2,
                feedback_impl="chunked", feedback_chunk_size=8, ffn_hidden_size=48, layer_pattern=pattern)
    return ModelConfig(**(base | fields))


def tokens(length: int = 17, batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fields, match", [
    (dict(layer_pattern="S*x-"), r"model.layer_pattern 'S\*x-' has unknown block character\(s\) \['x'\]; valid "
                                 r"ones: 'S' \(Sessa block\), '\*' \(attention block\), '-' \(SwiGLU MLP block\), "
                                 r"'M' \(Mamba-2 block\)"),
    (dict(layer_pattern="S*-", num_layers=4), r"model.num_layers \(4\) must equal the length of "
                                              r"model.layer_pattern 'S\*-' \(3\)"),
    (dict(layer_pattern="S-", ffn_hidden_size=0), r"model.layer_pattern 'S-' has MLP blocks \('-'\) but "
                                                  r"model.ffn_hidden_size \(0\) is not a positive integer"),
    (dict(layer_pattern="*-", arch="transformer"), r"model.layer_pattern is for model.arch 'sessa'"),
])
def test_bad_patterns_are_refused(fields, match):
    base = dict(vocab_size=61, hidden_size=32, num_layers=len(fields["layer_pattern"]), num_heads=4)
    with pytest.raises(ValueError, match=match):
        ModelConfig(**(base | fields))


def test_tensor_parallel_size_must_divide_the_mlp_width():
    with pytest.raises(ValueError, match=r"ffn_hidden_size \(51\) must be divisible by the tensor-parallel size \(2\)"):
        config("S-", ffn_hidden_size=51).check_tensor_parallel(2)


def test_empty_pattern_is_todays_model():
    """"" and "SSS" build the same Sessa layers: parameters, keys and outputs bit for bit."""
    today, spelled = SessaLM(config("", num_layers=3), init_seed=2), SessaLM(config("SSS"), init_seed=2)
    assert all(isinstance(layer, SessaLayer) for layer in today.layers)
    assert isinstance(today.final_norm, torch.nn.LayerNorm)
    assert list(today.sharded_state_dict()) == list(spelled.sharded_state_dict())
    for (name, a), (_, b) in zip(today.state_dict().items(), spelled.state_dict().items()):
        assert a is None and b is None or torch.equal(a, b), name
    torch.testing.assert_close(today(tokens()), spelled(tokens()), atol=0, rtol=0)


@pytest.mark.parametrize("pattern", ["S*-S", "*-*-", "--", "S-", ""])
def test_parameter_counter_matches_module(pattern):
    for fields in (dict(), dict(feedback=False, tie_embeddings=False, num_heads=1, num_kv_heads=1)):
        cfg = config(pattern, **fields)
        model = SessaLM(cfg)
        assert count_parameters(cfg) == sum(p.numel() for p in model.parameters()), (pattern, fields)


def test_blocks_are_initialised_independently_of_the_layout():
    cfg = config("S*-S")
    model = dict(global_named_parameters(SessaLM(cfg, init_seed=3)))
    for block in (AttentionBlock(cfg, SessaLM(cfg).config, 1, init_seed=3),
                  MLPBlock(cfg, SessaLM(cfg).config, 2, init_seed=3)):
        for name, param in global_named_parameters(block):
            assert torch.equal(param, model[name]), name
    stage = SessaLM(cfg, pre_process=False, layer_numbers=[2, 3], init_seed=3)
    for name, param in global_named_parameters(stage):
        assert torch.equal(param, model["embedding.weight" if name == "output_layer.weight" else name]), name
    # residual outputs are scaled down, norms start at one
    assert model["layers.1.out_proj.weight"].std() < model["layers.1.q_proj.weight"].std()
    assert torch.equal(model["layers.2.norm.weight"], torch.ones(32))


@pytest.mark.parametrize("pattern, feedback", [("S*-S", True), ("*-S-", False), ("**", True)])
def test_prefill_and_decode_match_full_forward(pattern, feedback):
    model = SessaLM(config(pattern, feedback=feedback), init_seed=1).double()
    ids = tokens(13)
    full = model(ids)
    logits, caches = model(ids[:, :6], caches=empty_caches(model, 2))
    pieces = [logits]
    for t in range(6, 13):
        logits, caches = model(ids[:, t:t + 1], caches=caches)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-10, rtol=1e-10)
    greedy = generate(model, ids[:, :4], 5, temperature=0)
    assert greedy.shape == (2, 9)


def test_packed_documents_equal_each_document_alone():
    model = SessaLM(config("*S-*"), init_seed=6).double()
    lengths = [5, 9, 3]
    ids = tokens(sum(lengths), batch=1)
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    packed = model(ids, doc_ids=doc_ids, position_ids=positions_from_doc_ids(doc_ids))
    alone = torch.cat([model(piece) for piece in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-12, rtol=1e-12)


def test_pipeline_stages_equal_one_process_with_global_block_numbers():
    cfg = config("S*-S-*")
    whole = SessaLM(cfg, init_seed=4).double()
    first = SessaLM(cfg, post_process=False, layer_numbers=[0, 1], init_seed=4).double()
    last = SessaLM(cfg, pre_process=False, layer_numbers=[2, 3, 4, 5], init_seed=4).double()
    ids = tokens(17)
    doc_ids = torch.repeat_interleave(torch.arange(2), torch.tensor([9, 7]))[None].expand(2, -1)
    documents = {"doc_ids": doc_ids, "position_ids": positions_from_doc_ids(doc_ids)}
    last.set_input_tensor(first(ids[:, :-1], **documents))
    staged = last(None, ids[:, 1:], **documents)
    torch.testing.assert_close(staged, whole(ids[:, :-1], ids[:, 1:], **documents), atol=1e-12, rtol=1e-12)
    def checkpoint_keys(model):  # the tied output replica on the last stage is saved as the embedding
        return {tensor.key for tensor in model.sharded_state_dict().values() if hasattr(tensor, "key")}

    assert checkpoint_keys(first) | checkpoint_keys(last) == checkpoint_keys(whole)
    assert "layers.4.gate_proj.weight" in last.sharded_state_dict()
    # a stage loads the whole model's state dict keyed by global block numbers
    restored = SessaLM(cfg, pre_process=False, layer_numbers=[2, 3, 4, 5], init_seed=9).double()
    state = {k: v for k, v in whole.state_dict().items() if not k.startswith("embedding")
             and (not k.startswith("layers.") or int(k.split(".")[1]) >= 2)}
    restored.load_global_state_dict(state | {"output_layer.weight": whole.embedding.weight})
    restored.set_input_tensor(first(ids[:, :-1]))
    last.set_input_tensor(first(ids[:, :-1]))
    torch.testing.assert_close(restored(None, ids[:, 1:]), last(None, ids[:, 1:]), atol=0, rtol=0)


def test_attention_mlp_stack_equals_the_transformer_arm_in_parameters_and_flops():
    transformer = ModelConfig(arch="transformer", vocab_size=300, hidden_size=64, num_layers=3, num_heads=4,
                              num_kv_heads=2)
    hybrid = dataclasses.replace(transformer, arch="sessa", num_layers=6, layer_pattern="*-" * 3)
    assert count_parameters(hybrid) == count_parameters(ModelConfig(**{**transformer.to_dict(), "arch": "sessa",
                                                                       "num_layers": 6, "layer_pattern": "*-*-*-"}))
    from model.transformer import count_transformer_parameters

    assert count_parameters(hybrid) == count_transformer_parameters(transformer)
    for T in (64, 2048):
        a, b = ledger(hybrid, T), ledger(transformer, T)
        assert a.forward == b.forward
        assert a.params == b.params and a.params_non_embedding == b.params_non_embedding
        assert a.all_conventions() == b.all_conventions()


def _flops(model, ids, backward: bool) -> int:
    with FlopCounterMode(display=False, custom_mapping=flop_counter_formulas()) as counter:
        loss = model(ids, ids)
        if backward:
            loss.mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("pattern, fields", [("S*-S", {}), ("*--*", {}), ("-S*", dict(feedback=False)),
                                             ("S-", dict(num_heads=1, num_kv_heads=1, tie_embeddings=False))])
def test_ledger_matches_flop_counter(pattern, fields):
    cfg = config(pattern, vocab_size=300, hidden_size=64, ffn_hidden_size=96, feedback_chunk_size=16, **fields)
    model = SessaLM(cfg, init_seed=0)
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    book = ledger(cfg, 64)
    # exact: the tolerance only absorbs float rounding of the ledger's per-token division
    assert _flops(model, ids, False) == pytest.approx(128 * book.per_token("hardware", training=False), rel=1e-12)
    assert _flops(model, ids, True) == pytest.approx(128 * book.per_token("hardware"), rel=1e-12)
    assert book.per_token("model") <= book.per_token("hardware") * 1.0001


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "tp2.pt"
    env = {**os.environ, "PYTHONPATH": f"{HERE.parents[1]}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(HERE / "tp_worker.py"), str(out), "hybrid"], env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("case", HYBRID_CASES, ids=[c[0] for c in HYBRID_CASES])
def test_tensor_parallel_two_ranks_matches_one(tp2_results, case):
    name, cfg, _, packed = case
    tp2 = tp2_results[name]
    model = SessaLM(cfg).double()
    init_weights(model, seed=3)
    ids, documents = make_tokens(cfg), make_documents(packed)
    loss = model(ids[:, :-1], ids[:, 1:], **documents).mean()
    loss.backward()
    torch.testing.assert_close(tp2["loss"], loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tp2["logits"], model(ids[:, :-1], **documents).detach(), atol=1e-12, rtol=1e-12)
    for param_name, param in global_named_parameters(model):
        torch.testing.assert_close(tp2["grads"][param_name], param.grad, atol=1e-8, rtol=1e-6, msg=param_name)


@pytest.mark.parametrize("mode, pattern", [("selective", "S*-"), ("full", "S*-"), ("full", "SM-")])
def test_recompute_is_exact_for_a_hybrid_stack(mode, pattern):
    from model.recompute import recompute_blocks, torch_checkpoint

    def loss_and_grads(recompute: str):
        model = SessaLM(config(pattern, mamba_state_size=8, mamba_head_size=16, mamba_chunk_size=5), init_seed=3)
        recompute_blocks(model, recompute, torch_checkpoint)
        ids = tokens(25)
        loss = model(ids[:, :-1], ids[:, 1:]).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    base_loss, base_grads = loss_and_grads("none")
    loss, grads = loss_and_grads(mode)
    assert torch.equal(loss, base_loss)
    for name, grad in base_grads.items():
        assert torch.equal(grads[name], grad), name


@pytest.mark.parametrize("block", ["S", "M", "*", "-"])
def test_recompute_keeps_less_for_every_block_type(block):
    """Equal losses also hold when recompute does nothing: count what autograd keeps for the backward
    of one block (memory_worker.saved_bytes, the measure the memory tests use). Under "full" the
    block keeps nothing (its input is held by the checkpoint, outside autograd's saved tensors), so
    the only bytes left are the block output that the test's loss squares: x's size. "selective"
    recomputes only a Sessa block's mixer and leaves `M`, `*` and `-` blocks as they are
    (model/recompute.py)."""
    from model.recompute import recompute_blocks, torch_checkpoint
    from tests.scaling.memory_worker import saved_bytes

    kept = {}
    for mode in ("none", "selective", "full"):
        model = SessaLM(config(block, **MAMBA), init_seed=3)
        recompute_blocks(model, mode, torch_checkpoint)
        x = torch.randn(24, 2, 32, requires_grad=True, generator=torch.Generator().manual_seed(0))
        kept[mode] = saved_bytes(model.layers[0], x)
    assert kept["full"] == x.numel() * x.element_size(), kept
    assert kept["none"] > 4 * kept["full"], kept  # norm, projections, activations: several block widths
    if block == "S":
        assert kept["full"] < kept["selective"] < kept["none"], kept
    else:
        assert kept["selective"] == kept["none"], kept


def test_reference_export_refuses_non_sessa_blocks():
    from model.reference import reference_layer_kwargs

    with pytest.raises(ValueError, match=r"reference format holds only Sessa layers but model.layer_pattern "
                                         r"'S\*-' has \['\*', '-'\] blocks"):
        reference_layer_kwargs(config("S*-"))
    assert reference_layer_kwargs(config("SS"))["D"] == 32  # an all-Sessa pattern still exports


MAMBA = dict(mamba_state_size=8, mamba_head_size=16, mamba_chunk_size=4)  # tiny `M` blocks (model/mamba.py)


@pytest.mark.parametrize("pattern", ["S-*-S*", "SM*-", "M-M-"])
def test_hf_modeling_file_builds_the_same_pattern(pattern):
    """The HF export's modeling file (checkpoints/hf) with the layout table's names: the same logits
    as the native model for a mixed pattern, padded or not, and cached greedy generation."""

    from checkpoints import layout
    from checkpoints.hf.configuration_sessa import ModelConfig as HFConfig
    from checkpoints.hf.modeling_sessa import SessaForCausalLM

    cfg = config(pattern, feedback_chunk_size=4, **MAMBA)
    native = SessaLM(cfg, init_seed=7).double()
    state = {k: v for k, v in native.state_dict().items() if isinstance(v, torch.Tensor)}
    entries = layout.entries(cfg, {k: tuple(v.shape) for k, v in state.items()})
    hf_state = {e.target: layout.fuse(e, state, cfg) for e in entries}
    hf = SessaForCausalLM(HFConfig(**layout.hf_config_dict(cfg, torch.float32, None))).double().eval()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.lm_head.weight = hf.model.embed_tokens.weight
    ids = tokens(11)
    with torch.no_grad():
        ours = native(ids)[..., :cfg.vocab_size]
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-10, rtol=1e-10)
    greedy = hf.generate(ids[:1, :4], max_new_tokens=7, min_new_tokens=7, do_sample=False)
    assert torch.equal(greedy, generate(native, ids[:1, :4], 7, temperature=0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the row's logits equal its prompt alone
    with torch.no_grad():
        padded = hf(ids, attention_mask=mask).logits[1, 3:]
        alone = hf(ids[1:, 3:]).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-10, rtol=1e-10)
    # cached generation of the padded batch: the padded row continues as its prompt alone
    batch = hf.generate(ids[:, :7], attention_mask=mask[:, :7], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    row = hf.generate(ids[1:, 3:7], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(batch[1, 7:], row[0, 4:])
