"""Part d: a recipe (configs/<recipe>.yaml) for one architecture at its 8k context, trained through the
trainer's own engine (pretrain/engines/megatron.py: megatron DDP + distributed optimizer, bf16
autocast): step time, tokens/s, model TFLOP/s and MFU from the FLOP ledger, peak memory."""
import gc
import time
from pathlib import Path

import torch

from benchmarks.gpu.part import Part, error_text, is_out_of_memory
from model.flops import count_params, flops_per_token
from pretrain.config import load_config
from pretrain.distributed import init_distributed
from pretrain.engines import engine_class
from pretrain.metrics import model_tflops_per_device

ROOT = Path(__file__).resolve().parents[3]
GPU_SEQ_LEN, DRY_SEQ_LEN = 8192, 64
# A dry run keeps the recipe's optimizer and micro-batch but trains this stand-in model on the CPU.
DRY_MODEL = {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "feedback_chunk_size": 16}


def recipe_config(recipe: str, arch: str, dry: bool, micro_batch: int | None = None):
    overrides = ["--model.arch", arch]  # nothing is saved: the run directory is never created
    if dry:
        overrides += [arg for key, value in DRY_MODEL.items() for arg in (f"--model.{key}", str(value))]
    if micro_batch is not None:
        overrides += ["--train.micro_batch_size", str(micro_batch)]
    return load_config(ROOT / "configs" / f"{recipe}.yaml", overrides)


def draw_weights_on_device(chunks, std: float) -> None:
    """Weights normal(std), norms and the gamma bias 1, other vectors 0, drawn where they live: the
    step time does not depend on the values, and the recipe's layout-independent CPU draw
    (model/init.py) takes minutes at 1.3B, out of a GPU window's few."""
    with torch.no_grad():
        for chunk in chunks:
            generator = None
            for name, param in chunk.named_parameters():
                generator = generator or torch.Generator(device=param.device).manual_seed(0)
                if ("norm" in name and name.endswith("weight")) or name.endswith("gamma_bias"):
                    param.fill_(1.0)
                elif param.ndim <= 1:
                    param.zero_()
                else:
                    param.normal_(0.0, std, generator=generator)


def _time_steps(part: Part, engine, run: dict, batch_size: int, T: int, vocab: int) -> None:
    def step() -> float:
        tokens = torch.randint(0, vocab, (batch_size, T + 1))
        batch = {"tokens": tokens, "doc_ids": torch.zeros_like(tokens)}  # one document per sequence
        return engine.train_step(iter([batch])).loss

    t0 = time.perf_counter()
    step()  # compile and warm up
    part.sync()
    run["first_step_s"] = round(time.perf_counter() - t0, 3)
    losses = []
    base = part.reset_peak()
    run["step_s"] = round(part.timed(lambda: losses.append(step()), reps=5, max_s=max(1.0, part.left() - 5)), 4)
    run["loss"] = round(losses[-1], 4)
    run["timed_steps"] = len(losses)
    run["peak_gb"] = part.peak_gb()
    run["peak_above_start_gb"] = part.peak_gb(base)


def run(part: Part, recipe: str, arch: str) -> None:
    config = recipe_config(recipe, arch, part.dry)
    T = DRY_SEQ_LEN if part.dry else GPU_SEQ_LEN
    micro_batch = config.train.micro_batch_size
    run = part.result["run"] = {"recipe": recipe, "arch": arch, "seq_len": T, "micro_batch_size": micro_batch,
                                "params_m": round(count_params(config.model) / 1e6, 2),
                                "model_flops_per_token": flops_per_token(config.model, T),
                                "peak_tflops": config.logging.peak_tflops}
    part.save()
    env = init_distributed(config.parallel)
    for batch_size in [micro_batch] + ([1] if micro_batch > 1 else []):  # the recipe's, then 1 if it does not fit
        engine = None
        try:
            t0 = time.perf_counter()
            config = recipe_config(recipe, arch, part.dry, batch_size)
            engine = engine_class(config)(config, env, None, seq_len=T, num_microbatches=1,  # the trainer's
                                          draw_weights=False)
            draw_weights_on_device(engine.chunks, config.model.init_std)
            run["build_s"] = round(time.perf_counter() - t0, 3)
            _time_steps(part, engine, run, batch_size, T, config.model.vocab_size)
            run["micro_batch_size"] = batch_size
            run["tokens_per_s"] = round(batch_size * T / run["step_s"], 1)
            tflops = model_tflops_per_device(run["model_flops_per_token"], batch_size * T / run["step_s"], 1)
            run["model_tflops"] = float(f"{tflops:.4g}")
            run["mfu"] = float(f"{tflops / config.logging.peak_tflops:.4g}")
            run.pop("error", None)
            break
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            run["error"] = f"micro-batch {batch_size}: {error_text(error)}"
            engine = None
            gc.collect()
            part.reset_peak()
        finally:
            part.save()
