"""benchmarks/roofline.py: the model's launches and grids are the launchers' real ones."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import roofline  # noqa: E402
from kernels.feedback_solve import feedback_solve  # noqa: E402
from kernels.feedback_solve import triton_chunk  # noqa: E402


@pytest.mark.parametrize("batch, T, K, V, chunk, panel", [(2, 50, 24, 20, 16, 32), (1, 70, 16, 40, 32, 64)])
def test_model_grids_equal_executed_launches(batch, T, K, V, chunk, panel):
    """Small shapes, kernels executed in the interpreter through the recorder (which must not change
    the result), with the interpreter's tiles."""
    config = triton_chunk.INTERPRETER_CONFIG
    real = roofline.real_launches(batch, T, K, V, chunk, panel, config, dtype=torch.float32, execute=True)
    model = roofline.Model(batch, T, K, V, chunk, panel, config=config, in_bytes=4)
    assert real == roofline.model_launches(model)
    assert len(real) == sum(1 for x in model.forward() + model.backward() if not x.kernel.startswith("torch:"))

    gen = torch.Generator().manual_seed(0)
    q_b, k_b, f = (torch.randn(batch, T, n, generator=gen) for n in (K, K, V))
    gamma = 0.9 * torch.tanh(torch.randn(batch, T, generator=gen))
    with roofline.capture_launches(execute=True) as log:
        s = feedback_solve(q_b, k_b, f, gamma, impl="triton", chunk_size=chunk)
    assert log and all(name in roofline.KERNELS for name, _ in log)
    torch.testing.assert_close(s, feedback_solve(q_b, k_b, f, gamma, impl="chunked", chunk_size=chunk),
                               rtol=1e-4, atol=1e-4)


def test_model_grids_equal_launchers_at_the_reported_shape():
    """B=1, T=8192, D=2048 with the GPU tiles: grids recorded without running the kernels."""
    config = triton_chunk.GPU_CONFIG
    real = roofline.real_launches(1, 8192, 2048, 2048, 64, None, config, execute=False)
    model = roofline.Model(1, 8192, 2048, 2048, 64, None, config=config)
    assert real == roofline.model_launches(model)
    summary = roofline.summarise(model, roofline.H100)
    assert summary["launches"]["triton"] == len(real)
    solve = [g for g in summary["groups"] if g["role"].startswith("solve")]
    assert {g["programs_max"] for g in solve} == {2048 // config.solve_block_v}  # V / BV programs at B = 1
    assert all(g["steps"] == 8192 // config.max_solve_block for g in solve)  # every diagonal block in order
    # the dots the model counts cover the mathematics' causal FLOPs (README, Cost: 10 D T^2 per fwd+bwd)
    executed = sum(g["gflop"] for g in summary["groups"]) * 1e9
    assert 1.0 <= executed / (10 * 2048 * 8192**2) < 1.3


def test_one_launch_predicted_by_hand():
    """The forward's first context matmul at B=1, T=8192, D=2048 (panels of 512 rows), fp32
    [512, 512] @ [512, 2048] on the H100 peaks: tf32 at half the bf16 800 TFLOP/s, 3.3 TB/s, 132 SMs."""
    model = roofline.Model(1, 8192, 2048, 2048, 64, None)
    launch = next(x for x in model.forward() if x.role.startswith("matmul"))
    flops = 2 * 512 * 2048 * 512
    nbytes = 4 * (512 * 512 + 512 * 2048 + 512 * 2048)  # P and s read once, the context written once
    assert launch.grid == (512 // 64, 2048 // 64, 1)  # 256 programs of 64 x 64: every SM busy
    assert launch.flops == {"tf32": flops} and launch.bytes_unique == nbytes
    predicted = launch.predict(roofline.H100)
    assert predicted["compute"] == pytest.approx(flops / 400e12, rel=1e-12)
    assert predicted["program"] == pytest.approx(2 * 64 * 64 * 512 / (400e12 / 132), rel=1e-12)  # one tile per SM
    assert predicted["memory"] == pytest.approx(nbytes / 3.3e12, rel=1e-12)
    assert predicted["bound"] == "memory"  # 2.86 us of traffic against 2.68 us of tf32 math
    assert predicted["time"] == pytest.approx(nbytes / 3.3e12 + 3e-6, rel=1e-12)  # + the 3 us launch gap


def test_cpu_layer_measurement_reports_a_fraction():
    T, D, heads = 128, 32, 2
    result = roofline.cpu_layer(T=T, D=D, heads=heads, chunk_size=16, reps=1, profile=True)
    # model FLOPs by hand: 3 x forward; per token 2 per weight element (the layer's matrices),
    # causal attention 2 x 2 x D x (T + 1) / 2, feedback logits and sum 2 x D x (T - 1) / 2 each
    from model import ModelConfig, SessaLayer

    layer = SessaLayer(ModelConfig(vocab_size=256, hidden_size=D, num_layers=1, num_heads=heads))
    weights = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    per_token = 2 * weights + 2 * D * (T + 1) + 2 * D * (T - 1)
    assert result["model_gflop"] == pytest.approx(3 * T * per_token / 1e9, rel=1e-12)
    assert result["model_gflop"] == pytest.approx(sum(result["model_flops_by_component"].values()))
    # a timing: only its definition and the physical ceiling (no layer beats this CPU's matmul rate)
    assert result["fraction_of_matmul"] == pytest.approx(
        result["model_gflop"] / result["fwd_bwd_cpu_s"] / result["matmul_gflops_per_cpu_s"], rel=1e-12)
    assert result["fwd_bwd_s"] > 0 and 0 < result["fraction_of_matmul"] < 1
    assert abs(sum(result["profile_groups"].values()) - 1) < 1e-3
