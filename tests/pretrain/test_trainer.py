"""The real trainer end to end: logging, evaluation, schedules, data parallelism, fail-fast errors."""
import json
import math

import pytest
import yaml
from conftest import read_metrics, run_pretrain

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


@pytest.mark.slow
def test_distributed_optimizer_two_ranks_matches_one(recipe, tmp_path):
    run_pretrain(recipe, "--run_name", "one", "--train.max_steps", "5", "--data.num_workers", "0")
    run_pretrain(recipe, "--run_name", "two", "--train.max_steps", "5", "--data.num_workers", "0", nproc=2)
    one, two = read_metrics(tmp_path / "runs" / "one"), read_metrics(tmp_path / "runs" / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_with_another_data_parallel_size(recipe, tmp_path, first, second):
    args = ("--run_name", "reshaped", "--checkpoint.interval_steps", "4")
    first_run = run_pretrain(recipe, *args, "--train.max_steps", "4", nproc=first)
    done = run_pretrain(recipe, *args, nproc=second)
    assert "resumed from" in done.stdout + done.stderr
    at_dp2 = (first_run if first == 2 else done).stdout
    # 1 micro-batch per rank and step at DP=2: the 2 requested workers cannot split it; the start line says so
    assert "1 data workers per rank (data.num_workers 2 does not divide the 1 micro-batches" in at_dp2
    losses = read_metrics(tmp_path / "runs" / "reshaped")
    tokens = read_metrics(tmp_path / "runs" / "reshaped", "train/consumed_tokens")
    assert sorted(losses) == list(range(1, 11))
    assert tokens[5] == 5 * 256 and tokens[10] == 10 * 256
    assert losses[10] < losses[1]


def test_missing_data_directory_fails_fast(recipe, tmp_path):
    done = run_pretrain(recipe, "--data.path", str(tmp_path / "nowhere"), expect_ok=False)
    assert done.returncode != 0
    assert "nowhere" in done.stderr and "python -m data_pipeline prepare" in done.stderr


def test_checkpoint_of_another_model_shape_is_refused(recipe, tmp_path):
    run_pretrain(recipe, "--run_name", "shaped", "--train.max_steps", "3", "--checkpoint.interval_steps", "3")
    done = run_pretrain(recipe, "--run_name", "shaped", "--model.hidden_size", "64", expect_ok=False)
    assert done.returncode == 2
    assert "another model shape" in done.stderr and "hidden_size: checkpoint 32 vs config 64" in done.stderr


def test_tokenizer_mismatch_between_checkpoint_and_data_is_refused(recipe, tmp_path):
    from data_pipeline.prepare import prepare
    from data_pipeline.train_tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus for another tokenizer. " * 400)
    other = tmp_path / "other.tiktoken"
    train_tokenizer([str(corpus)], other, 280, "other280")
    other_data = tmp_path / "other_data"
    prepare(str(corpus), str(other), 64, other_data, num_workers=1, progress=False, val_fraction=0.5)

    run_pretrain(recipe, "--run_name", "tok", "--train.max_steps", "3", "--checkpoint.interval_steps", "3")
    done = run_pretrain(recipe, "--run_name", "tok", "--data.path", str(other_data), expect_ok=False)
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


def test_console_has_no_warnings_and_recipes_keep_their_numbers(recipe, tmp_path):
    """A run's console shows the recipe's progress, not dependency warnings (model/dependency_warnings.py);
    the saved config keeps numbers as written (6e-5, not 5.9999999999999995e-05)."""
    done = run_pretrain(recipe, "--run_name", "quiet", "--train.max_steps", "4", "--checkpoint.interval_steps", "2",
                        "--optim.min_lr", "6e-5")
    resumed = run_pretrain(recipe, "--run_name", "quiet", "--train.max_steps", "6",  # loads a checkpoint too
                           "--optim.min_lr", "6e-5")
    for output in (done.stdout + done.stderr, resumed.stdout + resumed.stderr):
        assert "Warning" not in output, output[-3000:]
    saved = (tmp_path / "runs" / "quiet" / "config.yaml").read_text()
    assert "min_lr: 6.0e-05" in saved
    from pathlib import Path

    for path in Path(__file__).resolve().parents[2].joinpath("configs").rglob("*.yaml"):
        assert "9999999" not in path.read_text() and "0000001" not in path.read_text(), path


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sessa", "transformer"])
def test_recompute_modes_keep_the_losses(recipe, tmp_path, arch):
    """train.recompute (megatron engine): Sessa blocks through model/recompute.py, the Transformer arm
    through megatron's TransformerBlock; the same losses to 1e-6 relative."""
    args = ("--model.arch", arch, "--train.max_steps", "3", "--data.num_workers", "0")
    losses = {}
    for mode in ("none", "selective", "full"):
        done = run_pretrain(recipe, "--run_name", f"{arch}_{mode}", *args, "--train.recompute", mode)
        assert f"recompute {mode}" in done.stdout
        losses[mode] = read_metrics(tmp_path / "runs" / f"{arch}_{mode}")
    for mode in ("selective", "full"):
        assert losses[mode] == pytest.approx(losses["none"], rel=1e-6), mode


@pytest.mark.slow
def test_overlapped_gradient_reduction_keeps_the_losses(recipe, tmp_path):
    args = ("--train.max_steps", "4", "--data.num_workers", "0", "--train.micro_batch_size", "1")
    run_pretrain(recipe, "--run_name", "overlap", *args, nproc=2)  # optim.overlap_grad_reduce: true (default)
    run_pretrain(recipe, "--run_name", "after", *args, "--optim.overlap_grad_reduce", "false", nproc=2)
    overlap, after = read_metrics(tmp_path / "runs" / "overlap"), read_metrics(tmp_path / "runs" / "after")
    assert sorted(overlap) == [1, 2, 3, 4] and overlap == pytest.approx(after, rel=1e-6)
