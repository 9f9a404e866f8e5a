"""Checkpoint export/import on real training checkpoints (CPU, gloo for the multi-process save)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.pretrain.conftest import (REPO, TEST_RECIPE, pretrain_env, read_metrics,  # noqa: F401
                                     run_pretrain)

from checkpoints.export import model_config
from checkpoints.readers import open_checkpoint
from checkpoints.verify import (VerificationError, compare, independent_state_dict, load_exported, native_model,
                                verification_inputs)


def _recipe(tmp: Path, data: Path, **model) -> Path:
    tree = json.loads(json.dumps(TEST_RECIPE))
    tree["data"].update(path=str(data), num_workers=0)
    tree["model"].update(model)
    tree["train"]["max_steps"] = 3
    tree["runs_dir"] = str(tmp / "runs")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def cli(*args, expect_ok=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "checkpoints", *map(str, args)], cwd=REPO, env=pretrain_env(),
                          capture_output=True, text=True, timeout=600)
    if expect_ok and done.returncode != 0:
        raise AssertionError(f"checkpoints {args[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's 3-step run and its verified HF export (tests/conftest.py tiny_run)."""
    return tiny_run["tmp"], tiny_run["recipe"], tiny_run["run"], tiny_run["hf"]


FRESH_PROCESS = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, ids_path, result = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(out)
ids = torch.load(ids_path)
with torch.no_grad():
    hidden = model(ids, output_hidden_states=True)
    generated = model.generate(ids[:1, :5], max_new_tokens=8, min_new_tokens=8, do_sample=False)
torch.save({"logits": hidden.logits, "n_hidden": len(hidden.hidden_states), "generated": generated,
            "class": type(model).__name__, "text_ids": tokenizer.encode("def f(x):\n    return x")}, result)
"""


def load_in_fresh_process(hf: Path, ids: torch.Tensor, tmp_path: Path) -> dict:
    """FRESH_PROCESS's outputs for the export in `hf` on `ids`."""
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "load.py").write_text(FRESH_PROCESS)
    subprocess.run([sys.executable, str(tmp_path / "load.py"), str(hf), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path, env=pretrain_env(), timeout=300)
    return torch.load(tmp_path / "out.pt")


def assert_matches_native(reader, config, ids: torch.Tensor, result: dict) -> None:
    """The export's logits (<= 1e-4, same argmax) and greedy tokens are our model's."""
    from model.generation import generate

    native = native_model(independent_state_dict(reader), config)
    with torch.no_grad():
        ours = native(ids)[..., : config.vocab_size]
    assert (ours - result["logits"]).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), result["logits"].argmax(-1))
    assert torch.equal(generate(native, ids[:1, :5], 8, temperature=0), result["generated"])


def test_hf_export_loads_with_remote_code_and_matches_native(trained, tmp_path):
    tmp, _, run, hf = trained
    reader = open_checkpoint(run)
    config = model_config(reader.common)
    ids = torch.randint(0, config.vocab_size, (2, 2 * config.feedback_chunk_size + 3), generator=torch.Generator().manual_seed(3))
    result = load_in_fresh_process(hf, ids, tmp_path)
    assert result["class"] == "SessaForCausalLM" and result["n_hidden"] == config.num_layers + 1
    assert_matches_native(reader, config, ids, result)
    from data_pipeline.tokenizer import load_tokenizer

    assert result["text_ids"] == load_tokenizer("pydocs4k").encoding.encode("def f(x):\n    return x")
    # registrable from our package, without remote code
    from transformers import AutoModelForCausalLM

    from checkpoints.hf import register

    register()
    local = AutoModelForCausalLM.from_pretrained(str(hf))
    assert type(local).__module__ == "checkpoints.hf.modeling_sessa"
    manifest = json.loads((hf / "sessa_export.json").read_text())
    assert manifest["step"] == 3 and manifest["tokenizer_id"] == reader.common["tokenizer_id"]
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json", "modeling_sessa.py"}


