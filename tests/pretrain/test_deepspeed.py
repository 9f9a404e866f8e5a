"""The DeepSpeed engine (pretrain/engines/deepspeed.py) with the real DeepSpeed on CPU (gloo, torch
AdamW; and DeepSpeed's CPU-Adam with optimizer offload): ZeRO 1/2/3 on 2 ranks and TP 2 x ZeRO DP 2 on 4 ranks train exactly like the single-process
megatron engine; a killed run resumes with identical losses; a 2-rank checkpoint converted to a
universal checkpoint resumes on 1 rank; consolidated fp32 weights equal the live weights;
activation checkpointing leaves the gradients unchanged."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TEST_RECIPE, _free_port, kill_launch, pretrain_env, read_metrics, run_pretrain, start_pretrain

# 2 kv heads so that TP=2 divides them; no loader workers (faster start, same batches).
COMMON = ("--model.num_kv_heads", "2", "--data.num_workers", "0", "--train.max_steps", "5")
DEEPSPEED = ("--engine", "deepspeed")
STEPS = range(1, 6)


def assert_same_losses(run: dict, reference: dict, steps=STEPS, abs=1e-5):
    assert sorted(run) == list(steps), sorted(run)
    for step in steps:
        assert run[step] == pytest.approx(reference[step], abs=abs), (step, run[step], reference[step])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_data) -> tuple[Path, Path]:
    """(recipe, runs directory) shared by this module's runs, with the single-process megatron run
    `megatron` every layout is compared with."""
    root = tmp_path_factory.mktemp("deepspeed")
    tree = json.loads(json.dumps(TEST_RECIPE))
    tree["data"]["path"] = str(prepared_data)
    tree["runs_dir"] = str(root / "runs")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    return recipe, root / "runs"


@pytest.fixture(scope="module")
def megatron_losses(runs) -> dict:
    recipe, runs_dir = runs
    run_pretrain(recipe, "--run_name", "megatron", *COMMON)
    return read_metrics(runs_dir / "megatron")


def _ds_live_weights(recipe: Path, out: Path, *overrides: str, nproc: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", str(REPO / "tests/pretrain/ds_live_weights.py"), str(out),
               "--config", str(recipe), *overrides]
    done = subprocess.run(command, cwd=REPO, env=pretrain_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


# --- configuration --------------------------------------------------------------------------------
def test_config_errors_name_the_field(tmp_path, recipe):
    from pretrain.config import ConfigError, load_config
    from pretrain.engines.deepspeed import deepspeed_config

    cases = {
        ("--engine", "zero"): "engine must be",
        (*DEEPSPEED, "--parallel.pipeline", "2"): "parallel.pipeline > 1",
        (*DEEPSPEED, "--parallel.tensor", "2", "--parallel.sequence_parallel", "true"): "parallel.sequence_parallel",
        ("--deepspeed.stage", "4"): "deepspeed.stage",
        ("--deepspeed.offload_params", "true"): "deepspeed.offload_params needs deepspeed.stage 3",
        ("--deepspeed.activation_checkpointing", "some"): "deepspeed.activation_checkpointing",
        ("--deepspeed.config_json", str(tmp_path / "missing.json")): "deepspeed.config_json",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
            load_config(recipe, list(overrides))

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0},
                                "gradient_accumulation_steps": 3}))
    config = load_config(recipe, [*DEEPSPEED, "--deepspeed.stage", "3", "--deepspeed.config_json", str(user)])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=3 but the run needs 2"):
        deepspeed_config(config, micro_batches=2, dp_size=1)
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    generated = deepspeed_config(config, micro_batches=2, dp_size=2)
    assert generated["train_batch_size"] == 2 * 2 * 2 and generated["gradient_accumulation_steps"] == 2
    assert generated["zero_optimization"]["stage"] == 3  # kept beside the user's key
    assert generated["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.slow  # needs the megatron run
def test_engine_refuses_a_megatron_checkpoint(runs, megatron_losses):
    recipe, runs_dir = runs
    shutil.copytree(runs_dir / "megatron", runs_dir / "megatron_then_ds")
    done = run_pretrain(recipe, "--run_name", "megatron_then_ds", *COMMON, *DEEPSPEED, expect_ok=False)
    assert done.returncode == 2 and "not written by engine: deepspeed" in done.stderr


# --- activation checkpointing -----------------------------------------------------------------------
def test_activation_checkpointing_keeps_gradients():
    from model import ModelConfig, SessaLM, init_weights
    from model import layer as model_layer
    from pretrain.engines.deepspeed import checkpoint_activations

    config = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         feedback_impl="chunked", feedback_chunk_size=16)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    grads = {}
    variants = [("none", False), ("full", False), ("feedback", False), ("full", True), ("feedback", True)]
    for mode, reentrant in variants:  # the reentrant variant is the one used with ZeRO-3
        model = SessaLM(config)
        init_weights(model, 3)
        checkpoint_activations(model, mode, reentrant=reentrant)
        calls = []  # count the attention's runs: recomputed in backward when checkpointed
        with pytest.MonkeyPatch.context() as patch:
            attention = model_layer.causal_attention
            patch.setattr(model_layer, "causal_attention", lambda *a: calls.append(1) or attention(*a))
            model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        assert len(calls) == config.num_layers * (1 if mode == "none" else 2), mode
        grads[mode, reentrant] = {name: param.grad.clone() for name, param in model.named_parameters()}
    reference = grads["none", False]
    for variant in variants[1:]:
        assert grads[variant].keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(grads[variant][name], grad, rtol=1e-6, atol=1e-7, msg=f"{variant}: {name}")


# --- ZeRO vs the megatron engine --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage, offload", [(0, False), (1, False), (2, False), (2, True)],
                         ids=["zero0", "zero1", "zero2", "zero2_offload"])
def test_zero_matches_megatron_engine(runs, megatron_losses, stage, offload):
    """offload: optimizer states and step on the CPU (here with torch AdamW, not CPU-Adam)."""
    recipe, runs_dir = runs
    name = f"zero{stage}" + "_offload" * offload
    run_pretrain(recipe, "--run_name", name, *COMMON, *DEEPSPEED, "--deepspeed.stage", str(stage),
                 "--deepspeed.offload_optimizer", str(offload).lower(), "--deepspeed.cpu_adam", "false",
                 "--checkpoint.interval_steps", "3", nproc=2)
    assert_same_losses(read_metrics(runs_dir / name), megatron_losses)
    norms = read_metrics(runs_dir / name, "train/grad_norm")  # stage 0: computed by our engine
    assert_same_losses(norms, read_metrics(runs_dir / "megatron", "train/grad_norm"), abs=1e-4)
    if stage == 1:  # and the megatron engine refuses the DeepSpeed checkpoint by name
        shutil.copytree(runs_dir / name, runs_dir / "ds_then_megatron")
        done = run_pretrain(recipe, "--run_name", "ds_then_megatron", *COMMON, "--train.max_steps", "6",
                            expect_ok=False)
        assert done.returncode == 2 and "written by engine: deepspeed" in done.stderr


# DeepSpeed JIT-compiles CPU-Adam (a C++ op) on first use: 2-3.3 min on 2 loaded cores, paid by the first
# run of this test in a fresh environment (CI from a fresh clone). Kept with the environment, so that it is
# built once per venv.
CPU_ADAM_BUILD = Path(sys.prefix) / "torch_extensions"


@pytest.mark.slow
def test_cpu_adam_offload_matches_megatron_engine(runs, megatron_losses):
    """ZeRO-2 with the optimizer offloaded and DeepSpeed's compiled CPU-Adam (deepspeed.cpu_adam, the
    default with offload) trains like torch AdamW in the megatron engine. Both are fp32 AdamW with the
    same hyper-parameters; CPU-Adam's vectorised loop may order the bias corrections, eps and decay
    differently (fp32 rounding, ~1e-7 relative per update), so 5 steps are held to 1e-5 like the other
    ZeRO layouts (measured here: bitwise equal); CPU-Adam without bias correction is off by 3e-3 at step 3."""
    recipe, runs_dir = runs
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", "-m", "pretrain", "--config", str(recipe), "--run_name", "cpu_adam",
               *COMMON, *DEEPSPEED, "--deepspeed.stage", "2", "--deepspeed.offload_optimizer", "true"]
    done = subprocess.run(command, cwd=REPO, env=pretrain_env() | {"TORCH_EXTENSIONS_DIR": str(CPU_ADAM_BUILD)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "optimizer offload" in done.stdout
    assert_same_losses(read_metrics(runs_dir / "cpu_adam"), megatron_losses)


@pytest.mark.slow
def test_zero3_matches_megatron_engine_and_consolidates(runs, megatron_losses, tmp_path):
    """Every parameter partitioned (persistence threshold 0, set through a user DeepSpeed JSON);
    full activation checkpointing on; saved and resumed at step 3 (train.exit_interval); the
    consolidated checkpoint equals the live weights."""
    from checkpoints.deepspeed_format import consolidated_state_dict

    recipe, runs_dir = runs
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    args = ("--run_name", "zero3", *COMMON, "--deepspeed.stage", "3", "--deepspeed.config_json", str(user),
            "--deepspeed.activation_checkpointing", "full")
    run_pretrain(recipe, *args, *DEEPSPEED, "--train.exit_interval", "3", nproc=2)
    assert sorted(read_metrics(runs_dir / "zero3")) == [1, 2, 3]
    live = tmp_path / "live.pt"
    _ds_live_weights(recipe, live, *args, nproc=2)  # resumes at step 3
    assert_same_losses(read_metrics(runs_dir / "zero3"), megatron_losses)

    checkpoint = runs_dir / "zero3" / "checkpoints" / "iter_0000005"
    consolidated, weights = consolidated_state_dict(checkpoint), torch.load(live)
    assert consolidated.keys() == weights.keys()
    for name, weight in weights.items():
        assert consolidated[name].dtype == torch.float32
        torch.testing.assert_close(consolidated[name].reshape(weight.shape), weight, rtol=0, atol=0, msg=name)

    from model import ModelConfig, SessaLM  # loads into a plain model (0-dim gamma biases restored)

    model_fields = yaml.safe_load(recipe.read_text())["model"] | {"num_kv_heads": 2}
    SessaLM(ModelConfig(**model_fields)).load_state_dict(consolidated)

    out = tmp_path / "fp32.pt"
    done = subprocess.run([sys.executable, "-m", "checkpoints.deepspeed_format", "consolidate", str(checkpoint), str(out)],
                          cwd=REPO, env=pretrain_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(out).keys() == consolidated.keys()


@pytest.mark.slow
def test_tp2_zero_dp2_matches_megatron_engine(runs, megatron_losses):
    recipe, runs_dir = runs
    run_pretrain(recipe, "--run_name", "tp2_zero2", *COMMON, *DEEPSPEED, "--deepspeed.stage", "2",
                 "--parallel.tensor", "2", nproc=4)
    assert_same_losses(read_metrics(runs_dir / "tp2_zero2"), megatron_losses)


# --- checkpoints ----------------------------------------------------------------------------------
def _kill_after_step(process, run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while max(read_metrics(run_dir), default=0) < step:
        assert process.poll() is None, f"training exited with {process.returncode} before step {step}"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)
    kill_launch(process)


@pytest.mark.slow
def test_sigkill_then_restart_gives_identical_losses(runs):
    """ZeRO-2 on 2 ranks, killed (SIGKILL) after step 4 with checkpoints every 3 steps: the restart
    continues from `latest` with the uninterrupted run's losses, bit for bit. A 40-step schedule
    leaves time to kill mid-run; both runs stop at step 8 (train.exit_interval)."""
    recipe, runs_dir = runs
    args = ("--model.num_kv_heads", "2", "--data.num_workers", "0", "--train.max_steps", "40", *DEEPSPEED,
            "--deepspeed.stage", "2")
    run_pretrain(recipe, "--run_name", "straight", *args, "--train.exit_interval", "8", nproc=2)
    reference = read_metrics(runs_dir / "straight")

    killed = ("--run_name", "killed", *args, "--checkpoint.interval_steps", "3")
    _kill_after_step(start_pretrain(recipe, *killed, nproc=2), runs_dir / "killed", 4)
    checkpoints = runs_dir / "killed" / "checkpoints"
    latest = int((checkpoints / "latest").read_text())
    assert latest in (3, 6), latest
    assert not list(checkpoints.glob(".tmp_iter_*")) or latest  # a torn save never becomes `latest`
    done = run_pretrain(recipe, *killed, "--train.exit_interval", "8", nproc=2)
    assert "resumed from" in done.stdout
    resumed = read_metrics(runs_dir / "killed")
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(latest + 1, 9)] == [reference[s] for s in range(latest + 1, 9)]  # bitwise


@pytest.mark.slow
def test_universal_checkpoint_resumes_two_ranks_on_one(runs, megatron_losses):
    from checkpoints.deepspeed_format import to_universal

    recipe, runs_dir = runs
    if not (runs_dir / "zero2" / "checkpoints" / "iter_0000003").is_dir():
        pytest.skip("needs the zero2 run of test_zero_matches_megatron_engine")
    run_dir = runs_dir / "zero2_to_1"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs_dir / "zero2" / "checkpoints" / "iter_0000003", run_dir / "checkpoints" / "iter_0000003")
    (run_dir / "checkpoints" / "latest").write_text("3\n")
    args = ("--run_name", "zero2_to_1", *COMMON, *DEEPSPEED, "--deepspeed.stage", "1")

    done = run_pretrain(recipe, *args, expect_ok=False)  # DP 2 -> 1 needs the universal form
    assert done.returncode == 2 and "to-universal" in done.stderr, done.stderr[-2000:]
    to_universal(run_dir / "checkpoints" / "iter_0000003")
    assert (run_dir / "checkpoints" / "iter_0000003" / "universal").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "3"
    done = run_pretrain(recipe, *args)
    assert "resumed from the universal form" in done.stdout
    assert_same_losses(read_metrics(run_dir), megatron_losses, steps=range(4, 6))


# --- the DeepSpeed launcher -----------------------------------------------------------------------
def test_hostfile_generator():
    from launch.deepspeed_hostfile import hostfile

    assert hostfile(["node1", "node2"], 8) == "node1 slots=8\nnode2 slots=8\n"
    with pytest.raises(ValueError, match="distinct"):
        hostfile(["node1", "node1"], 8)
    with pytest.raises(ValueError, match="--slots"):
        hostfile(["node1"], 0)


@pytest.mark.slow
def test_deepspeed_launcher_two_nodes_no_ssh(runs, megatron_losses, tmp_path):
    """The documented multi-node command, two 'nodes' of one rank each on this machine:
    `deepspeed --hostfile ... --no_ssh --node_rank N` once per node."""
    recipe, runs_dir = runs
    hosts = tmp_path / "hostfile"
    done = subprocess.run([sys.executable, "-m", "launch.deepspeed_hostfile", "--slots", "1", "localhost", "127.0.0.1"],
                          cwd=REPO, env=pretrain_env(), capture_output=True, text=True, check=True)
    hosts.write_text(done.stdout)
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hosts), "--no_ssh",
                               "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "--no_local_rank", "--module", "pretrain", "--config", str(recipe),
                               "--run_name", "launcher", *COMMON, *DEEPSPEED],
                              cwd=REPO, env=pretrain_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world 2 (TP 1 x PP 1 x DP 2)" in outputs[0]
    assert_same_losses(read_metrics(runs_dir / "launcher"), megatron_losses)


@pytest.mark.slow
def test_transformer_arm_trains_the_transformer_with_both_engines(runs):
    """`engine: deepspeed` with `model.arch: transformer` trains the Transformer (it once built Sessa
    whatever the recipe said): the same losses as the megatron engine's Transformer run."""
    recipe, runs_dir = runs
    arm = ("--model.arch", "transformer", "--train.max_steps", "3", "--data.num_workers", "0")
    megatron = run_pretrain(recipe, "--run_name", "transformer_megatron", *arm)
    deepspeed = run_pretrain(recipe, "--run_name", "transformer_zero1", *arm, *DEEPSPEED)
    for done in (megatron, deepspeed):
        assert "parameters (transformer)" in done.stdout
    assert_same_losses(read_metrics(runs_dir / "transformer_zero1"), read_metrics(runs_dir / "transformer_megatron"),
                       steps=range(1, 4))
    sessa = read_metrics(runs_dir / "megatron") if (runs_dir / "megatron").exists() else None
    if sessa:  # a different model: different losses from the first step on
        assert read_metrics(runs_dir / "transformer_zero1")[1] != sessa[1]


@pytest.mark.slow
def test_hybrid_pattern_under_zero3_matches_megatron_engine(runs):
    """Sessa, Mamba-2, attention and MLP blocks (`SM*-`) with every parameter partitioned by ZeRO-3
    (the per-head Mamba vectors and the 0-dim gamma biases included): the megatron engine's losses."""
    recipe, runs_dir = runs
    user = runs_dir.parent / "ds_hybrid.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    pattern = ("--model.num_layers", "4", "--model.layer_pattern", "SM*-", "--model.ffn_hidden_size", "64",
               "--model.mamba_head_size", "16", "--model.mamba_state_size", "16", "--train.max_steps", "3",
               "--data.num_workers", "0")
    run_pretrain(recipe, "--run_name", "hybrid_megatron", *pattern)
    run_pretrain(recipe, "--run_name", "hybrid_zero3", *pattern, *DEEPSPEED, "--deepspeed.stage", "3",
                 "--deepspeed.config_json", str(user))
    assert_same_losses(read_metrics(runs_dir / "hybrid_zero3"), read_metrics(runs_dir / "hybrid_megatron"),
                       steps=range(1, 4))
