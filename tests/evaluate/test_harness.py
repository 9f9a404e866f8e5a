"""The lm-evaluation-harness model `sessa` through the real `lm_eval` CLI on the local tasks in
tests/evaluate/lm_eval_tasks (YAML + JSONL, nothing from the network): every log-likelihood lm-eval
records equals a direct forward of the checkpoint's model; generations equal our greedy decoder."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.pretrain.conftest import REPO, pretrain_env

LM_EVAL_CLI = ("import site, sys; site.addsitedir(sys.argv.pop(1)); from lm_eval.__main__ import cli_evaluate; "
               "sys.argv[0] = 'lm_eval'; cli_evaluate()")


def direct_loglikelihood(model, ids: list[int]) -> float:
    """sum_t log p(ids[t] | ids[<t]) for t >= 1, one unbatched forward over the real vocabulary."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0, :, : model.sessa.vocab_size].double()
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum())


@pytest.mark.slow
def test_lm_eval_cli_with_the_sessa_model(runs, tmp_path):
    from pretrain.evaluate.lm_eval_hook import install_plugin
    from pretrain.evaluate.scoring import greedy_generate
    from pretrain.evaluate.targets import load_target

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    pth = install_plugin(str(site_dir))  # what `python -m pretrain.evaluate install-lm-eval` writes
    assert pth.read_text().splitlines() == [str(REPO), "import pretrain.evaluate.lm_eval_hook"]
    env = {**pretrain_env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH")  # the .pth file alone puts the repository on the path
    done = subprocess.run(
        [sys.executable, "-c", LM_EVAL_CLI, str(site_dir), "--model", "sessa", "--model_args",
         f"pretrained={runs['sessa']}", "--include_path", "tests/evaluate/lm_eval_tasks", "--tasks",
         "sessa_local_mc,sessa_local_ppl,sessa_local_gen", "--log_samples", "--output_path", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    samples = {}
    for root, _, files in os.walk(tmp_path / "out"):
        for name in files:
            if name.startswith("samples_"):
                task = name.removeprefix("samples_").rsplit("_", 1)[0]
                with open(os.path.join(root, name)) as f:
                    samples[task] = [json.loads(line) for line in f]
    assert set(samples) == {"sessa_local_mc", "sessa_local_ppl", "sessa_local_gen"}

    target = load_target(runs["sessa"])
    model, tok = target.model, target.tokenizer
    for sample in samples["sessa_local_mc"]:
        for i, choice in enumerate(sample["doc"]["choices"]):
            # lm-eval's split (as its HF model): encode context + continuation whole, the continuation
            # is what follows the context's own tokens (a token may span the boundary)
            context = tok.encode(sample["doc"]["prompt"])
            sequence = context + tok.encode(sample["doc"]["prompt"] + choice)[len(context):]
            expected = direct_loglikelihood(model, sequence) - direct_loglikelihood(model, context)
            ll, _ = sample["resps"][i][0]
            assert float(ll) == pytest.approx(expected, abs=1e-4)
    for sample in samples["sessa_local_ppl"]:
        expected = direct_loglikelihood(model, [tok.eot_id] + tok.encode(sample["doc"]["text"]))
        assert float(sample["resps"][0][0]) == pytest.approx(expected, abs=1e-4)
    prompts = [tok.encode(s["doc"]["prompt"]) for s in samples["sessa_local_gen"]]
    for sample, ids in zip(samples["sessa_local_gen"], greedy_generate(model, prompts, 6, eos_id=tok.eot_id)):
        assert sample["resps"][0][0] == tok.decode(ids).split("\n")[0]
