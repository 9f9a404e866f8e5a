"""The real trainer end to end: logging, evaluation, schedules, data parallelism, fail-fast errors."""
import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TEST_RECIPE, pretrain_command, pretrain_env, read_metrics, run_pretrain

from pretrain.config import ConfigError, load_config


def test_logs_eval_sample_wandb_and_wsd_schedule(recipe, tmp_path):
    done = run_pretrain(recipe, "--run_name", "logged", "--train.max_steps", "12", "--eval.interval", "4",
                        "--eval.sample_tokens", "8", "--logging.wandb", "offline", "--schedule.style", "wsd",
                        "--schedule.wsd_decay_fraction", "0.25", "--logging.peak_tflops", "1.0")
    run_dir = tmp_path / "runs" / "logged"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("train/grad_norm", "train/tokens_per_s", "perf/model_tflops_per_device", "perf/mfu",
                "perf/data_wait_s", "perf/memory_gb"):
        assert all(math.isfinite(r[key]) and r[key] >= 0 for r in train), key
    lrs = [r["train/lr"] for r in train]
    assert lrs[0] < lrs[1] == pytest.approx(3e-3)  # warmup of 2 steps, then stable
    assert lrs[1:9] == [pytest.approx(3e-3)] * 8  # stable until the last 25% of 12 steps
    assert lrs[8] > lrs[9] > lrs[10] > lrs[11] == pytest.approx(3e-4)  # decay to min_lr
    evals = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert all(r["val/ppl"] == pytest.approx(math.exp(r["val/loss"])) for r in evals)
    assert "sample after step 12" in done.stdout
    assert list((run_dir / "wandb").glob("offline-run-*"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["schedule"]["style"] == "wsd" and saved["model"]["hidden_size"] == 32


def module_recipe(prepared_data, tmp_path_factory, name: str) -> Path:
    """conftest's `recipe` for runs that several tests of this module share."""
    root = tmp_path_factory.mktemp(name)
    tree = json.loads(json.dumps(TEST_RECIPE))
    tree["data"]["path"] = str(prepared_data)
    tree["runs_dir"] = str(root / "runs")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    return recipe


@pytest.fixture(scope="module")
def data_parallel_runs(prepared_data, tmp_path_factory) -> tuple:
    """(recipe, {1: losses, 2: losses}): 10 uninterrupted steps at DP=1 and at DP=2 (default data
    workers), the references of the data-parallel tests."""
    recipe = module_recipe(prepared_data, tmp_path_factory, "data_parallel")
    losses = {}
    for dp in (1, 2):
        run_pretrain(recipe, "--run_name", f"dp{dp}", nproc=dp)
        losses[dp] = read_metrics(recipe.parent / "runs" / f"dp{dp}")
    return recipe, losses


@pytest.fixture(scope="module")
def checkpointed_run(prepared_data, tmp_path_factory) -> dict:
    """A run trained to step 4 (checkpoints every 2 steps) and resumed to step 6, min_lr 6e-5: its
    console output and saved config, and the run the refused resumes below try to continue."""
    recipe = module_recipe(prepared_data, tmp_path_factory, "checkpointed")
    args = ("--run_name", "quiet", "--checkpoint.interval_steps", "2", "--optim.min_lr", "6e-5")
    done = run_pretrain(recipe, *args, "--train.max_steps", "4")
    resumed = run_pretrain(recipe, *args, "--train.max_steps", "6")  # loads a checkpoint too
    run_dir = recipe.parent / "runs" / "quiet"
    return {"recipe": recipe, "outputs": [done.stdout + done.stderr, resumed.stdout + resumed.stderr],
            "saved_config": (run_dir / "config.yaml").read_text(), "steps": sorted(read_metrics(run_dir))}


# Two ranks sum their gradients in another order than one process: fp32 rounding (~1e-7 relative)
# that a few Adam steps grow; measured differences stay under 1e-6, so 1e-5 absolute on losses ~8.
DP_ABS = 1e-5


@pytest.mark.slow
def test_distributed_optimizer_two_ranks_matches_one(data_parallel_runs):
    _, losses = data_parallel_runs
    assert sorted(losses[1]) == sorted(losses[2]) == list(range(1, 11))
    for step in losses[1]:
        assert losses[2][step] == pytest.approx(losses[1][step], abs=DP_ABS), step


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_with_another_data_parallel_size(data_parallel_runs, first, second):
    """Stopped after step 4 at DP=`first` (train.exit_interval) and resumed at DP=`second`: steps 1-4
    are bit for bit the uninterrupted run at DP=`first`, steps 5-10 the uninterrupted run at
    DP=`second` (the same global batches, the same schedule) up to the reduction order (DP_ABS)."""
    recipe, losses = data_parallel_runs
    run_dir = recipe.parent / "runs" / f"reshaped_{first}to{second}"
    args = ("--run_name", run_dir.name)
    first_run = run_pretrain(recipe, *args, "--train.exit_interval", "4", nproc=first)
    done = run_pretrain(recipe, *args, nproc=second)
    assert "resumed from" in done.stdout + done.stderr
    at_dp2 = (first_run if first == 2 else done).stdout
    # 1 micro-batch per rank and step at DP=2: the 2 requested workers cannot split it; the start line says so
    assert "1 data workers per rank (data.num_workers 2 does not divide the 1 micro-batches" in at_dp2
    resumed = read_metrics(run_dir)
    tokens = read_metrics(run_dir, "train/consumed_tokens")
    assert sorted(resumed) == list(range(1, 11))
    assert tokens[5] == 5 * 256 and tokens[10] == 10 * 256
    assert [resumed[step] for step in range(1, 5)] == [losses[first][step] for step in range(1, 5)]
    for step in range(5, 11):
        assert resumed[step] == pytest.approx(losses[second][step], abs=DP_ABS), step


def test_missing_data_directory_fails_fast(recipe, tmp_path):
    done = run_pretrain(recipe, "--data.path", str(tmp_path / "nowhere"), expect_ok=False)
    assert done.returncode != 0
    assert "nowhere" in done.stderr and "python -m data_pipeline prepare" in done.stderr


def test_checkpoint_of_another_model_shape_is_refused(checkpointed_run):
    done = run_pretrain(checkpointed_run["recipe"], "--run_name", "quiet", "--model.hidden_size", "64", expect_ok=False)
    assert done.returncode == 2
    assert "another model shape" in done.stderr and "hidden_size: checkpoint 32 vs config 64" in done.stderr


def test_tokenizer_mismatch_between_checkpoint_and_data_is_refused(checkpointed_run, tmp_path):
    from data_pipeline.prepare import prepare
    from data_pipeline.train_tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus for another tokenizer. " * 400)
    other = tmp_path / "other.tiktoken"
    train_tokenizer([str(corpus)], other, 280, "other280")
    other_data = tmp_path / "other_data"
    prepare(str(corpus), str(other), 64, other_data, num_workers=1, progress=False, val_fraction=0.5)

    done = run_pretrain(checkpointed_run["recipe"], "--run_name", "quiet", "--data.path", str(other_data),
                        expect_ok=False)
    assert done.returncode == 2 and "tokenizer" in done.stderr and "other280" in done.stderr


def test_model_vocab_smaller_than_tokenizer_is_refused(recipe):
    done = run_pretrain(recipe, "--model.vocab_size", "1000", expect_ok=False)
    assert done.returncode == 2 and "set model.vocab_size: 4096" in done.stderr


@pytest.mark.parametrize("overrides,match", [
    (["--optim.lr", "fast"], "optim.lr must be a number"),
    (["--optim.learning_rate", "1"], "unknown field.*optim.learning_rate"),
    (["--schedule.warmup_steps", "50"], "warmup_steps"),
    (["--schedule.style", "linear"], "schedule.style"),
    (["--model.num_kv_heads", "3"], "num_kv_heads"),
    (["--parallel.sequence_parallel", "true"], "sequence_parallel needs"),
    (["--checkpoint.keep_last", "0"], "keep_last"),
    (["--parallel.tensor", "2"], r"num_kv_heads \(1\) must be divisible.*parallel.tensor"),
    (["--parallel.pipeline", "2", "--parallel.virtual_stages", "2"], "every stage needs a layer"),
    (["--parallel.pipeline", "2", "--model.num_layers", "3"], "set parallel.pipeline_layout, e.g. '2|1'"),
    (["--parallel.pipeline", "2", "--parallel.pipeline_layout", "2|1"], "pipeline_layout '2|1' must give 2 stages"),
    (["--parallel.virtual_stages", "2"], "virtual_stages > 1 needs parallel.pipeline > 1"),
    (["--logging.wandb", "cloud"], "logging.wandb"),
])
def test_config_errors_name_the_field(recipe, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, overrides)


def test_global_batch_must_divide_into_micro_batches(recipe):
    done = run_pretrain(recipe, "--train.global_batch_tokens", "100", expect_ok=False)
    assert done.returncode == 2 and "global_batch_tokens (100)" in done.stderr


def test_weight_decay_skips_norms_biases_and_gamma():
    from model import ModelConfig, SessaLM
    from pretrain.state import no_weight_decay as _no_weight_decay

    model = SessaLM(ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2))
    no_decay = {name for name, p in model.named_parameters() if _no_weight_decay(p, name)}
    assert {"layers.0.norm.weight", "layers.0.in_proj.bias", "layers.0.mixer.gamma_bias",
            "layers.0.mixer.gamma_ctx.weight", "final_norm.weight"} <= no_decay
    assert not no_decay & {"embedding.weight", "layers.0.in_proj.weight", "layers.0.mixer.q_proj.weight"}


def test_console_has_no_warnings_and_recipes_keep_their_numbers(checkpointed_run):
    """A run's console shows the recipe's progress, not dependency warnings (model/dependency_warnings.py),
    when it starts and when it resumes; the saved config keeps numbers as written (6e-5, not
    5.9999999999999995e-05)."""
    assert checkpointed_run["steps"] == list(range(1, 7))
    for output in checkpointed_run["outputs"]:
        assert "Warning" not in output, output[-3000:]
    assert "min_lr: 6.0e-05" in checkpointed_run["saved_config"]
    for path in REPO.joinpath("configs").rglob("*.yaml"):
        assert "9999999" not in path.read_text() and "0000001" not in path.read_text(), path


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sessa", "transformer"])
def test_recompute_modes_keep_the_losses_and_keep_less(recipe, tmp_path, arch):
    """train.recompute (megatron engine): a hybrid stack of every block type (S, M, *, -) through
    model/recompute.py, the Transformer arm through megatron's TransformerBlock; the same losses to
    1e-6 relative, and a lower peak of the bytes kept for the backward (tests/pretrain/saved_bytes_run.py):
    "selective" below "none" (the Sessa mixer, the Transformer's core attention), "full" below
    "selective" (whole blocks)."""
    args = ("--model.arch", arch, "--train.max_steps", "3", "--data.num_workers", "0")
    if arch == "sessa":
        args += ("--model.layer_pattern", "SM*-", "--model.num_layers", "4")
    losses, saved = {}, {}
    for mode in ("none", "selective", "full"):
        command = pretrain_command(recipe, "--run_name", f"{arch}_{mode}", *args, "--train.recompute", mode)
        command[1:3] = [str(REPO / "tests/pretrain/saved_bytes_run.py")]  # instead of `-m pretrain`
        done = subprocess.run(command, cwd=REPO, env=pretrain_env(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"recompute {mode}" in done.stdout
        saved[mode] = int(done.stdout.rsplit("peak saved bytes ", 1)[1])
        losses[mode] = read_metrics(tmp_path / "runs" / f"{arch}_{mode}")
    for mode in ("selective", "full"):
        assert losses[mode] == pytest.approx(losses["none"], rel=1e-6), mode
    assert saved["full"] < saved["selective"] < saved["none"], saved


@pytest.mark.slow
def test_overlapped_gradient_reduction_keeps_the_losses(recipe, tmp_path):
    args = ("--train.max_steps", "4", "--data.num_workers", "0", "--train.micro_batch_size", "1")
    run_pretrain(recipe, "--run_name", "overlap", *args, nproc=2)  # optim.overlap_grad_reduce: true (default)
    run_pretrain(recipe, "--run_name", "after", *args, "--optim.overlap_grad_reduce", "false", nproc=2)
    overlap, after = read_metrics(tmp_path / "runs" / "overlap"), read_metrics(tmp_path / "runs" / "after")
    assert sorted(overlap) == [1, 2, 3, 4] and overlap == pytest.approx(after, rel=1e-6)
