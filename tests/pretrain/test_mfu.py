"""MFU and model TFLOP/s, as the trainer logs them (pretrain/loop.py) and the GPU check reports them
(benchmarks/gpu/parts/train_step.py), against FLOPs counted by torch's FlopCounterMode over one real
training step (forward + backward) divided by the measured step time and the configured peak.

The Transformer arm (`model.arch: transformer`) is measured: outside attention every FLOP of its model
convention is a matmul FlopCounterMode counts (projections, SwiGLU, the tied LM head; forward 2mnk,
backward the input and weight gradients, 4mnk), and the same formula turns the FLOPs into MFU for both
architectures. What FlopCounterMode does not count:
  - attention: the CPU's fused `scaled_dot_product_attention` kernel has no FLOP formula in torch (it
    counts 0), so the causal attention's matmuls are added here by hand: per layer and sequence of T
    tokens, Q.K^T and P.V over the T (T + 1) / 2 causal pairs, 2 FLOPs per multiply-add each, times
    3 for training;
  - elementwise work (norms, RoPE, softmax, SiLU, the loss, the optimizer update): not model FLOPs
    by definition, so leaving it out is what MFU means.
Nothing else differs, so the comparison is exact up to floating-point rounding (rel 1e-6; the GPU
check rounds MFU and TFLOP/s to 4 significant digits: rel 1e-3 there).
"""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import load_config
from pretrain.loop import Trainer

PEAK_TFLOPS = 0.5  # any configured peak: MFU is TFLOP/s over it
# megatron's distributed optimizer reads .grad of its fp32 shard views on purpose (its zero_grad says so);
# when model/cpu_compat.py's CPU redirection is the caller on the stack, the warning is attributed to it.
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")


def _hand_attention_flops(config, sequences: int, T: int) -> float:
    """Training FLOPs of the causal attention FlopCounterMode cannot see on the CPU."""
    width = config.model.num_heads * (config.model.hidden_size // config.model.num_heads)
    causal_pairs = T * (T + 1) // 2
    return 3 * config.model.num_layers * sequences * 2 * (2 * width * causal_pairs)


def _counted_step_flops(engine, micro_batches: list) -> int:
    with FlopCounterMode(display=False) as counter:
        engine.train_step(iter(micro_batches))
    return counter.get_total_flops()


def test_trainer_mfu_equals_flops_counted_over_one_step(recipe, tmp_path):
    config = load_config(recipe, ["--model.arch", "transformer", "--data.document_masking", "false",
                                  "--train.max_steps", "2", "--schedule.warmup_steps", "1",
                                  "--logging.interval", "2", "--logging.peak_tflops", str(PEAK_TFLOPS)])
    trainer = Trainer(config)
    try:
        trainer.train()
        logged = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
        metrics = next(m for m in logged if "perf/mfu" in m)
        # one more step of the same global batch shape, counted
        batches = iter(trainer.train_loader)
        micro_batches = [next(batches) for _ in range(trainer.num_microbatches)]
        tokens = [batch["tokens"][:, :-1] for batch in micro_batches]
        sequences, T = sum(t.shape[0] for t in tokens), tokens[0].shape[1]
        assert sequences * T == config.train.global_batch_tokens
        step_flops = _counted_step_flops(trainer.engine, micro_batches) + _hand_attention_flops(config, sequences, T)
    finally:
        trainer.close()
    tflops = step_flops / metrics["perf/step_s"] / 1e12
    assert metrics["perf/model_tflops_per_device"] == pytest.approx(tflops, rel=1e-6)
    assert metrics["perf/mfu"] == pytest.approx(tflops / PEAK_TFLOPS, rel=1e-6)


def test_gpu_check_mfu_equals_flops_counted_over_one_step(tmp_path):
    from benchmarks.gpu.part import Part
    from benchmarks.gpu.parts import train_step
    from pretrain.distributed import init_distributed, shutdown_distributed
    from pretrain.engines import engine_class

    part = Part("d", dry=True, deadline=float("inf"), result_path=tmp_path / "part.json")
    try:
        train_step.run(part, "125m", "transformer")
        run = part.result["run"]
        # the same engine and batch shape as the part's timed steps, counted
        config = train_step.recipe_config("125m", "transformer", dry=True)
        engine = engine_class(config)(config, init_distributed(config.parallel), None, seq_len=run["seq_len"],
                                      num_microbatches=1)
        tokens = torch.randint(0, config.model.vocab_size, (run["micro_batch_size"], run["seq_len"] + 1))
        batch = {"tokens": tokens, "doc_ids": torch.zeros_like(tokens)}
        step_flops = _counted_step_flops(engine, [batch]) + _hand_attention_flops(config, *tokens[:, :-1].shape)
    finally:
        shutdown_distributed()
    tflops = step_flops / run["step_s"] / 1e12
    assert run["model_tflops"] == pytest.approx(tflops, rel=1e-3)
    assert run["mfu"] == pytest.approx(tflops / run["peak_tflops"], rel=1e-3)
    assert run["model_flops_per_token"] == pytest.approx(step_flops / tokens[:, :-1].numel(), rel=1e-6)
