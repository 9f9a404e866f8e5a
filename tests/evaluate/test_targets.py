"""`python -m pretrain.evaluate` on real trained checkpoints: both architectures, an HF export equal to
its checkpoint, JSON/markdown output, and bad input that names what to fix."""
import csv
import io
import json

import pytest
import torch

from data_pipeline.tasks import TaskExample
from pretrain.evaluate.targets import load_target
from tests.evaluate.by_hand import generate_metrics
from tests.evaluate.conftest import GENERATE, evaluate_cli


def test_hf_export_evaluates_like_its_checkpoint(runs, task_files, tmp_path):
    results = {}
    for name, target in (("ckpt", runs["sessa"]), ("hf", runs["hf"])):
        evaluate_cli(target, "--tasks", task_files["classify"], "--prompt-field", "Text", "--answer-field", "Answer",
                     "--no-progress", "--out", tmp_path / f"{name}.json")
        evaluate_cli(target, "--tasks", task_files["docs"], "--text-field", "text", "--no-progress",
                     "--out", tmp_path / f"{name}-docs.json")
        results[name] = {**json.loads((tmp_path / f"{name}.json").read_text()),
                         **json.loads((tmp_path / f"{name}-docs.json").read_text())}
    ckpt, hf = results["ckpt"], results["hf"]
    assert ckpt["_target"]["format"] == "megatron torch_dist" and hf["_target"]["format"] == "hf export"
    assert ckpt["_target"]["step"] == hf["_target"]["step"] == 3
    assert ckpt["classify"]["accuracy"] == hf["classify"]["accuracy"]
    assert ckpt["classify"]["buckets"] == hf["classify"]["buckets"]
    assert set(ckpt["docs"]["buckets"]["position"]) == {"0-1k", "1k-2k"}
    assert ckpt["docs"]["loss"] == pytest.approx(hf["docs"]["loss"], abs=1e-5)
    for bucket, metrics in ckpt["docs"]["buckets"]["position"].items():
        assert metrics["loss"] == pytest.approx(hf["docs"]["buckets"]["position"][bucket]["loss"], abs=1e-5)


def test_target_models_equal_the_checkpoint_tensors(runs):
    """The loaded model holds exactly the saved weights (torch_dist reader; either architecture), and
    its log-likelihoods equal the HF package's own forward of the export."""
    from checkpoints.readers import open_checkpoint
    from checkpoints.verify import load_exported
    from pretrain.evaluate.scoring import score_continuations

    for arch in ("sessa", "transformer"):
        target = load_target(runs[arch])
        assert target.config.arch == arch and target.tokenizer.spec == "pydocs4k"
        reader = open_checkpoint(runs[arch])
        if arch == "sessa":
            saved = reader.read(["embedding.weight", "layers.1.mixer.fb_k_proj.weight"])
            assert torch.equal(target.model.embedding.weight, saved["embedding.weight"])
            assert torch.equal(target.model.layers[1].mixer.fb_k_proj.weight, saved["layers.1.mixer.fb_k_proj.weight"])
            continue
        # megatron saves the Transformer's layers stacked, and its norms under TE's fused names
        norm, fc2 = "decoder.layers.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.mlp.linear_fc2.weight"
        saved = reader.read(["embedding.word_embeddings.weight", norm, fc2])
        layer = target.model.decoder.layers[1]
        assert torch.equal(target.model.embedding.word_embeddings.weight, saved["embedding.word_embeddings.weight"])
        assert torch.equal(layer.input_layernorm.weight, saved[norm][1]) and not torch.all(saved[norm][1] == 1)
        assert torch.equal(layer.mlp.linear_fc2.weight, saved[fc2][1])
    target = load_target(runs["sessa"])
    ids = target.tokenizer.encode("def add(a, b):\n    return a + b\n")
    [score] = score_continuations(target.model, [(ids[:3], ids[3:])])
    hf = load_exported(runs["hf"])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    expected = logprobs[2:-1].gather(-1, torch.tensor(ids[3:])[:, None])[:, 0]
    torch.testing.assert_close(score.logprobs, expected, atol=2e-5, rtol=0)


def test_transformer_run_and_markdown(runs, task_files, tmp_path):
    done = evaluate_cli(runs["transformer"], "--tasks", task_files["generate"], "--no-progress",
                        "--out", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())["generate"]
    assert set(result["buckets"]["length"]) == {"1", "2"}
    target = load_target(runs["transformer"])
    rows = csv.DictReader(io.StringIO(GENERATE), delimiter="\t")
    examples = [TaskExample(row["prompt"], row["answer"], "generate.tsv") for row in rows]
    expected = generate_metrics(target.model, target.config.vocab_size, target.tokenizer, examples, "\n")
    assert {k: result[k] for k in expected} == expected
    assert "| generate | 3 |" in done.stdout and "exact_match" in done.stdout and "length=2" in done.stdout


def test_bad_input_names_what_to_fix(runs, task_files, tmp_path):
    (tmp_path / "missing.tsv").write_text("Text\tAnswer\nok\tyes\nok\tno\n")
    (tmp_path / "missing.jsonl").write_text('{"Text": "a", "Answer": "yes"}\n{"Text": "b"}\n')
    done = evaluate_cli(runs["sessa"], "--tasks", tmp_path / "missing.jsonl", "--prompt-field", "Text",
                        "--answer-field", "Answer", expect_ok=False)
    assert done.returncode == 1 and f"{tmp_path / 'missing.jsonl'}:2" in done.stderr and "'Answer'" in done.stderr

    (tmp_path / "labels.txt").write_text("yes\nno\n")
    (tmp_path / "outside.tsv").write_text("Text\tAnswer\na\tyes\nb\tmaybe\n")
    done = evaluate_cli(runs["sessa"], "--tasks", tmp_path / "outside.tsv", "--prompt-field", "Text",
                        "--answer-field", "Answer", "--choices", tmp_path / "labels.txt", expect_ok=False)
    assert done.returncode == 1 and f"{tmp_path / 'outside.tsv'}:3" in done.stderr and "'maybe'" in done.stderr

    done = evaluate_cli(runs["sessa"], "--tasks", "no_such_task", expect_ok=False)
    assert done.returncode == 1 and "unknown task 'no_such_task'" in done.stderr and "pydocs" in done.stderr


def test_target_without_tokenizer(runs, hidden_data, tmp_path):
    from pretrain.evaluate.targets import TargetError

    with pytest.raises(TargetError, match="no usable tokenizer.*--tokenizer"):
        load_target(runs["sessa"])
    target = load_target(runs["sessa"], tokenizer_spec="pydocs4k")  # the id still has to match
    assert target.tokenizer.id.startswith("pydocs4k")
    with pytest.raises(TargetError, match="tokenizer"):
        load_target(runs["sessa"], tokenizer_spec="gpt2")

    export = tmp_path / "hf"
    export.mkdir()
    for f in runs["hf"].iterdir():
        (export / f.name).write_bytes(f.read_bytes())
    provenance = json.loads((export / "sessa_export.json").read_text())
    provenance["tokenizer_spec"] = None
    (export / "sessa_export.json").write_text(json.dumps(provenance))
    done = evaluate_cli(export, "--tasks", "pydocs", expect_ok=False)
    assert done.returncode == 1 and "has no tokenizer" in done.stderr and "--tokenizer" in done.stderr
