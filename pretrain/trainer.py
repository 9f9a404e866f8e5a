"""The training loop: megatron-core DDP + (distributed) optimizer, driven by megatron's schedules.

    trainer = Trainer(load_config("configs/tiny.yaml"))
    try:
        trainer.train()
    finally:
        trainer.close()
"""
import collections
import contextlib
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.pipeline_parallel import get_forward_backward_func

from checkpoints import CheckpointManager
from checkpoints.megatron_fixes import apply_megatron_fixes, initialise_optimizer_state, load_optimizer_state
from data_pipeline.loader import build_dataloader, merge_dp_states
from data_pipeline.manifest import read_manifest
from data_pipeline.tokenizer import load_tokenizer
from model.generation import generate
from model.transformer import build_model, init_model_weights, megatron_config_for

from .config import ConfigError, RunConfig, save_config
from .distributed import init_distributed, shutdown_distributed
from .memory import estimate_memory_gb
from .metrics import MetricsLogger
from .runlock import acquire_for_training
from .scaling.flops import count_params, flops_per_token

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}  # reloadable at any DP size
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SHAPE_FIELDS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                "tie_embeddings", "vocab_pad_multiple")


def _no_weight_decay(param, name: str) -> bool:
    """Norms, biases and the gamma gate are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or ".gamma_" in name


class _TimedIterator:
    """Counts the seconds the training loop waits for the data loader."""

    def __init__(self, iterable):
        self.iterator = iter(iterable)
        self.wait_seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.iterator)
        self.wait_seconds += time.perf_counter() - start
        return batch


class _SharedBatches:
    """One micro-batch stream read by every model chunk of a rank (virtual pipeline stages): each
    chunk's forward steps ask for the same micro-batches in the same order; each is fetched once."""

    def __init__(self, iterator, readers: int):
        self.iterator = iterator
        self.buffer = collections.deque()
        self.first = 0  # micro-batch index of buffer[0]
        self.positions = [0] * readers

    def readers(self) -> list:
        return [self._read(i) for i in range(len(self.positions))]

    def _read(self, reader: int):
        while True:
            index = self.positions[reader]
            while index >= self.first + len(self.buffer):
                self.buffer.append(next(self.iterator))
            batch = self.buffer[index - self.first]
            self.positions[reader] += 1
            while self.buffer and min(self.positions) > self.first:  # every chunk has read it
                self.buffer.popleft()
                self.first += 1
            yield batch


