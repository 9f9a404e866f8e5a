"""The DeepSpeed engine: ZeRO 1/2/3 (+ CPU offload) over megatron-core tensor parallelism.

    python -m pretrain --config configs/tiny.yaml --engine deepspeed --deepspeed.stage 2
    torchrun --nproc-per-node 8 -m pretrain --config configs/1.3b.yaml --engine deepspeed --deepspeed.stage 3

Same model, data loader, schedule, logging, evaluation and run directory as the megatron engine
(pretrain/trainer.py); what differs is overridden here: the model is wrapped by
`deepspeed.initialize` with a config generated from ours (`deepspeed_config`), a step is
gradient accumulation through `engine.backward`/`engine.step`, and checkpoints are DeepSpeed's
sharded checkpoints plus our extra state, published with the same `iter_NNNNNNN` + atomic
`latest` scheme (CheckpointManager.save_with).

Checkpoint tools (run on a saved `iter_NNNNNNN` directory, no process group needed):

    python -m pretrain.deepspeed_engine to-universal runs/x/checkpoints/iter_0000100   # resume at another DP size / stage
    python -m pretrain.deepspeed_engine consolidate runs/x/checkpoints/iter_0000100 model_fp32.pt

Layout of a checkpoint: DeepSpeed's `mp_rank_XX_model_states.pt` and `*zero_pp_rank_*_optim_states.pt`,
`trainer_state.pt` (step, tokens, scheduler, config, tokenizer id, layout), `trainer_rank_NNNNN.pt`
per rank (RNG, data-loader position) and, after `to-universal`, a `universal/` DeepSpeed
universal checkpoint that a resume at another data-parallel size or ZeRO stage loads.
"""
import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from model import SessaLM, init_weights, megatron_config

from .config import ConfigError, RunConfig
from .trainer import STOP_SIGNALS, Trainer, _no_weight_decay

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
UNIVERSAL = "universal"  # sub-directory of a checkpoint written by `to-universal`


class MegatronMPU:
    """DeepSpeed's `mpu` interface over megatron-core's parallel state. Pipeline parallelism is
    refused with this engine, so the model-parallel group is the tensor-parallel group."""

    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)


