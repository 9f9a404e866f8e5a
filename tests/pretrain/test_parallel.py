"""Pipeline, tensor and data parallelism through the real trainer (megatron-core schedules, gloo):
every layout trains on the same global batches, so losses match the single process, and a
checkpoint saved at (TP, PP, DP) = (2, 2, 1) resumes at other layouts with the same next losses."""
import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, TEST_RECIPE, pretrain_env, read_metrics, run_pretrain

FOUR_LAYERS = ("--model.num_layers", "4", "--model.num_kv_heads", "2", "--data.num_workers", "0")


def assert_same_losses(run, reference, steps):
    assert sorted(run) == list(steps), sorted(run)
    for step in steps:
        assert run[step] == pytest.approx(reference[step], abs=1e-5), step


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, prepared_data):
    """The uninterrupted single-process run every layout is compared with."""
    root = tmp_path_factory.mktemp("single")
    tree = json.loads(json.dumps(TEST_RECIPE))
    tree["data"]["path"] = str(prepared_data)
    tree["runs_dir"] = str(root / "runs")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    run_pretrain(recipe, "--run_name", "single", *FOUR_LAYERS, "--train.max_steps", "6")
    return read_metrics(root / "runs" / "single")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("2", "1"), ("2", "2")], ids=["pp2", "pp2_virtual2"])
def test_pipeline_matches_single_process(recipe, tmp_path, single_process_losses, layout):
    pipeline, virtual = layout
    run_pretrain(recipe, "--run_name", "pp", *FOUR_LAYERS, "--train.max_steps", "6", "--parallel.pipeline",
                 pipeline, "--parallel.virtual_stages", virtual, "--eval.batches", "2", nproc=2)
    assert_same_losses(read_metrics(tmp_path / "runs" / "pp"), single_process_losses, range(1, 7))


@pytest.mark.slow
def test_tp2_pp2_matches_single_process_and_reshards(recipe, tmp_path, single_process_losses):
    runs = tmp_path / "runs"
    run_pretrain(recipe, "--run_name", "tp2pp2", *FOUR_LAYERS, "--train.max_steps", "6", "--train.exit_interval", "4",
                 "--parallel.tensor", "2", "--parallel.pipeline", "2", "--parallel.sequence_parallel", "true", nproc=4)
    assert_same_losses(read_metrics(runs / "tp2pp2"), single_process_losses, range(1, 5))

    for tensor, pipeline, nproc in [(1, 1, 1), (1, 2, 2), (2, 1, 2)]:  # DP = nproc / (TP x PP)
        name = f"from_tp2pp2_to_tp{tensor}pp{pipeline}dp{nproc // (tensor * pipeline)}"
        shutil.copytree(runs / "tp2pp2", runs / name)
        done = run_pretrain(recipe, "--run_name", name, *FOUR_LAYERS, "--train.max_steps", "6",
                            "--parallel.tensor", str(tensor), "--parallel.pipeline", str(pipeline), nproc=nproc)
        assert "resumed from" in done.stdout + done.stderr
        assert_same_losses(read_metrics(runs / name), single_process_losses, range(1, 7))


@pytest.mark.slow
def test_transformer_arm_tensor_parallel_matches_single_process(recipe, tmp_path):
    """The scaling baseline (megatron GPTModel) trains through the same trainer at TP=2 as at TP=1,
    and its TP=2 checkpoint (stacked layers, sharded q/k/v groups and SwiGLU halves) exports to a
    Llama that the exporter verifies against DCP's own reading of the checkpoint."""
    args = ("--model.arch", "transformer", "--model.num_kv_heads", "2", "--data.num_workers", "0",
            "--train.max_steps", "4")
    run_pretrain(recipe, "--run_name", "tf_tp1", *args)
    run_pretrain(recipe, "--run_name", "tf_tp2", *args, "--parallel.tensor", "2", nproc=2)
    assert_same_losses(read_metrics(tmp_path / "runs" / "tf_tp2"), read_metrics(tmp_path / "runs" / "tf_tp1"),
                       range(1, 5))
    export = subprocess.run([sys.executable, "-m", "checkpoints", "export", str(tmp_path / "runs" / "tf_tp2"),
                             "--to", "hf", "--out", str(tmp_path / "hf")], cwd=REPO, env=pretrain_env(),
                            capture_output=True, text=True, timeout=600)
    assert export.returncode == 0 and "top-1 mismatches: 0" in export.stdout, export.stderr[-3000:]


@pytest.mark.slow
def test_context_parallel_matches_single_process_and_reshards(recipe, tmp_path, single_process_losses):
    """parallel.context 2: each rank holds half of every sequence (packed documents cross the cut), the
    same losses as one process; its checkpoint (step 4) resumes at CP 1, and in the zigzag layout at
    TP 2 x CP 2 with sequence parallelism and at PP 2 x CP 2, with the uninterrupted run's next losses."""
    runs = tmp_path / "runs"
    done = run_pretrain(recipe, "--run_name", "cp2", *FOUR_LAYERS, "--train.max_steps", "6", "--train.exit_interval",
                        "4", "--parallel.context", "2", nproc=2)
    assert "(TP 1 x PP 1 x CP 2 x DP 1)" in done.stdout + done.stderr
    assert_same_losses(read_metrics(runs / "cp2"), single_process_losses, range(1, 5))
    for name, layout, nproc in (("cp1", (), 1),
                                ("tp2cp2", ("--parallel.tensor", "2", "--parallel.context", "2",
                                            "--parallel.sequence_parallel", "true", "--parallel.context_layout",
                                            "zigzag"), 4),
                                ("pp2cp2", ("--parallel.pipeline", "2", "--parallel.context", "2",
                                            "--parallel.context_layout", "zigzag"), 4)):
        shutil.copytree(runs / "cp2", runs / f"cp2_to_{name}")
        done = run_pretrain(recipe, "--run_name", f"cp2_to_{name}", *FOUR_LAYERS, "--train.max_steps", "6", *layout,
                            nproc=nproc)
        assert "resumed from" in done.stdout + done.stderr
        assert_same_losses(read_metrics(runs / f"cp2_to_{name}"), single_process_losses, range(1, 7))