@pytest.mark.slow
def test_mamba_hybrid_exports_to_hf(tmp_path, prepared_data):  # noqa: F811
    """A pattern with Mamba-2 blocks (SM*-, model/mamba.py) exports to HF; loaded with remote code in a
    fresh process: our model's logits (<= 1e-4, same argmax) and greedy tokens."""
    recipe = _recipe(tmp_path, prepared_data, init_scheme="reference", num_layers=4, layer_pattern="SM*-",
                     ffn_hidden_size=64, mamba_state_size=16, mamba_head_size=16, mamba_chunk_size=16)
    run_pretrain(recipe, "--run_name", "mamba")
    run = tmp_path / "runs" / "mamba"
    assert "top-1 mismatches: 0" in cli("export", run, "--to", "hf", "--out", tmp_path / "hf").stdout
    reader = open_checkpoint(run)
    config = model_config(reader.common)
    assert config.layer_pattern == "SM*-" and config.mamba_state_size == 16
    ids = torch.randint(0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(4))
    assert_matches_native(reader, config, ids, load_in_fresh_process(tmp_path / "hf", ids, tmp_path))


@pytest.mark.slow
def test_yarn_model_exports_to_hf(tmp_path, prepared_data):  # noqa: F811
    """model.rope_scaling yarn in Sessa and `*` blocks: config.json carries it, and the export
    loaded with remote code in a fresh process gives our model's logits and greedy tokens."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    recipe = _recipe(tmp_path, prepared_data, init_scheme="reference", layer_pattern="S*", rope_scaling=scaling)
    run_pretrain(recipe, "--run_name", "yarn")
    run = tmp_path / "runs" / "yarn"
    assert "top-1 mismatches: 0" in cli("export", run, "--to", "hf", "--out", tmp_path / "hf").stdout
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())["sessa_rope_scaling"]
    assert exported == scaling | {"beta_fast": 32.0, "beta_slow": 1.0}
    reader = open_checkpoint(run)
    config = model_config(reader.common)
    ids = torch.randint(0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(5))
    assert_matches_native(reader, config, ids, load_in_fresh_process(tmp_path / "hf", ids, tmp_path))


def test_transformer_arm_exports_to_llama(tmp_path, prepared_data, monkeypatch):  # noqa: F811
    """The Transformer arm exports to transformers' own LlamaForCausalLM (no remote code): the same
    logits as our model read independently, the same greedy tokens; a k/v mix-up is caught; the
    reference format refuses the arm with a message naming the formats that work."""
    recipe = _recipe(tmp_path, prepared_data, arch="transformer", num_kv_heads=2, ffn_hidden_size=96)
    run_pretrain(recipe, "--run_name", "arm")
    run = tmp_path / "runs" / "arm"
    done = cli("export", run, "--to", "hf", "--out", tmp_path / "hf")
    assert "top-1 mismatches: 0" in done.stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not list((tmp_path / "hf").glob("*.py"))

    from transformers import AutoModelForCausalLM

    from model.generation import generate

    reader = open_checkpoint(run)
    config = model_config(reader.common)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    native = native_model(independent_state_dict(reader), config)
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = native(ids)[..., : config.vocab_size], hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    generated = hf.generate(ids[:1, :5], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(generate(native, ids[:1, :5], 8, temperature=0), generated)

    refused = cli("export", run, "--to", "reference", "--out", tmp_path / "ref", expect_ok=False)
    assert refused.returncode != 0 and "use --to hf (Llama) or --to safetensors" in refused.stderr

    from checkpoints import layout
    from checkpoints.export import export

    swapped = dict(layout._LLAMA_LAYER)
    swapped["self_attn.k_proj.weight"], swapped["self_attn.v_proj.weight"] = (
        swapped["self_attn.v_proj.weight"], swapped["self_attn.k_proj.weight"])
    monkeypatch.setattr(layout, "_LLAMA_LAYER", swapped)
    with pytest.raises(VerificationError, match="first divergence at layer 0"):
        export(run, "hf", tmp_path / "bad", log=lambda *_: None)


@pytest.mark.parametrize("change", ["swap_heads", "gamma_sign", "rope_pairing"])
def test_verification_detects_known_bad_changes(trained, change, monkeypatch):
    _, _, run, hf = trained
    reader = open_checkpoint(run)
    config = model_config(reader.common)
    native, exported = native_model(independent_state_dict(reader), config), load_exported(hf)
    compare(native, exported, verification_inputs(config))  # the good export passes
    mixer = exported.model.layers[1].mixer
    with torch.no_grad():
        if change == "swap_heads":  # heads 0 and 1 exchanged in W_o only (a head-permutation bug)
            d = config.head_size
            w = mixer.out_proj.weight
            w[:, :d], w[:, d:2 * d] = w[:, d:2 * d].clone(), w[:, :d].clone()
        elif change == "gamma_sign":
            mixer.gamma_bias.neg_()
    if change == "rope_pairing":  # halves (i, i + d/2) instead of interleaved pairs (2i, 2i + 1)
        import checkpoints.hf.modeling_sessa as modeling

        def half_split(x, positions, inv_freq):
            angles = positions.float()[:, None] * inv_freq.float()[None, :]
            cos, sin = angles.cos(), angles.sin()
            a, b = x.chunk(2, dim=-1)
            return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

        monkeypatch.setattr(modeling, "apply_interleaved_rope", half_split)
    first = "layer 0" if change == "rope_pairing" else "layer 1"
    with pytest.raises(VerificationError, match=f"first divergence at {first}"):
        compare(native, exported, verification_inputs(config))


def _edit_common(run: Path, tmp: Path, **model_fields) -> Path:
    """A copy of the run's checkpoint whose saved config differs in `model_fields`."""
    import shutil

    step_dir = open_checkpoint(run).path
    copy = tmp / ("edited_" + "_".join(f"{k}{v}" for k, v in model_fields.items())) / step_dir.name
    shutil.copytree(step_dir, copy)
    common = torch.load(copy / "common.pt", weights_only=False)
    common["config"]["model"].update(model_fields)
    torch.save(common, copy / "common.pt")
    return copy