def deepspeed_config(config: RunConfig, micro_batches: int, dp_size: int, *, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for this run; `deepspeed.config_json` keys override it (batch sizes excepted)."""
    ds, cuda = config.deepspeed, torch.cuda.is_available()
    zero = {"stage": ds.stage, "reduce_bucket_size": ds.reduce_bucket_size, "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": True}
    if ds.stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.prefetch_bucket_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    generated = {
        "train_batch_size": config.train.micro_batch_size * micro_batches * dp_size,
        "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": config.model.dtype == "bfloat16"},
        "fp16": {"enabled": config.model.dtype == "float16"},
        "zero_allow_untested_optimizer": True,  # our client optimizer: torch AdamW (or CPU-Adam)
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if not ds.config_json:
        return generated
    try:
        user = json.loads(Path(ds.config_json).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"deepspeed.config_json {ds.config_json!r} is not readable JSON: {err}") from None
    for key in BATCH_KEYS:
        if key in user and user[key] != generated[key]:
            raise ConfigError(f"deepspeed.config_json sets {key}={user[key]} but the run needs {generated[key]} "
                              f"(from train.global_batch_tokens, train.micro_batch_size and the data-parallel "
                              f"size); change those instead or drop the key")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"deepspeed.config_json must not define {key!r}: the optimizer and schedule come "
                              f"from the optim: and schedule: sections")
    return _merged(generated, user)


def _merged(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _skip_cpu_shm_comm() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles `deepspeed_shm_comm` (minutes) at init, but the op
    only serves inference all-reduces; training collectives go through torch.distributed (gloo).
    Marking it incompatible skips the build. SESSA_DS_SHM_COMM=1 keeps DeepSpeed's default."""
    if torch.cuda.is_available() or os.environ.get("SESSA_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):  # probed lazily; read only by comm/torch.py
        deepspeed.ops.__compatible_ops__ = {}
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def checkpoint_activations(model: SessaLM, mode: str, *, reentrant: bool = False) -> None:
    """DeepSpeed's activation checkpointing: recompute each layer ("full") or each layer's mixer,
    the attention + feedback solve whose activations grow with T ("feedback"), in backward.
    Non-reentrant by default; ZeRO-3 needs the reentrant variant (its recomputation in backward
    runs under ZeRO-3's backward hooks; the non-reentrant one would keep references to parameters
    ZeRO-3 has already released). Parameter names are unchanged (the forward is wrapped per instance)."""
    if mode == "none":
        return
    from deepspeed.runtime.activation_checkpointing import checkpointing

    run = checkpointing.checkpoint if reentrant else checkpointing.non_reentrant_checkpoint
    for layer in model.layers:
        module = layer if mode == "full" else layer.mixer
        inner = module.forward

        def forward(x, cache=None, _inner=inner):
            if cache is not None or not torch.is_grad_enabled():  # decoding, evaluation
                return _inner(x, cache)
            return run(lambda h: _inner(h, None)[0], x), None

        module.forward = forward


class DeepSpeedTrainer(Trainer):
    """Trainer with `engine: deepspeed`; see the module docstring."""

    # --- setup --------------------------------------------------------------------------------
    def _build_model(self) -> None:
        cfg = self.config
        self.megatron_config = megatron_config(cfg.model, sequence_parallel=False, calculate_per_token_loss=True)
        model = SessaLM(cfg.model, self.megatron_config)
        init_weights(model, cfg.train.seed)
        # DeepSpeed broadcasts (and ZeRO-3 partitions) every parameter as `p.data.view(torch.uint8)`,
        # which fails for 0-dim tensors (the gamma biases): they train as shape [1] here (broadcasting
        # gives the same forward) and are restored to shape [] by `consolidated_state_dict`.
        self.scalar_params = [name for name, param in model.named_parameters() if param.dim() == 0]
        for name in self.scalar_params:
            param = model.get_parameter(name)
            param.data = param.data.reshape(1)
        checkpoint_activations(model, cfg.deepspeed.activation_checkpointing, reentrant=cfg.deepspeed.stage == 3)
        self.chunks = [model.to(self.device)]
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         and cfg.model.dtype == "float32" else contextlib.nullcontext())

    def _build_optimizer(self) -> None:
        import deepspeed

        cfg, model = self.config, self.chunks[0]
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            (no_decay if _no_weight_decay(param, name) else decay).append(param)
        groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
        kwargs = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                      weight_decay=cfg.optim.weight_decay)
        if cfg.deepspeed.offload_optimizer and cfg.deepspeed.cpu_adam:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)
        self._resume_plan = self._plan_resume() if cfg.checkpoint.resume else None
        universal = bool(self._resume_plan and self._resume_plan["universal"])
        self.ds_config = deepspeed_config(cfg, self.num_microbatches, self.env.dp_size, load_universal=universal)
        _skip_cpu_shm_comm()
        for name, value in (("LOCAL_RANK", self.env.local_rank), ("RANK", self.env.rank),
                            ("WORLD_SIZE", self.env.world_size)):
            os.environ.setdefault(name, str(value))  # a single process started without a launcher
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                    mpu=MegatronMPU, dist_init_required=False)
        if cfg.deepspeed.stage == 3 and cfg.model.tie_embeddings:
            # The LM head reads the embedding's weight inside SessaLM.forward, outside the embedding's
            # own forward: ZeRO-3 must keep it gathered for the whole model forward.
            deepspeed.zero.register_external_parameter(model, model.embedding.weight)
        self.optimizer = optimizer  # its param groups are the ones DeepSpeed steps
        self.scheduler = self._make_scheduler(optimizer)

    def _make_scheduler(self, optimizer):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg, steps = self.config, self.config.train.max_steps
        wsd = cfg.schedule.style == "wsd"
        return OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
            lr_warmup_steps=cfg.schedule.warmup_steps, lr_decay_steps=steps,
            lr_decay_style="WSD" if wsd else "cosine",
            override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
            start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay, wd_incr_steps=steps,
            wd_incr_style="constant",
            wsd_decay_steps=max(1, round(cfg.schedule.wsd_decay_fraction * steps)) if wsd else None,
            lr_wsd_decay_style=cfg.schedule.wsd_decay_style if wsd else None,
        )

    def _banner(self) -> str:
        ds = self.config.deepspeed
        offload = " + optimizer offload" * ds.offload_optimizer + " + parameter offload" * ds.offload_params
        return (f"{super()._banner()}; engine deepspeed, ZeRO stage {ds.stage}{offload}, "
                f"activation checkpointing {ds.activation_checkpointing}")

    # --- one step -----------------------------------------------------------------------------
    def _loss_sum(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the per-token losses over target positions, number of target positions)."""
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        mask = (batch["doc_ids"][:, 1:] >= 0).to(self.device)  # padding only ends a split
        with self.autocast:
            per_token_loss = self.engine(tokens[:, :-1], tokens[:, 1:])
        return (per_token_loss.float() * mask).sum(), mask.sum()

    def _train_step(self, iterator) -> tuple[float, float]:
        # The step's loss is (sum over the global batch) / (its number of target tokens N), as in the
        # megatron engine. DeepSpeed divides by the accumulation steps and averages over DP ranks,
        # so each micro-batch's backward sees its loss sum scaled by micro-batches x DP / N.
        batches = [next(iterator) for _ in range(self.num_microbatches)]
        dp_group = parallel_state.get_data_parallel_group()
        count = torch.tensor(float(sum(int((b["doc_ids"][:, 1:] >= 0).sum()) for b in batches)), device=self.device)
        dist.all_reduce(count, group=dp_group)
        scale = self.num_microbatches * self.env.dp_size / max(count.item(), 1.0)
        totals = torch.zeros(2, device=self.device)
        grad_norm = None
        for i, batch in enumerate(batches):
            total, tokens = self._loss_sum(batch)
            self.engine.backward(total * scale)
            if i == len(batches) - 1 and self.config.deepspeed.stage == 0:
                grad_norm = self._grad_norm()  # DeepSpeed reports none without ZeRO
            self.engine.step()  # the optimizer steps at the last micro-batch only
            totals += torch.stack((total.detach(), tokens.float()))
        self.scheduler.step(increment=1)
        dist.all_reduce(totals, group=dp_group)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        return (totals[0] / totals[1]).item(), float(grad_norm or 0.0)

    def _grad_norm(self) -> float:
        """Global gradient norm (stage 0: gradients already averaged over DP): tensor-parallel
        shards summed over the TP group, replicated parameters counted once."""
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        squares = torch.zeros(1, device=self.device)
        for param in self.chunks[0].parameters():
            if param.grad is not None and (getattr(param, "tensor_model_parallel", False) or tp_rank == 0):
                squares += param.grad.float().pow(2).sum()
        dist.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
        return squares.sqrt().item()

    def evaluate(self) -> dict:
        import math

        from data_pipeline.loader import build_dataloader

        cfg = self.config
        loader = build_dataloader(cfg.data.path, "val", cfg.train.micro_batch_size, self.env.dp_rank,
                                  self.env.dp_size, 0, cfg.data.seed, infinite=True,
                                  expected_tokenizer_id=self.tokenizer_id)
        totals = torch.zeros(2, device=self.device)
        self.engine.eval()
        with torch.no_grad():
            for _, batch in zip(range(cfg.eval.batches), loader):
                totals += torch.stack([t.float() for t in self._loss_sum(batch)])
        self.engine.train()
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        loss = (totals[0] / totals[1]).item()
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}

    def _print_sample(self) -> None:
        import deepspeed

        params = list(self.chunks[0].parameters()) if self.config.deepspeed.stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, enabled=bool(params)):
            super()._print_sample()

    # --- checkpoints --------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"engine": "deepspeed", "step": self.step, "consumed_tokens": self.consumed_tokens,
                "scheduler": self.scheduler.state_dict(), "config": self.config.to_dict(),
                "tokenizer_id": self.tokenizer_id, "layout": self._layout(),
                "zero_stage": self.config.deepspeed.stage, "scalar_params": self.scalar_params}

    def _write_checkpoint(self, tmp: Path) -> None:
        self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)
        if self.env.rank == 0:  # DeepSpeed copies its recovery scripts next to the tags; `consolidate` replaces them
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (tmp.parent / script).unlink(missing_ok=True)
        rank_state = {"rank": self.env.rank, "dp_rank": self.env.dp_rank, "rng": self._rng_state(),
                      "data": self.train_loader.state_dict()}
        torch.save(rank_state, tmp / f"trainer_rank_{self.env.rank:05d}.pt")
        if self.env.rank == 0:
            torch.save(self._trainer_state(), tmp / "trainer_state.pt")

    def save(self) -> None:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # see Trainer.save
        try:
            path = self.checkpoints.save_with(self.step, self._write_checkpoint)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.last_saved_step = self.step
        self.logger.print(f"saved checkpoint {path}")

    def _plan_resume(self) -> dict | None:
        """Read before deepspeed.initialize: which checkpoint to resume and whether it must be loaded
        from its universal form (another data-parallel size or ZeRO stage)."""
        from checkpoints import CheckpointManager

        manager = CheckpointManager(self.config.run_dir / "checkpoints")
        manager.remove_partial_saves()
        step = manager.latest_step()
        if step is None:
            return None
        where = manager.step_dir(step)
        if not (where / "trainer_state.pt").is_file():
            raise ConfigError(f"checkpoint {where} was not written by engine: deepspeed (no trainer_state.pt); "
                              f"resume it with engine: megatron or start a new run_name")
        common = torch.load(where / "trainer_state.pt", weights_only=False)
        saved = (common["layout"]["dp"], common["layout"]["tp"], common["zero_stage"])
        ours = (self.env.dp_size, self.env.tp_size, self.config.deepspeed.stage)
        universal = saved != ours
        if universal and saved[1] != ours[1]:
            raise ConfigError(f"checkpoint {where} was saved at parallel.tensor={saved[1]}; the DeepSpeed engine "
                              f"resumes only at the same tensor-parallel size (now {ours[1]})")
        if universal and not (where / UNIVERSAL).is_dir():
            raise ConfigError(
                f"checkpoint {where} was saved at DP={saved[0]}, ZeRO stage {saved[2]}; this run has DP={ours[0]}, "
                f"stage {ours[2]} (deepspeed.stage). Convert it first: "
                f"python -m pretrain.deepspeed_engine to-universal {where}")
        return {"step": step, "dir": where, "common": common, "universal": universal}

    def _resume(self) -> None:
        from data_pipeline.loader import merge_dp_states

        plan = self._resume_plan
        if plan is None:
            return
        step, where, common = plan["step"], plan["dir"], plan["common"]
        self._check_checkpoint_compatible(common, step)
        load_dir, tag = (str(where), UNIVERSAL) if plan["universal"] else (str(where.parent), where.name)
        path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {where}")
        self.scheduler.load_state_dict(common["scheduler"])
        ranks = [torch.load(p, weights_only=False) for p in sorted(where.glob("trainer_rank_*.pt"))]
        data_states = [next(r["data"] for r in ranks if r["dp_rank"] == i) for i in range(common["layout"]["dp"])]
        shape = ("dp_size", "workers", "lanes")
        saved_layout, our_layout = data_states[0]["layout"], self.train_loader.state_dict()["layout"]
        if all(saved_layout[k] == our_layout[k] for k in shape):
            self.train_loader.load_state_dict(data_states[self.env.dp_rank])
        else:
            self.train_loader.load_state_dict(merge_dp_states(data_states, self.env.dp_rank, self.env.dp_size))
        if common["layout"]["world_size"] == self.env.world_size:
            self._set_rng_state(ranks[self.env.rank]["rng"])
        else:
            self._seed(self.config.train.seed + step)
        self.step, self.consumed_tokens = common["step"], common["consumed_tokens"]
        self.last_saved_step = step
        if self.env.rank == 0:
            kind = "the universal form of " if plan["universal"] else ""
            print(f"resumed from {kind}{where} (saved at layout {common['layout']}, "
                  f"ZeRO stage {common['zero_stage']})", flush=True)


# --- checkpoint tools ---------------------------------------------------------------------------
def to_universal(checkpoint: Path) -> Path:
    """Write `checkpoint/universal/` with DeepSpeed's ds_to_universal (atomically: a temporary
    directory renamed into place); the original checkpoint stays as it is."""
    checkpoint = Path(checkpoint)
    common = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    if common["layout"]["tp"] != 1:
        raise ValueError(f"{checkpoint} was saved with parallel.tensor={common['layout']['tp']}; universal "
                         f"conversion is supported for tensor-parallel size 1 only")
    final, tmp, staged = checkpoint / UNIVERSAL, checkpoint / f".{UNIVERSAL}.tmp", checkpoint / f".{UNIVERSAL}.input"
    for path in (tmp, staged):
        shutil.rmtree(path, ignore_errors=True)
    # ds_to_universal writes every module-state entry as a tensor; megatron's linears add
    # `_extra_state: None`. It reads a staged copy without them (optimizer shards linked, not copied);
    # the universal checkpoint then gets the original module states, which a strict load expects.
    staged.mkdir()
    model_files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
    for path in checkpoint.iterdir():
        if path.is_file() and path not in model_files:
            (staged / path.name).symlink_to(path.resolve())
    for path in model_files:
        state = torch.load(path, map_location="cpu", weights_only=False)
        state["module"] = {k: v for k, v in state["module"].items() if torch.is_tensor(v)}
        torch.save(state, staged / path.name)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(staged),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if common["zero_stage"] <= 2:
        command.append("--inject_missing_state")  # stages 1/2 checkpoints lack the fields it reads
    done = subprocess.run(command, capture_output=True, text=True)
    shutil.rmtree(staged)
    if done.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    for path in model_files:
        shutil.copy2(path, tmp / path.name)
    (checkpoint / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer, not ours
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def consolidated_state_dict(checkpoint: Path) -> dict:
    """One fp32 state dict (SessaLM parameter names, CPU tensors) from a DeepSpeed checkpoint
    saved at tensor-parallel size 1, for export or `SessaLM.load_state_dict`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = Path(checkpoint)
    common = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    if common["layout"]["tp"] != 1:
        raise ValueError(f"{checkpoint} was saved with parallel.tensor={common['layout']['tp']}; consolidation "
                         f"is supported for tensor-parallel size 1 only")
    if common["zero_stage"] == 0:  # no ZeRO shards: the module state holds the weights
        state = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    state = {k: v.float().contiguous() for k, v in state.items() if torch.is_tensor(v)}  # not megatron's _extra_state
    for name in common["scalar_params"]:  # trained as shape [1], see DeepSpeedTrainer._build_model
        state[name] = state[name].reshape(())
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.deepspeed_engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    universal = commands.add_parser("to-universal", help="add a universal checkpoint to an iter_NNNNNNN directory")
    universal.add_argument("checkpoint", type=Path)
    consolidate = commands.add_parser("consolidate", help="write one fp32 state dict (torch.save)")
    consolidate.add_argument("checkpoint", type=Path)
    consolidate.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    if args.command == "to-universal":
        print(f"wrote {to_universal(args.checkpoint)}")
    else:
        state = consolidated_state_dict(args.checkpoint)
        torch.save(state, args.output)
        print(f"wrote {args.output}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.2f}M values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
