"""Mamba-2 blocks (`M` of model.layer_pattern, model/mamba.py), alone and mixed with the other blocks.

Packed documents == each document alone, prefill + decode == full forward, seeded layout-independent
init (Mamba-2's A, dt and D ranges), parameter counts, the FLOP ledger == FlopCounterMode, the
checkpoint's tensor-parallel sharding, the HF modeling file (logits, greedy generation, padded
batches), transformers' own Mamba-2 (an implementation this project did not write) and bad input.
TP=2 == TP=1 runs in tests/model/test_hybrid.py (tp_case.HYBRID_CASES).
"""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, SessaLM, count_parameters
from model.documents import positions_from_doc_ids
from model.flops import flop_counter_formulas, ledger
from model.generation import empty_caches, generate
from model.init import global_named_parameters
from model.mamba import MambaBlock, MambaCache


def config(pattern: str = "SM*-", **fields) -> ModelConfig:
    base = dict(vocab_size=61, hidden_size=32, num_layers=len(pattern), num_heads=4, num_kv_heads=2,
                feedback_impl="chunked", feedback_chunk_size=8, ffn_hidden_size=48, layer_pattern=pattern,
                mamba_state_size=8, mamba_head_size=16, mamba_chunk_size=5)
    return ModelConfig(**(base | fields))


