"""μP (model.mup, model/mup.py, docs/mup.md): `mup: false` is the model as it was, bit for bit; the
init std, Adam LR and forward multipliers of every parameter role; both engines' optimizer groups.

mup_off_expectation.json was written by the code before μP existed (commit 8072d20, with this file's
`expectation()` and torch.set_num_threads(1)): parameter digests after init and the hex losses of
three AdamW steps, for a Sessa stack with tied embeddings and an untied `S*-M` hybrid.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from model import ModelConfig, SessaLM
from model.init import global_named_parameters
from model.mup import parameter_role

HERE = Path(__file__).parent
EXPECTATION_CASES = {
    "sessa_tied": dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, feedback_impl="chunked",
                       feedback_chunk_size=8),
    "hybrid_untied": dict(vocab_size=61, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                          layer_pattern="S*-M", ffn_hidden_size=48, tie_embeddings=False, feedback_impl="chunked",
                          feedback_chunk_size=8, mamba_state_size=8, mamba_head_size=16, mamba_chunk_size=8),
}


def expectation(fields: dict) -> dict:
    """Parameter digests after init (seed 3) and the losses of three AdamW steps on one batch."""
    model = SessaLM(ModelConfig(**fields), init_seed=3)
    digests = {n: hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()
               for n, p in model.named_parameters()}
    tokens = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(11))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(3):
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item().hex())
    return {"param_sha256": digests, "losses_hex": losses}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the expectation's reductions
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", sorted(EXPECTATION_CASES))
def test_mup_off_is_the_model_before_mup_bit_for_bit(case, one_thread):
    expected = json.loads((HERE / "mup_off_expectation.json").read_text())[case]
    assert expectation(EXPECTATION_CASES[case] | {"mup": False}) == expected


def hybrid(width: int, **fields) -> ModelConfig:
    base = dict(vocab_size=61, hidden_size=width, num_layers=4, num_heads=4, num_kv_heads=2, layer_pattern="S*-M",
                ffn_hidden_size=2 * width, tie_embeddings=False, feedback_impl="chunked", feedback_chunk_size=8,
                mamba_state_size=8, mamba_head_size=16, mamba_chunk_size=8, mup=True, mup_base_width=32)
    return ModelConfig(**(base | fields))


def test_mup_at_its_base_width_is_the_standard_model():
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    standard = SessaLM(hybrid(32, mup=False, mup_base_width=None), init_seed=4)
    mup = SessaLM(hybrid(32), init_seed=4)
    for (name, a), (_, b) in zip(standard.named_parameters(), mup.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(standard(tokens), mup(tokens))


# Every parameter of an `S*-M` stack, by hand: the role docs/mup.md gives it.
ROLES = {
    "embedding.weight": "embedding", "output_layer.weight": "output", "final_norm.weight": "vector",
    "final_norm.bias": "vector",
    **{f"layers.0.{n}": "vector" for n in ("norm.weight", "norm.bias", "in_proj.bias", "gate_proj.bias",
                                           "mixer.q_proj.bias", "mixer.k_proj.bias", "mixer.v_proj.bias",
                                           "mixer.fb_q_proj.bias", "mixer.fb_k_proj.bias", "mixer.gamma_bias",
                                           "out_proj.bias")},
    **{f"layers.0.{n}": "hidden" for n in ("in_proj.weight", "gate_proj.weight", "mixer.q_proj.weight",
                                           "mixer.k_proj.weight", "mixer.v_proj.weight", "mixer.fb_q_proj.weight",
                                           "mixer.fb_k_proj.weight", "mixer.out_proj.weight", "out_proj.weight")},
    "layers.0.mixer.gamma_ctx.weight": "readout",
    "layers.1.norm.weight": "vector",
    **{f"layers.1.{n}.weight": "hidden" for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "layers.2.norm.weight": "vector",
    **{f"layers.2.{n}.weight": "hidden" for n in ("gate_proj", "up_proj", "out_proj")},
    **{f"layers.3.{n}": "vector" for n in ("norm.weight", "conv_x.weight", "conv_x.bias", "conv_B.weight",
                                           "conv_B.bias", "conv_C.weight", "conv_C.bias", "A_log", "dt_bias", "D",
                                           "out_norm.weight")},
    **{f"layers.3.{n}.weight": "hidden" for n in ("z_proj", "x_proj", "dt_proj", "out_proj")},
    "layers.3.B_proj.weight": "readout", "layers.3.C_proj.weight": "readout",
}


def test_every_parameter_has_its_role_and_init_std():
    """Width 128 = 4 x the base 32: hidden matrices draw 0.02 / 2 (out_proj also / sqrt(2 L)), readouts
    0.02 / 4, the embedding and LM head 0.02, vectors as without μP. Both models draw the same normal
    samples (one generator per parameter name), so μP's values are the standard ones times the multiplier."""
    model = SessaLM(hybrid(128), init_seed=0)
    standard = SessaLM(hybrid(128, mup=False, mup_base_width=None), init_seed=0)
    params = dict(global_named_parameters(model))
    assert {name: parameter_role(name, p.ndim) for name, p in params.items()} == ROLES
    multiplier = {"embedding": 1.0, "output": 1.0, "vector": 1.0, "hidden": 0.5, "readout": 0.25}
    for name, param in params.items():
        torch.testing.assert_close(param, standard.get_parameter(name) * multiplier[ROLES[name]], rtol=1e-6, atol=0,
                                   msg=name)
    assert params["layers.1.q_proj.weight"].std().item() == pytest.approx(0.01, rel=0.05)  # the draw itself