def test_strict_errors_name_what_to_fix(trained, tmp_path):
    _, _, run, _ = trained
    extra = cli("export", _edit_common(run, tmp_path, num_layers=1), "--to", "safetensors", "--out", tmp_path / "a",
                expect_ok=False)
    assert extra.returncode == 1 and "model.layers.1." in extra.stderr and "does not consume" in extra.stderr
    missing = cli("export", _edit_common(run, tmp_path, num_layers=3), "--to", "safetensors", "--out", tmp_path / "b",
                  expect_ok=False)
    assert missing.returncode == 1 and "lacks tensor model.layers.2.norm.weight" in missing.stderr
    vocab = cli("export", _edit_common(run, tmp_path, vocab_size=4000), "--to", "safetensors", "--out", tmp_path / "c",
                expect_ok=False)
    assert vocab.returncode == 1 and "model.embedding.weight has 4096 rows" in vocab.stderr
    tokenizer = cli("export", run, "--to", "hf", "--out", tmp_path / "d", "--tokenizer", "gpt2", expect_ok=False)
    assert tokenizer.returncode == 1 and "pass the right --tokenizer" in tokenizer.stderr


def test_import_refuses_mismatches(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, recipe, _, hf = trained
    shape = cli("import", hf, "--config", recipe, "--out", tmp_path / "runs" / "a", "--model.hidden_size", "64",
                expect_ok=False)
    assert shape.returncode == 1 and "hidden_size: export 32 vs config 64" in shape.stderr
    broken = tmp_path / "broken"
    shutil.copytree(hf, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mixer.gamma_bias"]
    save_file(tensors, broken / "model.safetensors")
    missing = cli("import", broken, "--config", recipe, "--out", tmp_path / "runs" / "b", expect_ok=False)
    assert missing.returncode == 1 and "lacks tensor model.layers.1.mixer.gamma_bias" in missing.stderr


def test_reference_export_constructs_the_reference_layer(trained, tmp_path):
    """config.json holds exactly the public reference constructor's arguments: `SessaLayer(**config)`
    (here our transcription, whose signature is the public one) loads each layer file strictly and
    computes what our layer computes."""
    import inspect

    from safetensors.torch import load_file

    sys.path.insert(0, str(REPO / "tests" / "model"))
    from reference_layer import REFERENCE_LAYER_ARGS, ReferenceLayer

    assert tuple(inspect.signature(ReferenceLayer).parameters) == REFERENCE_LAYER_ARGS
    _, _, run, _ = trained
    reader = open_checkpoint(run)
    config = model_config(reader.common)
    done = cli("export", run, "--to", "reference", "--out", tmp_path / "ref")
    assert "top-1 mismatches: 0" in done.stdout  # verified against the checkpoint, read independently
    kwargs = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert set(kwargs) <= set(REFERENCE_LAYER_ARGS)
    native = native_model(independent_state_dict(reader), config)
    x = torch.randn(2, 2 * config.feedback_chunk_size + 3, config.hidden_size, generator=torch.Generator().manual_seed(0))
    for i in range(config.num_layers):
        layer = ReferenceLayer(**kwargs).eval()
        layer.load_state_dict(load_file(tmp_path / "ref" / "layers" / f"{i}.safetensors"), strict=True)
        with torch.no_grad():
            ours, _ = native.layers[i](x.transpose(0, 1))
            torch.testing.assert_close(layer(x), ours.transpose(0, 1), rtol=1e-4, atol=1e-5)
    lm = json.loads((tmp_path / "ref" / "lm_config.json").read_text())
    assert lm["num_layers"] == config.num_layers and lm["vocab_size"] == config.vocab_size


def test_safetensors_export_is_the_checkpoint(trained, tmp_path):
    from safetensors.torch import load_file

    _, _, run, _ = trained
    reader = open_checkpoint(run)
    done = cli("export", run, "--to", "safetensors", "--out", tmp_path / "st", "--max-shard-size", "100KB")
    assert "tensors equal to the checkpoint's (read independently)" in done.stdout
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    native = reader.read(list(reader.shapes))
    for name, tensor in native.items():
        assert torch.equal(load_file(tmp_path / "st" / index["weight_map"][name])[name], tensor), name


def _misread(reader_class, monkeypatch):
    """The reader returns one tensor wrong (two row blocks exchanged, as a shard-reassembly bug would)."""
    original = reader_class.read

    def read(self, names):
        tensors = original(self, names)
        name = "layers.1.mixer.q_proj.weight"
        if name in tensors:
            top, bottom = tensors[name].chunk(2)
            tensors[name] = torch.cat((bottom, top))
        return tensors

    monkeypatch.setattr(reader_class, "read", read)


@pytest.mark.parametrize("to", ["safetensors", "reference", "hf"])
def test_verification_catches_a_reader_bug(trained, tmp_path, monkeypatch, to):
    """Verification reads the checkpoint independently of the exporter's reader: a wrong read shows."""
    from checkpoints.export import export
    from checkpoints.readers import MegatronReader

    _, _, run, _ = trained
    _misread(MegatronReader, monkeypatch)
    expected = "layers.1.mixer.q_proj.weight" if to == "safetensors" else "first divergence at layer 1"
    with pytest.raises(VerificationError, match=expected):
        export(run, to, tmp_path / to, tokenizer_spec="pydocs4k", log=lambda *_: None)


def test_import_round_trip_is_bit_exact_and_training_resumes(trained):
    tmp, recipe, run, hf = trained
    out = tmp / "runs" / "imported"
    cli("import", hf, "--config", recipe, "--out", out)
    original, imported = open_checkpoint(run), open_checkpoint(out)
    assert original.shapes == imported.shapes
    a, b = original.read(list(original.shapes)), imported.read(list(imported.shapes))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    done = run_pretrain(recipe, "--run_name", "imported", "--train.max_steps", "4", "--data.num_workers", "0")
    assert "resumed from" in done.stdout + done.stderr and "step 4" in done.stdout + done.stderr
    # The DeepSpeed engine starts from the same import: the same weights give the same losses.
    cli("import", hf, "--config", recipe, "--out", tmp / "runs" / "imported_ds")
    done = run_pretrain(recipe, "--run_name", "imported_ds", "--engine", "deepspeed", "--deepspeed.stage", "2",
                        "--train.max_steps", "4", "--data.num_workers", "0")
    assert "imported weights only" in done.stdout + done.stderr
    megatron_losses, deepspeed_losses = read_metrics(out), read_metrics(tmp / "runs" / "imported_ds")
    for step in range(1, 5):
        assert deepspeed_losses[step] == pytest.approx(megatron_losses[step], rel=1e-5)


@pytest.mark.slow
def test_tp2_pp2_checkpoint_exports_to_the_same_model(tmp_path, prepared_data):  # noqa: F811
    """Every format verified against DCP's own loader (not the exporter's reader); then imported back
    (saved by one process) and resumed at TP = 2."""
    recipe = _recipe(tmp_path, prepared_data, num_kv_heads=2)
    run_pretrain(recipe, "--run_name", "tp2pp2", "--parallel.tensor", "2", "--parallel.pipeline", "2", nproc=4)
    run = tmp_path / "runs" / "tp2pp2"
    assert open_checkpoint(run).common["layout"] == {"world_size": 4, "tp": 2, "pp": 2, "dp": 1, "cp": 1}
    done = cli("export", run, "--to", "hf", "--out", tmp_path / "hf")
    assert "top-1 mismatches: 0" in done.stdout
    assert "top-1 mismatches: 0" in cli("export", run, "--to", "reference", "--out", tmp_path / "ref").stdout
    assert "45 tensors equal" in cli("export", run, "--to", "safetensors", "--out", tmp_path / "st").stdout
    cli("import", tmp_path / "hf", "--config", recipe, "--out", tmp_path / "runs" / "back")
    done = run_pretrain(recipe, "--run_name", "back", "--parallel.tensor", "2", "--train.max_steps", "4", nproc=2)
    assert "resumed from" in done.stdout + done.stderr


@pytest.mark.slow
def test_deepspeed_zero3_checkpoint_exports(tmp_path, prepared_data, monkeypatch):  # noqa: F811
    """ZeRO-3 at DP = 2: the streaming reader gives DeepSpeed's own consolidation bit for bit; every
    format is verified against that consolidation, which catches a wrong read."""
    from checkpoints.deepspeed_format import DeepSpeedCheckpoint, consolidated_state_dict
    from checkpoints.export import export

    recipe = _recipe(tmp_path, prepared_data)
    run_pretrain(recipe, "--run_name", "ds3", "--engine", "deepspeed", "--deepspeed.stage", "3", nproc=2)
    run = tmp_path / "runs" / "ds3"
    reader = open_checkpoint(run)
    assert isinstance(reader, DeepSpeedCheckpoint) and reader.common["layout"]["dp"] == 2
    consolidated = consolidated_state_dict(reader.path)
    streamed = reader.read(list(reader.shapes))
    assert streamed.keys() == consolidated.keys()
    for name, tensor in consolidated.items():
        assert torch.equal(streamed[name], tensor), name
    done = cli("export", run, "--to", "hf", "--out", tmp_path / "hf")
    assert "deepspeed ZeRO-3" in done.stdout and "top-1 mismatches: 0" in done.stdout
    manifest = json.loads((tmp_path / "hf" / "sessa_export.json").read_text())
    assert manifest["source_format"] == "deepspeed ZeRO-3" and manifest["source_layout"]["dp"] == 2
    assert "top-1 mismatches: 0" in cli("export", run, "--to", "reference", "--out", tmp_path / "ref").stdout
    assert "45 tensors equal" in cli("export", run, "--to", "safetensors", "--out", tmp_path / "st").stdout
    _misread(DeepSpeedCheckpoint, monkeypatch)
    with pytest.raises(VerificationError, match="layers.1.mixer.q_proj.weight"):
        export(run, "safetensors", tmp_path / "bad", log=lambda *_: None)