def tokens(length: int = 17, batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", ["M-M-", "SM*-"])
def test_packed_documents_equal_each_document_alone(pattern):
    """The conv never mixes documents and the SSD state resets at each start (boundaries inside
    and at the edges of the 5-position SSD chunks, a one-token document)."""
    model = SessaLM(config(pattern), init_seed=6).double()
    lengths = [5, 9, 1, 6]
    ids = tokens(sum(lengths), batch=1)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    packed = model(ids, doc_ids=doc_ids, position_ids=positions_from_doc_ids(doc_ids))
    alone = torch.cat([model(piece) for piece in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pattern", ["M", "SM*-", "M-M-"])
def test_prefill_and_decode_match_full_forward(pattern):
    model = SessaLM(config(pattern), init_seed=1).double()
    ids = tokens(13)
    full = model(ids)
    caches = empty_caches(model, 2)
    assert isinstance(caches[pattern.index("M")], MambaCache)
    logits, caches = model(ids[:, :7], caches=caches)  # 7: a ragged last SSD chunk
    pieces = [logits]
    for t in range(7, 13, 3):  # several tokens per step continue the conv and the state too
        logits, caches = model(ids[:, t:t + 3], caches=caches)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-10, rtol=1e-10)
    greedy = generate(model, ids[:, :4], 5, temperature=0)
    assert torch.equal(greedy[:, :4], ids[:, :4]) and greedy.shape == (2, 9)


def test_doc_ids_with_a_cache_are_refused():
    model = SessaLM(config("M"), init_seed=1)
    block = model.layers[0]
    with pytest.raises(ValueError, match="doc_ids with a decoding cache"):
        block(torch.zeros(3, 1, 32), block.empty_cache(1, torch.float32, "cpu"), doc_ids=torch.zeros(1, 3))


def test_blocks_are_initialised_independently_of_the_layout_as_mamba2():
    cfg = config("SM*-M")
    model = dict(global_named_parameters(SessaLM(cfg, init_seed=3)))
    block = MambaBlock(cfg, SessaLM(cfg).config, 4, init_seed=3)
    for name, param in global_named_parameters(block):
        assert torch.equal(param, model[name]), name
    assert not torch.equal(model["layers.1.A_log"], model["layers.4.A_log"])  # seeded per block
    big = ModelConfig(vocab_size=61, hidden_size=256, num_layers=1, num_heads=4, layer_pattern="M",
                      mamba_head_size=8, init_scheme="reference")
    params = dict(global_named_parameters(SessaLM(big, init_seed=0)))
    A = params["layers.0.A_log"].exp()
    assert A.shape == (64,) and A.min() >= 1 and A.max() <= 16 and A.max() - A.min() > 10
    dt = torch.nn.functional.softplus(params["layers.0.dt_bias"])
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.log().std() > 0.8  # log-uniform over two decades: std ln(100) / sqrt(12) = 1.33
    assert torch.equal(params["layers.0.D"], torch.ones(64))
    assert torch.equal(params["layers.0.out_norm.weight"], torch.ones(512))
    bound = 1 / math.sqrt(4)  # nn.Conv1d's default for a depthwise kernel of 4
    assert params["layers.0.conv_x.weight"].abs().max() <= bound and params["layers.0.conv_x.bias"].std() > 0.2


@pytest.mark.parametrize("pattern", ["M", "SM*-", "M-M-"])
def test_parameter_counter_matches_module(pattern):
    for fields in (dict(), dict(tie_embeddings=False, mamba_expand=1, mamba_conv_kernel=2)):
        cfg = config(pattern, **fields)
        assert count_parameters(cfg) == sum(p.numel() for p in SessaLM(cfg).parameters()), (pattern, fields)


def _flops(model, ids, backward: bool) -> int:
    with FlopCounterMode(display=False, custom_mapping=flop_counter_formulas()) as counter:
        loss = model(ids, ids)
        if backward:
            loss.mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("pattern, T", [("M-M-", 64), ("SM*-", 50)])
def test_ledger_matches_flop_counter(pattern, T):
    cfg = config(pattern, vocab_size=300, hidden_size=64, ffn_hidden_size=96, feedback_chunk_size=16,
                 mamba_state_size=16, mamba_chunk_size=16)
    model = SessaLM(cfg, init_seed=0)
    ids = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(0))
    book = ledger(cfg, T)
    assert _flops(model, ids, False) / (2 * T) == pytest.approx(book.per_token("hardware", training=False), rel=1e-6)
    assert _flops(model, ids, True) / (2 * T) == pytest.approx(book.per_token("hardware"), rel=1e-6)
    assert book.per_token("model") <= book.per_token("hardware")
    assert book.forward["ssm_scan"] == cfg.num_layers // 2 * 4 * cfg.mamba_heads * 16 * 16 * (pattern.count("M") / 2)
    tp2 = ledger(cfg, T, tensor_parallel=2)  # C.B of the one B/C group is computed on every rank
    assert tp2.hardware_forward["ssm_scores"] == 2 * book.hardware_forward["ssm_scores"]
    assert tp2.hardware_forward["ssm_scan"] == book.hardware_forward["ssm_scan"]


def test_layout_table_names_every_tensor_with_its_split():
    """checkpoints/layout.py (export, import, the torch_dist layout check) names every `M` tensor with
    the dim model.init and the checkpoint split it along (None: replicated)."""
    from checkpoints import layout

    cfg = config("SM")
    params = dict(global_named_parameters(SessaLM(cfg)))
    rules = {r.native[0].format(n=1): r.tp for r in layout.rules(cfg) if r.block == "M"}
    assert set(rules) == {n for n in params if n.startswith("layers.1.")}
    for name, tp in rules.items():
        param = params[name]
        assert (param.partition_dim if getattr(param, "tensor_model_parallel", False) else None) == tp, name


@pytest.mark.slow
def test_checkpoint_saved_at_two_ranks_loads_at_one(tmp_path):
    """A torch_dist checkpoint of a mixed pattern written at TP=2 (mamba_tp_worker.py) loads into the
    one-process model: every tensor equals the one-process init of the same seed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from megatron.core import dist_checkpointing

    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{here.parents[1]}{os.pathsep}{here}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(here / "mamba_tp_worker.py"), str(tmp_path)], env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    from mamba_tp_worker import CHECKPOINT_CONFIG

    expected = SessaLM(CHECKPOINT_CONFIG, init_seed=3)
    loaded = SessaLM(CHECKPOINT_CONFIG, init_seed=None)
    state = dist_checkpointing.load(loaded.sharded_state_dict(), str(tmp_path))
    loaded.load_global_state_dict({k: v for k, v in state.items() if not k.endswith("_extra_state")})
    for (name, a), (_, b) in zip(global_named_parameters(loaded), global_named_parameters(expected)):
        assert torch.equal(a, b), name


def test_bad_mamba_settings_are_refused():
    with pytest.raises(ValueError, match=r"model.layer_pattern 'M-' has Mamba-2 blocks \('M'\) but their inner "
                                         r"width mamba_expand \* hidden_size = 64 is not a multiple of "
                                         r"model.mamba_head_size \(24\)"):
        config("M-", mamba_head_size=24)
    with pytest.raises(ValueError, match=r"ModelConfig.mamba_conv_kernel must be a positive integer, got 0"):
        config("M", mamba_conv_kernel=0)
    with pytest.raises(ValueError, match=r"ModelConfig.mamba_heads = mamba_expand \* hidden_size / mamba_head_size "
                                         r"\(4\) must be divisible by the tensor-parallel size \(8\)"):
        config("M", num_heads=8, num_kv_heads=8).check_tensor_parallel(8)
    with pytest.raises(ValueError, match=r"ModelConfig.mamba_state_size \(6\) must be divisible by the "
                                         r"tensor-parallel size \(4\)"):
        config("M", mamba_state_size=6, num_kv_heads=4).check_tensor_parallel(4)
    config("S", mamba_head_size=24)  # no `M` block: the Mamba fields are not used


@pytest.mark.parametrize("task", ["two-style", "diffuse-mqar"])
def test_paper_mamba2_arm_matches_the_sessa_parameter_count(task):
    """configs/paper's Mamba-2 arm (M-M-): a valid recipe, labelled Mamba-2 in the table, within 2%
    of Sessa's parameters like the other arms (tests/evaluate/test_table.py)."""
    from pathlib import Path

    from pretrain.config import load_config
    from pretrain.evaluate.table import model_label, parameter_count

    paper = Path(__file__).resolve().parents[2] / "configs" / "paper"
    mamba, sessa = (load_config(paper / f"{task}-{arm}.yaml", []).model.to_dict() for arm in ("mamba2", "sessa"))
    assert model_label(mamba) == "Mamba-2" and model_label(sessa) == "Sessa"
    assert abs(parameter_count(mamba) / parameter_count(sessa) - 1) < 0.02


def test_pipeline_stages_equal_one_process():
    """Two stages (global block numbers, packed documents) == the whole model, to 1e-12."""
    cfg = config("SM*-MM")
    whole = SessaLM(cfg, init_seed=4).double()
    first = SessaLM(cfg, post_process=False, layer_numbers=[0, 1, 2], init_seed=4).double()
    last = SessaLM(cfg, pre_process=False, layer_numbers=[3, 4, 5], init_seed=4).double()
    ids = tokens(17)
    doc_ids = torch.repeat_interleave(torch.arange(2), torch.tensor([9, 7]))[None].expand(2, -1)
    documents = {"doc_ids": doc_ids, "position_ids": positions_from_doc_ids(doc_ids)}
    last.set_input_tensor(first(ids[:, :-1], **documents))
    staged = last(None, ids[:, 1:], **documents)
    torch.testing.assert_close(staged, whole(ids[:, :-1], ids[:, 1:], **documents), atol=1e-12, rtol=1e-12)
    assert "layers.4.A_log" in last.sharded_state_dict()


@pytest.mark.parametrize("dtype, T, N, chunk", [(torch.float32, 200, 32, 64), (torch.bfloat16, 256, 64, 32)])
def test_activation_model_matches_the_saved_tensors(dtype, T, N, chunk):
    """pretrain.memory's `M` block estimate is within 2% of the bytes autograd keeps (one process)."""
    from model.parallel import ensure_model_parallel, megatron_config
    from pretrain.memory import block_activation_bytes
    from tests.scaling.memory_worker import saved_bytes

    ensure_model_parallel()  # saved_bytes runs the backward, whose tensor-parallel mappings need the state
    cfg = ModelConfig(vocab_size=256, hidden_size=128, num_layers=1, num_heads=4, layer_pattern="M",
                      mamba_state_size=N, mamba_chunk_size=chunk)
    block = MambaBlock(cfg, megatron_config(cfg, params_dtype=dtype, bf16=dtype == torch.bfloat16), 0)
    saved = saved_bytes(block, torch.randn(T, 2, 128, dtype=dtype, requires_grad=True))
    estimate = block_activation_bytes(cfg, "M", T, 2, 1, False, 4 if dtype == torch.float32 else 2)["saved"]
    assert estimate == pytest.approx(saved, rel=0.02)


def hf_mamba2_block(block: MambaBlock, cfg: ModelConfig):
    """transformers' Mamba2Block (its PyTorch path) holding `block`'s weights, in float64.

    Our block has one B/C group shared by every head and a gated RMSNorm per head (it keeps TP
    exact); HF's norm is per B/C group. With n_groups = heads and our B/C projections and convs
    repeated once per group, every group reads the same B and C, so HF's scan is ours and its
    grouped norm (group size = head size) is our per-head norm: the same function."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Block

    heads = cfg.mamba_heads
    hf_config = Mamba2Config(hidden_size=cfg.hidden_size, num_heads=heads, head_dim=cfg.mamba_head_size,
                             expand=cfg.mamba_expand, state_size=cfg.mamba_state_size, n_groups=heads,
                             conv_kernel=cfg.mamba_conv_kernel, use_conv_bias=True, use_bias=False, hidden_act="silu",
                             chunk_size=8, layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=False, num_hidden_layers=1)
    hf = Mamba2Block(hf_config, layer_idx=0).double().eval()

    def per_group(*tensors):  # our x, B, C rows, with B and C repeated for each of HF's groups
        x, B, C = (t.detach().double() for t in tensors)
        return torch.cat([x, B.repeat(heads, *[1] * (B.dim() - 1)), C.repeat(heads, *[1] * (C.dim() - 1))])

    state = {
        "norm.weight": block.norm.weight,
        "mixer.in_proj.weight": torch.cat([block.z_proj.weight.double(),
                                           per_group(block.x_proj.weight, block.B_proj.weight, block.C_proj.weight),
                                           block.dt_proj.weight.double()]),
        "mixer.conv1d.weight": per_group(block.conv_x.weight, block.conv_B.weight, block.conv_C.weight)[:, None],
        "mixer.conv1d.bias": per_group(block.conv_x.bias, block.conv_B.bias, block.conv_C.bias),
        "mixer.dt_bias": block.dt_bias, "mixer.A_log": block.A_log, "mixer.D": block.D,
        "mixer.norm.weight": block.out_norm.weight, "mixer.out_proj.weight": block.out_proj.weight,
    }
    hf.load_state_dict({name: tensor.detach().double() for name, tensor in state.items()}, strict=True)
    return hf


def mamba_block_with_random_weights(cfg: ModelConfig) -> MambaBlock:
    from model.parallel import ensure_model_parallel, megatron_config

    ensure_model_parallel()
    block = MambaBlock(cfg, megatron_config(cfg), 0).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every vector moved off its init: norm weights off 1, dt ~ softplus(N(0, 1)), not ~0.01
        for name, param in block.named_parameters():
            if param.dim() == 1:
                noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
                param.copy_(noise) if name == "dt_bias" else param.add_(noise * 0.5)
    return block


@pytest.mark.parametrize("T", [1, 23])
def test_block_matches_transformers_mamba2(T):
    """Our `M` block (fp64) against transformers' Mamba2Block, an implementation this project did not
    write, mapped as in hf_mamba2_block (n_groups = heads). HF computes its RMSNorms and its SSD scan
    in fp32 whatever the input dtype, so the tolerance is fp32 rounding of the mixer's output (about
    0.5 in size; the two differ by < 1e-7). T = 23 spans several chunks of both scans (ours 5, HF's 8,
    padded)."""
    cfg = config("M", mamba_expand=2, mamba_head_size=16, mamba_state_size=8, mamba_conv_kernel=4)
    block = mamba_block_with_random_weights(cfg)
    hf = hf_mamba2_block(block, cfg)
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        ours, _ = block(x.transpose(0, 1))
        theirs = hf(x)
    torch.testing.assert_close(ours.transpose(0, 1), theirs, atol=1e-7, rtol=1e-7)


def test_conv_matches_transformers_causal_conv1d_in_float64():
    """The depthwise causal conv alone, in fp64 (HF's conv keeps the input dtype): our K shifted
    multiply-adds against HF's PyTorch causal_conv1d_fn (F.conv1d, left padding K - 1)."""
    from transformers.models.mamba2.modeling_mamba2 import causal_conv1d_fn

    cfg = config("M")
    block = mamba_block_with_random_weights(cfg)
    channels = block.conv_x.weight.shape[0]
    u = torch.randn(2, 19, channels, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        ours, _ = block.conv_x(u, u.new_zeros(2, cfg.mamba_conv_kernel - 1, u.shape[2]), None)
        theirs = causal_conv1d_fn(u.transpose(1, 2), block.conv_x.weight, block.conv_x.bias).transpose(1, 2)
    torch.testing.assert_close(ours, theirs, atol=1e-13, rtol=1e-13)