def test_forward_multipliers_equal_rescaled_weights():
    """μP's multipliers (queries by sqrt(d0/d), q_b by sqrt(D0/D), logits by 1/m) equal a standard model whose
    q_proj, fb_q_proj and LM head weights carry them: width 128, base 32, heads 4 -> d0 8, d 32."""
    tokens = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(2))
    # init_std 0.5: attention and feedback logits of order one, so a wrong query scale shows
    mup = SessaLM(hybrid(128, init_std=0.5), init_seed=0)
    standard = SessaLM(hybrid(128, init_std=0.5, mup=False, mup_base_width=None), init_seed=0)
    scales = {"q_proj": 0.5, "fb_q_proj": 0.5, "output_layer": 0.25}  # sqrt(8/32), sqrt(32/128), 32/128
    with torch.no_grad():
        for name, param in standard.named_parameters():
            module = name.rsplit(".", 2)[-2]
            param.copy_(mup.get_parameter(name) * scales.get(module, 1.0))
    torch.testing.assert_close(mup(tokens), standard(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields, match", [
    (dict(mup_base_width=None), r"model.mup: true needs model.mup_base_width"),
    (dict(mup_base_width=30), r"model.mup_base_width \(30\) is not divisible by num_heads \(4\); set "
                              r"model.mup_base_head_size"),
    (dict(init_scheme="reference"), r"model.mup needs model.init_scheme 'scaled'"),
    (dict(mup=False), r"model.mup_base_width / mup_base_head_size are set but model.mup is false"),
])
def test_bad_mup_settings_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        hybrid(64, **fields)


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_each_engine_steps_every_parameter_at_its_mup_learning_rate(engine, tmp_path):
    """Adam's first update moves an entry by lr * g / (|g| + eps): the largest |change| of each parameter
    after one real engine step is its group's LR, optim.lr / 4 for hidden and readout matrices at 4x the
    base width, optim.lr for the rest (no weight decay, no clipping, no warmup; an eps far below any |g|)."""
    import yaml

    from pretrain.config import load_config
    from pretrain.distributed import init_distributed, shutdown_distributed
    from pretrain.engines import engine_class
    from pretrain.state import build_scheduler

    model = {k: v for k, v in vars(hybrid(128, vocab_size=64)).items()
             if k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "layer_pattern",
                      "ffn_hidden_size", "tie_embeddings", "feedback_impl", "feedback_chunk_size", "mamba_state_size",
                      "mamba_head_size", "mamba_chunk_size", "mup", "mup_base_width")}
    recipe = {"run_name": "mup", "runs_dir": str(tmp_path), "engine": engine, "model": model,
              "train": {"max_steps": 10, "global_batch_tokens": 32, "micro_batch_size": 2},
              "data": {"path": str(tmp_path)}, "optim": {"lr": 1e-2, "min_lr": 1e-3, "weight_decay": 0.0, "eps": 1e-20,
                                                        "grad_clip": 0.0},
              "schedule": {"warmup_steps": 0}, "logging": {"wandb": "disabled"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    config = load_config(tmp_path / "recipe.yaml")
    try:
        run = engine_class(config)(config, init_distributed(config.parallel), None, seq_len=16, num_microbatches=1)
        build_scheduler(run.optimizer, config)  # sets each group's lr from its max_lr
        before = {name: p.detach().clone() for name, p in run.chunks[0].named_parameters()}
        tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
        assert run.train_step(iter([{"tokens": tokens, "doc_ids": torch.zeros_like(tokens)}])).applied
        for name, param in run.chunks[0].named_parameters():
            lr = 1e-2 / 4 if ROLES[name] in ("hidden", "readout") else 1e-2
            change = (param.detach() - before[name]).abs().max().item()
            assert change == pytest.approx(lr, rel=1e-3), name
    finally:
        shutdown_distributed()


def _run_config(tmp_path, model: ModelConfig):
    import yaml

    from pretrain.config import load_config

    fields = {k: v for k, v in model.to_dict().items() if v is not None and k != "rope_scaling"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"run_name": "mup", "runs_dir": str(tmp_path),
                                                          "model": fields, "data": {"path": str(tmp_path)}}))
    return load_config(tmp_path / "recipe.yaml")


