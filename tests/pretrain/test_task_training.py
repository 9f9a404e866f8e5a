"""Training on task data (answers-only loss masks, several examples packed per sequence, document
masking): the logged loss is the masked mean over the global batch, every layout and both engines
agree with one process, and a killed run resumes bit-exactly."""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TEST_RECIPE, pretrain_env, read_metrics, run_pretrain, start_pretrain

SEED = 3  # a non-default example seed: an evaluation must regenerate the run's test split with it
ARGS = ("--model.num_layers", "2", "--model.num_kv_heads", "2", "--data.num_workers", "0",
        "--train.max_steps", "6", "--train.global_batch_tokens", "512")


@pytest.fixture(scope="module")
def task_recipe(tmp_path_factory) -> Path:
    """MQAR in shards: 4 examples packed per 128-character sequence, loss on the answers only."""
    from data_pipeline.__main__ import main

    root = tmp_path_factory.mktemp("task")
    data = root / "mqar"
    assert main(["synth", "mqar", "--out", str(data), "--n", "256", "--seed", str(SEED), "--pack", "greedy",
                 "--pairs", "12", "--queries", "2", "--max-lag", "2", "--seq-len", "128"]) in (0, None)
    tree = json.loads(json.dumps(TEST_RECIPE))
    tree["model"]["vocab_size"] = 320
    tree["data"]["path"] = str(data)
    tree["runs_dir"] = str(root / "runs")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    return recipe


@pytest.fixture(scope="module")
def single(task_recipe) -> dict:
    run_pretrain(task_recipe, "--run_name", "single", *ARGS)
    return read_metrics(task_recipe.parent / "runs" / "single")


def _assert_close(run: dict, reference: dict, steps=range(1, 7), abs=1e-5):
    assert sorted(run) == list(steps), sorted(run)
    for step in steps:
        assert run[step] == pytest.approx(reference[step], abs=abs), (step, run[step], reference[step])


def test_logged_loss_is_the_masked_mean_of_the_global_batch(task_recipe, single):
    """Step 1's loss (before any update) recomputed by hand from the initial weights: the mean of the
    per-token losses over answer tokens only, over both micro-batches of the global batch."""
    from data_pipeline.loader import build_dataloader
    from data_pipeline.manifest import read_manifest
    from model.parallel import ensure_model_parallel
    from model.transformer import build_model, init_model_weights, megatron_config_for
    from pretrain.batches import model_inputs
    from pretrain.config import load_config

    config = load_config(task_recipe, list(ARGS))
    ensure_model_parallel()
    model = build_model(config.model, megatron_config_for(config.model, calculate_per_token_loss=True))
    init_model_weights(model, config.train.seed)
    manifest = read_manifest(config.data.path)
    micro_batches = config.train.global_batch_tokens // (config.train.micro_batch_size * manifest["seq_len"])
    loader = build_dataloader(config.data.path, "train", config.train.micro_batch_size, 0, 1, 0, config.data.seed,
                              infinite=True, expected_tokenizer_id=manifest["tokenizer_id"],
                              lanes=micro_batches * config.train.micro_batch_size)
    losses, masks = [], []
    with torch.no_grad():
        for _, batch in zip(range(micro_batches), loader):
            inputs = model_inputs(batch, config.data, torch.device("cpu"))
            losses.append(model(inputs["inputs"], inputs["labels"], **inputs["model_kwargs"]))
            masks.append(batch["loss_mask"][:, 1:].bool() & (batch["doc_ids"][:, 1:] >= 0))
    loss, mask = torch.cat(losses), torch.cat(masks)
    assert 0 < mask.sum() < mask.numel() / 4  # answers only: a small share of the tokens
    expected = (loss[mask].double().sum() / mask.sum()).item()
    assert single[1] == pytest.approx(expected, rel=1e-6)
    assert abs(loss.double().mean().item() - expected) > 1e-3  # the unmasked mean is another number


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--parallel.tensor", "2"), ("--parallel.pipeline", "2"), ()],
                         ids=["tp2", "pp2", "dp2"])
def test_layouts_match_one_process_with_masks(task_recipe, single, layout):
    name = "layout_" + ("_".join(layout[::2]).replace("--parallel.", "") or "dp2")
    run_pretrain(task_recipe, "--run_name", name, *ARGS, *layout, nproc=2)
    _assert_close(read_metrics(task_recipe.parent / "runs" / name), single)