class Trainer:
    def __init__(self, config: RunConfig):
        self.config = config
        self.env = init_distributed(config.parallel)
        self.device = self.env.device
        self.run_lock = acquire_for_training(config.run_dir)  # one live job per run directory
        apply_megatron_fixes()
        self._stop_signal = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request_stop)

        self.manifest = read_manifest(config.data.path)
        self.seq_len = self.manifest["seq_len"]
        self.tokenizer_id = self.manifest["tokenizer_id"]
        self._check_model_matches_data()
        self.num_microbatches = self._num_microbatches()

        if self.env.rank == 0:
            config.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, config.run_dir / "config.yaml")
        dist.barrier()
        self._seed(config.train.seed)
        self._build_model()
        self._build_optimizer()
        self.data_workers, lanes = self._data_layout()
        self.train_loader = build_dataloader(
            config.data.path, "train", config.train.micro_batch_size, self.env.dp_rank, self.env.dp_size,
            self.data_workers, config.data.seed, infinite=True, expected_tokenizer_id=self.tokenizer_id,
            lanes=lanes,
        )
        self.checkpoints = CheckpointManager(config.run_dir / "checkpoints", config.checkpoint.keep_last,
                                             config.checkpoint.keep_every)
        self.step = 0
        self.consumed_tokens = 0
        self.last_saved_step = None
        if config.checkpoint.resume:
            self._resume()
        self.logger = MetricsLogger(config, self.env.is_logger, self.step)
        self.logger.print(self._banner())

    # --- setup --------------------------------------------------------------------------------
    def _check_model_matches_data(self) -> None:
        vocab = self.manifest["vocab_size"]
        if self.config.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size ({self.config.model.vocab_size}) is smaller than the vocabulary "
                              f"of the tokenizer {self.tokenizer_id!r} used for {self.config.data.path} ({vocab}); "
                              f"set model.vocab_size: {vocab}")

    def _num_microbatches(self) -> int:
        train = self.config.train
        tokens_per_microbatch = train.micro_batch_size * self.seq_len * self.env.dp_size
        if train.global_batch_tokens % tokens_per_microbatch:
            raise ConfigError(
                f"train.global_batch_tokens ({train.global_batch_tokens}) must be a multiple of micro_batch_size "
                f"x seq_len x data-parallel size = {train.micro_batch_size} x {self.seq_len} x {self.env.dp_size} "
                f"= {tokens_per_microbatch}")
        microbatches = train.global_batch_tokens // tokens_per_microbatch
        parallel = self.config.parallel
        if parallel.virtual_stages > 1:  # megatron's interleaved schedule fills the pipeline first
            for name, count in (("micro-batches per step", microbatches), ("eval.batches", self.config.eval.batches)):
                if count < parallel.pipeline:
                    raise ConfigError(f"{name} ({count}) must be >= parallel.pipeline ({parallel.pipeline}) with "
                                      f"parallel.virtual_stages > 1; raise train.global_batch_tokens / eval.batches "
                                      f"or use parallel.virtual_stages: 1")
        return microbatches

    def _data_layout(self) -> tuple[int, int]:
        """(DataLoader workers, lanes per worker) such that each step reads exactly one sample from
        each of G streams, G = sequences per global batch. The loader's streams then do not depend
        on the data-parallel size: every layout trains on the same global batches, and a resume at
        another layout continues with the batches the uninterrupted run would have seen."""
        requested = self.config.data.num_workers
        # Each worker must serve the same number of micro-batches per step, so it must divide them.
        workers = max(w for w in range(1, max(requested, 1) + 1) if self.num_microbatches % w == 0)
        lanes = self.num_microbatches // workers * self.config.train.micro_batch_size
        return (workers if requested else 0), lanes

    def _seed(self, seed: int) -> None:
        # Same weights on every rank (init is layout independent); per-rank streams for anything random.
        random.seed(seed + self.env.rank)
        np.random.seed(seed + self.env.rank)
        torch.manual_seed(seed + self.env.rank)

    def _build_model(self) -> None:
        """This rank's model chunks: one per virtual pipeline stage (one without interleaving)."""
        cfg, env = self.config, self.env
        virtual = cfg.parallel.virtual_stages
        self.megatron_config = megatron_config_for(
            cfg.model, sequence_parallel=cfg.parallel.sequence_parallel, calculate_per_token_loss=True,
            virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None,
            batch_p2p_comm=self.device.type == "cuda",  # gloo's batched p2p mis-orders interleaved stages
        )
        stages = cfg.parallel.stage_layers(cfg.model.num_layers)
        self.chunks = []
        for v in range(virtual):
            stage = v * env.pp_size + env.pp_rank
            chunk = build_model(cfg.model, self.megatron_config, pre_process=stage == 0,
                                post_process=stage == len(stages) - 1, layer_numbers=stages[stage],
                                vp_stage=v if virtual > 1 else None)
            init_model_weights(chunk, cfg.train.seed)
            self.chunks.append(chunk.to(self.device))
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=cfg.optim.distributed,
        )
        self.ddp = [DistributedDataParallel(self.megatron_config, ddp_config, chunk, disable_bucketing=i > 0)
                    for i, chunk in enumerate(self.chunks)]
        self.megatron_config.finalize_model_grads_func = finalize_model_grads
        self.megatron_config.no_sync_func = [d.no_sync for d in self.ddp] if virtual > 1 else self.ddp[0].no_sync
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         and cfg.model.dtype == "float32" else contextlib.nullcontext())

    def _build_optimizer(self) -> None:
        cfg = self.config
        optim = OptimizerConfig(
            optimizer="adam", lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, weight_decay=cfg.optim.weight_decay,
            adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2, adam_eps=cfg.optim.eps,
            clip_grad=cfg.optim.grad_clip, use_distributed_optimizer=cfg.optim.distributed,
            bf16=cfg.model.dtype == "bfloat16", fp16=cfg.model.dtype == "float16",
            params_dtype=self.megatron_config.params_dtype,
        )
        no_decay = ParamKey(with_name_predicate=ParamWithNamePredicate(name="no_decay", fn=_no_weight_decay))
        self.optimizer = get_megatron_optimizer(optim, self.ddp, config_overrides={no_decay: ParamGroupOverride(wd_mult=0.0)})
        steps = cfg.train.max_steps
        wsd = cfg.schedule.style == "wsd"
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
            lr_warmup_steps=cfg.schedule.warmup_steps, lr_decay_steps=steps,
            lr_decay_style="WSD" if wsd else "cosine",
            override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,  # the config wins (extended runs)
            start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay, wd_incr_steps=steps,
            wd_incr_style="constant",
            wsd_decay_steps=max(1, round(cfg.schedule.wsd_decay_fraction * steps)) if wsd else None,
            lr_wsd_decay_style=cfg.schedule.wsd_decay_style if wsd else None,
        )

    def _banner(self) -> str:
        cfg, env = self.config, self.env
        params = count_params(cfg.model)
        memory = estimate_memory_gb(cfg, self.seq_len, env.dp_size)
        return (f"run {cfg.run_name}: {params / 1e6:.2f}M parameters, seq_len {self.seq_len}, "
                f"world {env.world_size} (TP {env.tp_size} x PP {env.pp_size} x DP {env.dp_size}"
                f"{f', {cfg.parallel.virtual_stages} virtual stages' if cfg.parallel.virtual_stages > 1 else ''}), "
                f"{self.num_microbatches} micro-batches of {cfg.train.micro_batch_size} per rank and step, "
                f"{self.data_workers} data workers per rank"
                f"{'' if self.data_workers == cfg.data.num_workers else ' (a divisor of the micro-batches)'}, "
                f"device {self.device}, estimated {memory['total']:.2f} GB per device; "
                f"start at step {self.step}/{cfg.train.max_steps}")

    # --- one step -----------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        target_mask = (batch["doc_ids"][:, 1:] >= 0).to(self.device)  # padding only ends a split
        with self.autocast:
            per_token_loss = model(tokens[:, :-1], tokens[:, 1:])
        return per_token_loss, lambda output: self._loss_func(output, target_mask)

    @staticmethod
    def _loss_func(per_token_loss, target_mask):
        mask = target_mask.to(per_token_loss.dtype)
        total = (per_token_loss.float() * mask).sum()
        count = target_mask.sum().to(torch.int)
        return total, count, {"lm loss": torch.stack((total.detach(), count.float()))}

    def _mean_loss(self, reduced: list[dict]) -> float:
        """Token-weighted loss over micro-batches and data-parallel ranks, known to every stage."""
        totals = torch.zeros(2, device=self.device)
        for entry in reduced:  # only the last pipeline stage computes losses
            totals += entry["lm loss"].to(self.device)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        return (totals[0] / totals[1]).item()

    def _chunk_iterators(self, iterator):
        """megatron's schedules take one data iterator per model chunk when stages interleave."""
        return iterator if len(self.chunks) == 1 else _SharedBatches(iterator, len(self.chunks)).readers()

    def _train_step(self, iterator) -> tuple[float, float]:
        for chunk in self.ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iterator, model=self.ddp,
            num_microbatches=self.num_microbatches, seq_length=self.seq_len,
            micro_batch_size=self.config.train.micro_batch_size, forward_only=False,
        )
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return self._mean_loss(reduced), float(grad_norm or 0.0)

    def evaluate(self) -> dict:
        cfg = self.config
        loader = build_dataloader(cfg.data.path, "val", cfg.train.micro_batch_size, self.env.dp_rank,
                                  self.env.dp_size, 0, cfg.data.seed, infinite=True,
                                  expected_tokenizer_id=self.tokenizer_id)
        for chunk in self.ddp:
            chunk.eval()
        with torch.no_grad():
            reduced = get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=self._chunk_iterators(iter(loader)),
                model=self.ddp, num_microbatches=cfg.eval.batches, seq_length=self.seq_len,
                micro_batch_size=cfg.train.micro_batch_size, forward_only=True,
            )
        for chunk in self.ddp:
            chunk.train()
        loss = self._mean_loss(reduced)
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.config
        timed = _TimedIterator(self.train_loader)
        iterator = self._chunk_iterators(timed)
        flops = flops_per_token(cfg.model, self.seq_len)
        last_save = time.time()
        interval = cfg.logging.interval
        window_start, window_wait, window_step = time.perf_counter(), 0.0, self.step
        while self.step < cfg.train.max_steps:
            loss, grad_norm = self._train_step(iterator)
            self.step += 1
            self.consumed_tokens += cfg.train.global_batch_tokens
            if self.step % interval == 0 or self.step == cfg.train.max_steps:
                elapsed = time.perf_counter() - window_start
                steps_in_window = self.step - window_step  # fewer than `interval` after a resume
                tokens_per_s = steps_in_window * cfg.train.global_batch_tokens / elapsed
                metrics = {
                    "train/loss": loss, "train/lr": self.optimizer.param_groups[0]["lr"], "train/grad_norm": grad_norm,
                    "train/tokens_per_s": tokens_per_s, "train/consumed_tokens": self.consumed_tokens,
                    "perf/model_tflops_per_device": flops * tokens_per_s / self.env.world_size / 1e12,
                    "perf/data_wait_s": timed.wait_seconds - window_wait,
                    "perf/step_s": elapsed / steps_in_window,
                    "perf/memory_gb": self._memory_gb(),
                }
                if cfg.logging.peak_tflops:
                    metrics["perf/mfu"] = metrics["perf/model_tflops_per_device"] / cfg.logging.peak_tflops
                self.logger.log(self.step, metrics)
                self.logger.advance(steps_in_window, {"loss": f"{loss:.3f}", "lr": f"{metrics['train/lr']:.2e}",
                                                      "tok/s": f"{tokens_per_s:.0f}"})
                if not cfg.logging.progress_bar:
                    self.logger.print(f"step {self.step} loss {loss:.4f} lr {metrics['train/lr']:.3e} "
                                      f"grad_norm {grad_norm:.3f} tok/s {tokens_per_s:.0f}")
                window_start, window_wait, window_step = time.perf_counter(), timed.wait_seconds, self.step

            if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.train.max_steps:
                self._log_eval()
            stop, time_due = self._agree_on_flags(last_save)
            exit_due = bool(cfg.train.exit_interval) and self.step % cfg.train.exit_interval == 0
            if exit_due and self.step < cfg.train.max_steps:
                self.save()
                self.logger.print(f"train.exit_interval: saved step {self.step}, exiting")
                return
            if stop or time_due or (cfg.checkpoint.interval_steps and self.step % cfg.checkpoint.interval_steps == 0):
                if not stop or cfg.checkpoint.save_on_exit:
                    self.save()
                    last_save = time.time()
            if stop:
                self.logger.print(f"received {self._stop_signal_name()}: saved step {self.step}, exiting")
                return
        if cfg.checkpoint.save_on_exit and self.last_saved_step != self.step:
            self.save()
        self._log_eval()
        self._print_sample()

    def _log_eval(self) -> None:
        metrics = self.evaluate()
        self.logger.log(self.step, metrics)
        self.logger.print(f"step {self.step}: val loss {metrics['val/loss']:.4f}, ppl {metrics['val/ppl']:.2f}")

    def _agree_on_flags(self, last_save: float) -> tuple[bool, bool]:
        """Every rank must take the same decision to stop or save: OR the local flags over the world."""
        minutes = self.config.checkpoint.interval_minutes
        flags = torch.tensor([self._stop_signal is not None,
                              bool(minutes) and time.time() - last_save >= minutes * 60], dtype=torch.int32,
                             device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def _request_stop(self, signum, frame):
        self._stop_signal = signum

    def _stop_signal_name(self) -> str:
        return signal.Signals(self._stop_signal).name if self._stop_signal else "a stop request from another rank"

    def _memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        import psutil

        return psutil.Process().memory_info().rss / 2**30

    def _print_sample(self) -> None:
        cfg = self.config
        if not cfg.eval.sample_tokens:
            return
        if len(self.chunks) > 1 or self.env.pp_size > 1 or cfg.parallel.sequence_parallel:
            self.logger.print("no sample: decoding needs the whole model on one rank and no sequence parallelism")
            return
        if cfg.model.arch != "sessa":
            self.logger.print(f"no sample: decoding with caches is implemented for Sessa, not {cfg.model.arch}")
            return
        model = self.chunks[0]
        tokenizer = load_tokenizer(self.manifest["tokenizer"]["spec"])
        prompt = torch.tensor([tokenizer.encode(cfg.eval.sample_prompt)], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
        model.eval()
        with self.autocast:
            out = generate(model, prompt, cfg.eval.sample_tokens, temperature=cfg.eval.sample_temperature,
                           top_k=cfg.eval.sample_top_k, generator=generator)
        model.train()
        self.logger.print(f"sample after step {self.step}:\n{tokenizer.decode(out[0].tolist())}")

    # --- checkpoints --------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def _set_rng_state(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"])

    def _layout(self) -> dict:
        env = self.env
        return {"world_size": env.world_size, "tp": env.tp_size, "pp": env.pp_size, "dp": env.dp_size}

    def _sharded_state(self, *, loading: bool, saved_layout: dict | None = None) -> dict:
        env = self.env
        model_state = {}
        for chunk in self.chunks:  # keys carry global layer numbers: chunks never collide
            model_state.update(chunk.sharded_state_dict(prefix="model."))
        layout = saved_layout or self._layout()
        state = {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=loading, metadata=OPTIMIZER_SHARDING),
            # Every data-parallel rank's loader position; loaded by all ranks so the DP size may change.
            # Loading: every rank reads all of them (only DP rank 0's request counts as the main replica).
            "data": [ShardedObject("data_loader_state", None if loading else self.train_loader.state_dict(),
                                   (layout["dp"],), (i,), replica_id=(env.tp_rank, env.pp_rank, env.dp_rank if loading else 0))
                     for i in (range(layout["dp"]) if loading else [env.dp_rank])],
            "step": self.step, "consumed_tokens": self.consumed_tokens,
            "scheduler": self.scheduler.state_dict(), "config": self.config.to_dict(),
            "tokenizer_id": self.tokenizer_id, "layout": self._layout(),
        }
        if not loading or layout["world_size"] == env.world_size:
            state["rng"] = ShardedObject("rng_state", None if loading else self._rng_state(),
                                         (layout["world_size"],), (env.rank,), replica_id=0)
        return state

    def save(self) -> None:
        # A stop signal arriving now waits until the checkpoint is complete; the writer processes
        # megatron starts for the save inherit the mask, so a signal sent to the whole process
        # group cannot kill them mid-write either.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            path = self.checkpoints.save(self.step, self._sharded_state(loading=False))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.last_saved_step = self.step
        self.logger.print(f"saved checkpoint {path}")

    def _resume(self) -> None:
        self.checkpoints.remove_partial_saves()
        step = self.checkpoints.latest_step()
        if step is None:
            return
        if (self.checkpoints.step_dir(step) / "trainer_state.pt").is_file():
            raise ConfigError(f"checkpoint {self.checkpoints.step_dir(step)} was written by engine: deepspeed; "
                              f"resume it with --engine deepspeed, or start a new run_name")
        common = self.checkpoints.load_common(step)
        self._check_checkpoint_compatible(common, step)
        initialise_optimizer_state(self.optimizer)
        loaded = self.checkpoints.load(step, self._sharded_state(loading=True, saved_layout=common["layout"]))
        for chunk in self.chunks:
            keys = chunk.sharded_state_dict(prefix="model.").keys()
            chunk.load_global_state_dict({k: loaded["model"][k] for k in keys}, prefix="model.")
        load_optimizer_state(self.optimizer, loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["scheduler"])
        data_states = list(loaded["data"])
        shape = ("dp_size", "workers", "lanes")
        saved_layout, our_layout = data_states[0]["layout"], self.train_loader.state_dict()["layout"]
        if all(saved_layout[k] == our_layout[k] for k in shape):
            self.train_loader.load_state_dict(data_states[self.env.dp_rank])
        else:  # another DP size, worker count or batch shape: re-deal what is left of the epoch
            self.train_loader.load_state_dict(merge_dp_states(data_states, self.env.dp_rank, self.env.dp_size))
        if "rng" in loaded:
            self._set_rng_state(loaded["rng"])
        else:  # another world size: fresh per-rank streams, reproducible from the step
            self._seed(self.config.train.seed + step)
        self.step, self.consumed_tokens = loaded["step"], loaded["consumed_tokens"]
        self.last_saved_step = step
        if self.env.rank == 0:
            print(f"resumed from {self.checkpoints.step_dir(step)} (saved at layout {common['layout']})", flush=True)

    def _check_checkpoint_compatible(self, common: dict, step: int) -> None:
        where = self.checkpoints.step_dir(step)
        saved, ours = common["config"]["model"], self.config.model.to_dict()
        differing = [f"{k}: checkpoint {saved.get(k)!r} vs config {ours[k]!r}" for k in SHAPE_FIELDS
                     if saved.get(k) != ours[k]]
        if differing:
            raise ConfigError(f"checkpoint {where} was saved for another model shape ({'; '.join(differing)}); "
                              f"use the checkpoint's model settings or a new run_name / --checkpoint.resume false")
        if common["tokenizer_id"] != self.tokenizer_id:
            raise ConfigError(f"checkpoint {where} was trained with tokenizer {common['tokenizer_id']!r} but "
                              f"{self.config.data.path} uses {self.tokenizer_id!r}; prepare the data with the "
                              f"checkpoint's tokenizer or start a new run")

    def close(self) -> None:
        if hasattr(self, "train_loader"):
            self.train_loader.close()
        if hasattr(self, "logger"):
            self.logger.close()
        shutdown_distributed()