def test_resume_refuses_a_change_of_mup_settings(tmp_path):
    from pretrain.config import ConfigError
    from pretrain.state import check_checkpoint_compatible

    trained = hybrid(64).to_dict()
    common = {"config": {"model": trained}, "tokenizer_id": "t"}
    check_checkpoint_compatible(common, "step 5", _run_config(tmp_path, hybrid(64)), "t")  # the same: accepted
    for changed, what in ((dict(mup=False, mup_base_width=None), "mup: checkpoint True vs config False"),
                          (dict(mup_base_width=16), "mup_base_width: checkpoint 32 vs config 16"),
                          (dict(mup_base_head_size=4), "mup_base_head_size: checkpoint 8 vs config 4")):
        with pytest.raises(ConfigError, match=f"checkpoint step 5 was trained with other μP settings .*{what}"):
            check_checkpoint_compatible(common, "step 5", _run_config(tmp_path, hybrid(64, **changed)), "t")
    before_mup = {k: v for k, v in hybrid(64, mup=False, mup_base_width=None).to_dict().items() if "mup" not in k}
    check_checkpoint_compatible({"config": {"model": before_mup}, "tokenizer_id": "t"}, "step 5",
                                _run_config(tmp_path, hybrid(64, mup=False, mup_base_width=None)), "t")


def test_hf_model_with_the_exported_multipliers_gives_the_trained_logits():
    """The HF export's config.json fields (checkpoints/export.py `mup_multipliers`) in the HF model of
    checkpoints/hf on the export's tensors (checkpoints/layout.py): verify.compare (each layer's hidden states,
    the logits, cached decoding) passes; without the multipliers it names the first diverging layer."""
    from checkpoints import layout
    from checkpoints.export import mup_multipliers
    from checkpoints.hf.configuration_sessa import ModelConfig as HFConfig
    from checkpoints.hf.modeling_sessa import SessaForCausalLM
    from checkpoints.verify import VerificationError, compare, verification_inputs

    config = hybrid(128, init_std=0.3, tie_embeddings=True)  # logits of order one: a missing multiplier shows
    native = SessaLM(config, init_seed=1).eval()
    state = {k: v for k, v in native.state_dict().items() if not k.endswith("_extra_state")}
    hf_state = {e.target: layout.fuse(e, state, config) for e in layout.entries(config, {k: tuple(v.shape)
                                                                                       for k, v in state.items()})}
    exported = layout.hf_config_dict(config, torch.float32, 0)
    assert mup_multipliers(config) == {"query_multiplier": 0.5, "feedback_query_multiplier": 0.5,
                                       "logits_multiplier": 0.25}  # sqrt(8/32), sqrt(32/128), 32/128
    for fields, matches in ((exported | mup_multipliers(config), True), (exported, False)):
        model = SessaForCausalLM(HFConfig(**fields))
        missing, unexpected = model.load_state_dict(hf_state, strict=False)
        assert (missing, unexpected) == (["lm_head.weight"], [])  # tied: the embedding's, by _tied_weights_keys
        model.tie_weights()
        inputs = verification_inputs(config)
        if matches:
            compare(native, model, inputs, log=lambda *_: None)
        else:
            with pytest.raises(VerificationError):
                compare(native, model, inputs, log=lambda *_: None)