@pytest.mark.slow
def test_deepspeed_engine_matches_with_masks(task_recipe, single):
    run_pretrain(task_recipe, "--run_name", "zero2", *ARGS, "--engine", "deepspeed", "--deepspeed.stage", "2",
                 nproc=2)
    _assert_close(read_metrics(task_recipe.parent / "runs" / "zero2"), single)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact_with_masks(task_recipe, single):
    run_dir = task_recipe.parent / "runs" / "killed"
    process = start_pretrain(task_recipe, "--run_name", "killed", *ARGS, "--checkpoint.interval_steps", "2")
    deadline = time.time() + 600
    while max(read_metrics(run_dir), default=0) < 3:
        assert process.poll() is None and time.time() < deadline, "training ended before step 3"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run_pretrain(task_recipe, "--run_name", "killed", *ARGS, "--checkpoint.interval_steps", "2")
    resumed = read_metrics(run_dir)
    assert sorted(resumed) == list(range(1, 7))
    assert [resumed[s] for s in range(3, 7)] == [single[s] for s in range(3, 7)]  # bitwise


@pytest.mark.slow
def test_task_evaluation_in_training_and_after_gives_what_the_model_scores(task_recipe, tmp_path):
    """One evaluated run checks: eval.tasks is logged at its interval; the step-6 values equal the
    exact match and token accuracy recomputed by hand from the saved model on the test split that
    `synth` writes with the run's seed (not the default one); `python -m pretrain.evaluate --wandb
    offline` on the run re-derives that seed, reports the same values and logs them to wandb; a
    failing evaluation never stops training."""
    import subprocess
    import sys

    from data_pipeline.tasks import TaskExample
    from pretrain.evaluate.targets import load_target
    from pretrain.evaluate.tasks import load_task
    from tests.evaluate.by_hand import generate_metrics
    from tests.evaluate.conftest import evaluate_cli, wandb_history

    runs = task_recipe.parent / "runs"
    args = (*ARGS, "--eval.tasks", "mqar", "--eval.interval", "3")
    done = run_pretrain(task_recipe, "--run_name", "evaluated", *args)
    records = [json.loads(line) for line in (runs / "evaluated" / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r for r in records if any(k.startswith("eval/mqar/") for k in r)}
    assert sorted(evaluated) == [3, 6], sorted(evaluated)
    assert "tasks" in done.stdout

    test_file = tmp_path / "mqar-test.jsonl"  # the knobs of task_recipe's data, 200 test examples (the default)
    synth = subprocess.run([sys.executable, "-m", "data_pipeline", "synth", "mqar", "--out", str(test_file), "--n", "0",
                            "--n-val", "0", "--n-test", "200", "--seed", str(SEED), "--pairs", "12", "--queries", "2",
                            "--max-lag", "2"], cwd=REPO, env=pretrain_env(), capture_output=True, text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr[-3000:]
    examples = [TaskExample(row["prompt"], row["answer"], "mqar-test.jsonl")
                for row in map(json.loads, test_file.read_text().splitlines())]
    target = load_target(runs / "evaluated")
    assert target.info["step"] == 6
    expected = generate_metrics(target.model, target.config.vocab_size, target.tokenizer, examples, "\n")
    assert {k: evaluated[6][f"eval/mqar/{k}"] for k in expected} == expected
    regenerated = load_task("mqar", trained_sources=target.info["sources"]).examples  # what both evaluations score
    assert [(e.prompt, e.answer) for e in regenerated] == [(e.prompt, e.answer) for e in examples]

    wandb_dir = tmp_path / "wandb"
    evaluate_cli(runs / "evaluated", "--tasks", "mqar", "--no-progress", "--out", tmp_path / "eval.json",
                 "--wandb", "offline", env={"WANDB_DIR": str(wandb_dir)})
    result = json.loads((tmp_path / "eval.json").read_text())["mqar"]
    assert {k: result[k] for k in expected} == expected
    logged = {"eval/mqar/" + name: value for name, value in result.items() if name != "buckets"}
    for field, buckets in result["buckets"].items():
        for bucket, metrics in buckets.items():
            logged |= {f"eval/mqar/{field}={bucket}/{name}": value for name, value in metrics.items()}
    assert logged == {k: v for k, v in evaluated[6].items() if k.startswith("eval/mqar/")}
    [(step, history)] = wandb_history(wandb_dir)
    assert step == 6 and history == logged

    broken = subprocess.run([sys.executable, str(REPO / "tests/pretrain/eval_failure_run.py"), "--config",
                             str(task_recipe), "--run_name", "eval_broken", *args], cwd=REPO, env=pretrain_env(),
                            capture_output=True, text=True, timeout=600)
    assert broken.returncode == 0, broken.stderr[-3000:]
    assert "eval.tasks failed at step 3 (training goes on): RuntimeError: injected" in broken.stdout
    assert max(read_metrics(runs / "eval_broken")) == 6
