"""The training loop, once for both engines: data, schedule, logging, evaluation, checkpoint cadence,
preemption and non-finite steps. What differs between megatron-core and DeepSpeed lives behind the
small interface of pretrain/engines/.

    trainer = Trainer(load_config("configs/tiny.yaml"))
    try:
        trainer.train()
    finally:
        trainer.close()

Stopping: SIGTERM or SIGUSR1 (a cluster's preemption, `scancel`, Ctrl-C via launch/local.sh) sets a
flag; every rank agrees after the step in flight, saves and returns. A non-finite loss or gradient norm
drops that step's update (`train.nonfinite: skip`, megatron engine) or stops at once (`stop`); after
`train.nonfinite_limit` in a row the run stops with NonFiniteError, saving nothing, so `latest` stays
the last good checkpoint. A loss or gradient-norm spike is logged, dropped, or rolled back to the last
checkpoint (`train.spike`, pretrain/spikes.py). A rank that finishes no step for `train.hang_timeout_s` writes
its stacks and exits (pretrain/watchdog.py); every logging interval names the slowest rank (pretrain/stragglers.py).

Campaigns (`stages:`, pretrain/stages.py): the loop trains each stage's config in turn. At a boundary it
evaluates, saves, and rebuilds what the next stage changes: always the loader (a fresh one over the
stage's data) and the schedule; the engine only where the model, the layout or the batch shape changes,
loaded from the boundary's checkpoint as a resume would (megatron's groups re-made for a new layout).
A resume on the boundary step starts the next stage the same way, so a run killed anywhere resumes
exactly; every metrics line carries `stage`.
"""
import contextlib
import functools
import gc
import math
import os
import signal
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.profiler import record_function

from checkpoints import CheckpointManager
from checkpoints.importer import WEIGHTS_ONLY
from data_pipeline.loader import build_dataloader
from data_pipeline.manifest import read_manifest
from data_pipeline.mixture import MixtureSource, SourceExhausted, build_mixture_loader, check_sources
from data_pipeline.tokenizer import load_tokenizer
from model.documents import visible_pairs
from model.flops import count_params, ledger
from model.generation import generate
from model.profile_ranges import DATA_WAIT

from .config import ConfigError, RunConfig, save_config
from .distributed import init_distributed, shutdown_distributed
from .engines import engine_class
from .memory import estimate_memory_gb
from .metrics import MetricsLogger, model_tflops_per_device
from .profiling import StepProfiler
from .runlock import acquire_for_training
from .spikes import SpikeMonitor
from .stages import resolve_stages, schedule_config, stage_index_at
from .state import TrainState, build_scheduler, check_checkpoint_compatible, layout_of, restore_loader, \
    rng_state, seed_everything, set_rng_state
from .stragglers import straggler_metrics
from .watchdog import HangWatchdog

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Test only (tests/pretrain/test_stragglers.py, tests/launch/test_slurm.py): "RANK:SECONDS" makes that
# rank wait SECONDS longer for each micro-batch, a stand-in for a slow data path
TEST_DATA_DELAY_ENV = "PRETRAIN_TEST_DATA_DELAY"


def _test_data_delay(rank: int) -> float:
    delayed_rank, _, seconds = os.environ.get(TEST_DATA_DELAY_ENV, "").partition(":")
    return float(seconds) if delayed_rank == str(rank) else 0.0


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients and stopped (train.nonfinite)."""


def _unwatched(method):
    """A Trainer method the hang watchdog does not time (saves, evaluations: they may take longer than
    train.hang_timeout_s; their collectives keep parallel.timeout_minutes)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self.watchdog.paused():
            return method(self, *args, **kwargs)
    return call


class _TimedIterator:
    """Counts the seconds the training loop waits for the data loader and, with document masking, the
    (query, key) pairs the model gets to see (for the FLOP count)."""

    def __init__(self, iterable, count_pairs: bool = False, test_delay_s: float = 0.0):
        self.iterator = iter(iterable)
        self.test_delay_s = test_delay_s
        self.wait_seconds = 0.0
        self.count_pairs = count_pairs
        self.sequences = self.pairs = 0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        with record_function(DATA_WAIT):
            batch = next(self.iterator)
            if self.test_delay_s:
                time.sleep(self.test_delay_s)
        self.wait_seconds += time.perf_counter() - start
        if self.count_pairs:
            inputs = batch["doc_ids"][:, :-1]
            self.sequences += inputs.shape[0]
            self.pairs += visible_pairs(inputs)
        return batch


class Trainer:
    def __init__(self, config: RunConfig):
        self.recipe = config  # with stages: the campaign; self.config is the current stage's config
        self.stages = resolve_stages(config)
        self.stage, self.config = self.stages[0], self.stages[0].config
        self.env = init_distributed(self.config.parallel, hangs_dir=config.run_dir / "hangs")
        self.device = self.env.device
        self._lock_run_and_catch_stop_signals()
        Engine = engine_class(config)
        plan = self._resume_plan(Engine)
        self.stage = self.stages[stage_index_at(self.stages, plan.step if plan else 0)]
        self.config = self.stage.config
        self._set_layout(self.stages[0].config.parallel)
        self._check_stages_data()
        self._read_data_manifest()
        if plan is not None:
            check_checkpoint_compatible(plan.common, plan.directory, self.config, self.tokenizer_id)
        self._save_run_config()
        seed_everything(config.train.seed, self.env.rank)
        self.engine = Engine(self.config, self.env, plan, seq_len=self.seq_len, num_microbatches=self.num_microbatches)
        self._build_schedulers()
        self.train_loader = self._build_train_loader()
        self.state = TrainState()
        self.nonfinite_streak = 0
        self.spikes = SpikeMonitor(config.train.spike)
        self.watchdog = HangWatchdog(config.train.hang_timeout_s, self.env.rank, self.env.world_size,
                                     config.run_dir / "hangs")
        if plan is not None:
            self._resume(plan)
        self.eval_tasks = self._load_eval_tasks()
        self.logger = MetricsLogger(config, self.env.is_logger, self.state.step)
        self.logger.print(self._banner())

    # --- setup --------------------------------------------------------------------------------
    def _lock_run_and_catch_stop_signals(self) -> None:
        self.run_lock = acquire_for_training(self.config.run_dir)  # one live job per run directory
        self._stop_signal = self._stop_time = None
        self._grace_checked = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request_stop)

    def _read_data_manifest(self) -> None:
        """The prepared data fixes seq_len and the tokenizer; the model and batch must fit them."""
        self.sources, self.manifest, self.num_microbatches = self._stage_data(self.config, self.env.dp_size)
        self.seq_len = self.manifest["seq_len"]
        self.tokenizer_id = self.manifest["tokenizer_id"]

    def _stage_data(self, config: RunConfig, dp_size: int) -> tuple[list, dict, int]:
        """(mixture sources, manifest, micro-batches per step) of a config's data, checked against its model
        and batch."""
        sources = [MixtureSource(s.name, s.path, s.weight, s.max_repetition) for s in config.data.sources]
        if sources:  # they share tokenizer and seq_len (checked): the first one's manifest speaks for all
            try:
                manifest = check_sources(sources)[0]
            except ValueError as err:
                raise ConfigError(f"data.sources: {err}") from None
        else:
            manifest = read_manifest(config.data.path)
        self._check_model_matches_data(config, manifest)
        return sources, manifest, self._num_microbatches(config, manifest["seq_len"], dp_size)

    def _check_stages_data(self) -> None:
        """A campaign's every stage, before training: its layout fits the world, its batch its data, and
        its tokenizer is the first stage's (refused now rather than at its boundary)."""
        if not self.stage.name:
            return
        world, model_parallel = self.env.world_size, {}
        for stage in self.stages:
            parallel = stage.config.parallel
            model_parallel[stage.name] = parallel.tensor * parallel.pipeline * parallel.context
            if world % model_parallel[stage.name]:
                raise ConfigError(f"stage {stage.name!r}: world size {world} is not divisible by parallel.tensor x "
                                  f"parallel.pipeline x parallel.context = {model_parallel[stage.name]}")
        first = None
        for stage in self.stages:
            try:
                manifest = self._stage_data(stage.config, world // model_parallel[stage.name])[1]
            except (ConfigError, OSError, ValueError) as err:
                raise ConfigError(f"stage {stage.name!r}: {err}") from None
            where = stage.config.data.path
            if first is None:
                first = (stage.name, where, manifest["tokenizer_id"])
            elif manifest["tokenizer_id"] != first[2]:
                raise ConfigError(f"stage {stage.name!r} reads {where}, tokenised with {manifest['tokenizer_id']!r}, "
                                  f"but stage {first[0]!r} reads {first[1]}, tokenised with {first[2]!r}: every "
                                  f"stage needs the same tokenizer (prepare the data with one)")

    def _set_layout(self, current) -> None:
        """megatron's parallel groups and the context-parallel layout for self.config.parallel, set again
        when `current` (the ParallelConfig they were set for) differs."""
        parallel = self.config.parallel
        fields = lambda p: (p.tensor, p.pipeline, p.virtual_stages, p.context, p.context_layout)  # noqa: E731
        if fields(current) != fields(parallel):
            parallel_state.destroy_model_parallel()
            self.env = init_distributed(parallel)

    def _save_run_config(self) -> None:
        if self.env.rank == 0:
            self.config.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.recipe, self.config.run_dir / "config.yaml")
        dist.barrier()

    def _resume_plan(self, Engine):
        """What to load from the run's latest complete checkpoint; None for a fresh start."""
        if not self.config.checkpoint.resume:
            return None
        manager = CheckpointManager(self.config.run_dir / "checkpoints")
        manager.remove_partial_saves()
        step = manager.latest_step()
        if step is None:
            return None
        return Engine.resume_plan(manager, step)

    def _build_schedulers(self) -> None:
        """The run's schedule over all its steps and, for a stage with its own, the stage's over its steps
        (built last: its learning rate is the one applied)."""
        self.scheduler = build_scheduler(self.engine.optimizer, self.recipe)
        self.stage_scheduler = (build_scheduler(self.engine.optimizer, schedule_config(self.stage, self.recipe))
                                if self.stage.own_schedule else None)

    def _load_schedulers(self, common: dict) -> None:
        """A checkpoint's schedule positions; a stage's own schedule only from a checkpoint inside it."""
        self.scheduler.load_state_dict(common["scheduler"])
        saved = common.get("stage_scheduler")
        if self.stage_scheduler is not None:
            if saved and saved["stage"] == self.stage.name:
                self.stage_scheduler.load_state_dict(saved["state"])
            else:
                self.stage_scheduler.step(increment=0)  # the stage's first learning rate, over the run's

    def _build_train_loader(self):
        config = self.config
        self.data_workers, lanes = self._data_layout()
        seed = config.data.seed + self.stages.index(self.stage)  # a stage re-reading a directory reads it anew
        if self.sources:
            return build_mixture_loader(
                self.sources, "train", config.train.global_batch_tokens // self.seq_len, config.train.micro_batch_size,
                self.env.dp_rank, self.env.dp_size, self.data_workers, seed, expected_tokenizer_id=self.tokenizer_id)
        return build_dataloader(
            config.data.path, "train", config.train.micro_batch_size, self.env.dp_rank, self.env.dp_size,
            self.data_workers, seed, infinite=True, expected_tokenizer_id=self.tokenizer_id,
            lanes=lanes,
        )

    @staticmethod
    def _check_model_matches_data(config: RunConfig, manifest: dict) -> None:
        vocab = manifest["vocab_size"]
        if config.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) is smaller than the vocabulary "
                              f"of the tokenizer {manifest['tokenizer_id']!r} used for {config.data.path} ({vocab}); "
                              f"set model.vocab_size: {vocab}")

    @staticmethod
    def _num_microbatches(config: RunConfig, seq_len: int, dp_size: int) -> int:
        train = config.train
        tokens_per_microbatch = train.micro_batch_size * seq_len * dp_size
        if train.global_batch_tokens % tokens_per_microbatch:
            raise ConfigError(
                f"train.global_batch_tokens ({train.global_batch_tokens}) must be a multiple of micro_batch_size "
                f"x seq_len x data-parallel size = {train.micro_batch_size} x {seq_len} x {dp_size} "
                f"= {tokens_per_microbatch}")
        microbatches = train.global_batch_tokens // tokens_per_microbatch
        parallel = config.parallel
        if parallel.virtual_stages > 1:  # megatron's interleaved schedule fills the pipeline first
            for name, count in (("micro-batches per step", microbatches), ("eval.batches", config.eval.batches)):
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

    def _load_eval_tasks(self) -> list:
        """eval.tasks, read once (task files, synthetic tasks with the training data's seed and knobs)."""
        if not self.config.eval.tasks:
            return []
        from .evaluate import load_tasks

        trained = self.manifest.get("task") or {}
        try:
            return load_tasks(self.config.eval.tasks, prompt_field=trained.get("prompt_field") or "prompt",
                              answer_field=trained.get("answer_field") or "answer",
                              separator=trained.get("separator"), trained_sources=self.manifest.get("sources", ()))
        except (ValueError, OSError) as err:
            raise ConfigError(f"eval.tasks {self.config.eval.tasks!r}: {err}") from None

    def _banner(self) -> str:
        cfg, env = self.config, self.env
        memory = estimate_memory_gb(cfg, self.seq_len, env.dp_size)
        context = f" x CP {env.cp_size}" if env.cp_size > 1 else ""
        workers = (f"{self.data_workers} data workers per rank" if self.data_workers == cfg.data.num_workers else
                   f"{self.data_workers} data workers per rank (data.num_workers {cfg.data.num_workers} does not "
                   f"divide the {self.num_microbatches} micro-batches per step: each worker serves whole "
                   f"micro-batches of every step, so the largest divisor is used)")
        stage = (f"stage {self.stage.name!r} (steps {self.stage.first_step + 1}-{self.stage.last_step}"
                 f"{', its own schedule' if self.stage.own_schedule else ''}) of " if self.stage.name else "")
        return (f"{stage}run {cfg.run_name}: {count_params(cfg.model) / 1e6:.2f}M parameters ({cfg.model.arch}), "
                f"seq_len {self.seq_len}, world {env.world_size} (TP {env.tp_size} x PP {env.pp_size}{context} x DP "
                f"{env.dp_size}), {self.num_microbatches} micro-batches of {cfg.train.micro_batch_size} per rank "
                f"and step, {workers}, document masking {'on' if cfg.data.document_masking else 'off'}, "
                f"{self.engine.banner()}, device {self.device}, estimated {memory['total']:.2f} GB per device; "
                f"start at step {self.state.step}/{cfg.train.max_steps}{self._mixture_plan()}")

    def _mixture_plan(self) -> str:
        """Each source's share and the epochs of it the run (its stage) reads, against its max_repetition."""
        if not self.sources:
            return ""
        run_sequences = self.stage.steps * self.config.train.global_batch_tokens // self.seq_len
        total = sum(s.weight for s in self.sources)
        lines = []
        for source, split in zip(self.sources, self.train_loader.dataset.splits):
            epochs = source.weight / total * run_sequences / split.table.n_samples
            over = " (more than max_repetition: the run will stop early)" if epochs > source.max_repetition else ""
            lines.append(f"\n  data source {source.name!r}: {source.weight / total:.1%} of the sequences, "
                         f"{split.table.n_samples} in {source.path}, {epochs:.2f} epochs over the run, "
                         f"max_repetition {source.max_repetition}{over}")
        return "".join(lines)

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> None:
        """Train to train.max_steps, a stop signal or train.exit_interval, watched for hangs."""
        self.watchdog.start(self.state.step)
        try:
            self._train_steps()
            self._finish_saves(wait=True)  # an asynchronous save in flight is published before training returns
        finally:
            self.watchdog.stop()

    def _train_steps(self) -> None:
        cfg, state = self.config, self.state
        timed, flop_ledger, causal_pairs = self._stage_counters()
        last_save = time.time()
        interval = cfg.logging.interval
        window_start, window_wait, window_step = time.perf_counter(), 0.0, state.step
        window_sequences = window_pairs = 0
        window_own_s = 0.0  # this rank's step time less its wait at the gradient reduction (pretrain/stragglers.py)
        self.profiler = StepProfiler(cfg.profile, self.env.rank, cfg.run_dir, self.device)
        while state.step < cfg.train.max_steps:
            step_start, reduction_wait_s = time.perf_counter(), self.engine.reduction_wait_s
            self._check_data_left()
            with self.profiler.step(state.step + 1):
                result = self._train_step(timed)
            step_s = time.perf_counter() - step_start
            window_own_s += step_s - (self.engine.reduction_wait_s - reduction_wait_s)
            state.step += 1
            self.watchdog.progress(state.step)
            state.consumed_tokens += cfg.train.global_batch_tokens
            self._account_nonfinite(result)
            if self._spiked(result):  # rolled back: the loop goes on from the checkpoint's step
                window_start, window_wait, window_step = time.perf_counter(), timed.wait_seconds, state.step
                window_sequences, window_pairs, window_own_s = timed.sequences, timed.pairs, 0.0
                continue
            if result.applied:
                self.scheduler.step(increment=1)
                if self.stage_scheduler is not None:  # the stage's own schedule sets the learning rate
                    self.stage_scheduler.step(increment=1)
            self._log_new_epochs()
            if state.step % interval == 0 or state.step == cfg.train.max_steps:
                elapsed = time.perf_counter() - window_start
                steps_in_window = state.step - window_step  # fewer than `interval` after a resume
                tokens_per_s = steps_in_window * cfg.train.global_batch_tokens / elapsed
                lr = self.engine.optimizer.param_groups[0]["lr"]
                # model FLOPs count only the pairs documents can see (this rank's batches stand for all)
                sequences = timed.sequences - window_sequences
                visible = (timed.pairs - window_pairs) / (sequences * causal_pairs) if sequences else 1.0
                flops = flop_ledger.per_token_visible(visible)
                metrics = {
                    "train/loss": result.loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                    "train/tokens_per_s": tokens_per_s, "train/consumed_tokens": state.consumed_tokens,
                    "train/skipped_steps": state.skipped_steps, "train/spike": self.spikes.since_log,
                    "perf/model_tflops_per_device": model_tflops_per_device(flops, tokens_per_s, self.env.world_size),
                    "perf/visible_pair_fraction": visible,
                    "perf/data_wait_s": timed.wait_seconds - window_wait,
                    "perf/step_s": elapsed / steps_in_window,
                    "perf/memory_gb": self._memory_gb(),
                    **straggler_metrics(window_own_s / steps_in_window, timed.wait_seconds - window_wait, self.device),
                    **self._source_tokens(),
                    **self._stage_metric(),
                }
                if cfg.logging.peak_tflops:
                    metrics["perf/mfu"] = metrics["perf/model_tflops_per_device"] / cfg.logging.peak_tflops
                self.logger.log(state.step, metrics)
                self.spikes.since_log = 0
                self.logger.advance(steps_in_window, {"loss": f"{result.loss:.3f}", "lr": f"{lr:.2e}",
                                                      "tok/s": f"{tokens_per_s:.0f}"})
                if self.logger.bar is None:  # no progress bar (disabled, or not a terminal): a plain line
                    self.logger.print(f"step {state.step} loss {result.loss:.4f} lr {lr:.3e} "
                                      f"grad_norm {result.grad_norm:.3f} tok/s {tokens_per_s:.0f}")
                window_start, window_wait, window_step = time.perf_counter(), timed.wait_seconds, state.step
                window_sequences, window_pairs, window_own_s = timed.sequences, timed.pairs, 0.0

            stage_ends = state.step == self.stage.last_step
            if (stage_ends or cfg.eval.interval and state.step % cfg.eval.interval == 0) \
                    and state.step < cfg.train.max_steps:
                self._log_eval()
            self._finish_saves(wait=False, step_s=step_s)
            stop, time_due = self._agree_on_flags(last_save)
            exit_due = bool(cfg.train.exit_interval) and state.step % cfg.train.exit_interval == 0
            if exit_due and state.step < cfg.train.max_steps:
                self.save()
                self._finish_saves(wait=True)
                self.logger.print(f"train.exit_interval: saved step {state.step}, exiting")
                return
            if stop or time_due or (cfg.checkpoint.interval_steps and state.step % cfg.checkpoint.interval_steps == 0):
                if not stop or cfg.checkpoint.save_on_exit:
                    save_s = self.save()
                    last_save = time.time()
                    if not stop and not cfg.checkpoint.async_save:  # asynchronous: checked when published
                        self._check_term_grace(save_s, step_s)
            if stop:
                self._finish_saves(wait=True)
                waited = f"{time.monotonic() - self._stop_time:.1f} s after the signal; " if self._stop_time else ""
                self.logger.print(f"received {self._stop_signal_name()}: saved step {state.step}, exiting "
                                  f"({waited}launch.term_grace_s {cfg.launch.term_grace_s} s)")
                return
            if stage_ends and state.step < cfg.train.max_steps:
                self._enter_stage(self.stages[self.stages.index(self.stage) + 1])
                cfg, last_save = self.config, time.time()
                timed, flop_ledger, causal_pairs = self._stage_counters()
                window_start, window_wait, window_step = time.perf_counter(), 0.0, state.step
                window_sequences = window_pairs = 0
                window_own_s = 0.0
        if cfg.checkpoint.save_on_exit and state.last_saved_step != state.step:
            self.save()
        self._log_eval()
        self._print_sample()

    def _stage_counters(self):
        """The data iterator that times and counts the current stage's batches, its FLOP ledger and
        the number of causal (query, key) pairs of one of its sequences."""
        timed = _TimedIterator(self.train_loader, count_pairs=self.config.data.document_masking,
                               test_delay_s=_test_data_delay(self.env.rank))
        return timed, ledger(self.config.model, self.seq_len), self.seq_len * (self.seq_len + 1) // 2

    def _stage_metric(self) -> dict:
        return {"stage": self.stage.name} if self.stage.name else {}

    @_unwatched
    def _enter_stage(self, stage) -> None:
        """A boundary: save this step, then rebuild what `stage` changes. The loader is always new (the
        stage's data from its start) and so is the stage's own schedule; the engine is rebuilt from the
        boundary's checkpoint, as a resume would, where the model, the parallel layout, the batch shape or
        the document masking change."""
        if self.state.last_saved_step != self.state.step:
            self.save()
        self._finish_saves(wait=True)
        before, seq_len_before = self.config, self.seq_len
        self.stage, self.config = stage, stage.config
        self.train_loader.close()
        self._set_layout(before.parallel)
        self._read_data_manifest()
        engine_inputs = lambda c: (c.model, c.parallel, c.train, c.data.document_masking, c.data.reset_positions)  # noqa: E731
        if (*engine_inputs(before), seq_len_before) != (*engine_inputs(self.config), self.seq_len):
            Engine = type(self.engine)
            self.engine = self.scheduler = self.stage_scheduler = None
            gc.collect()  # the old model and optimizer go before the new ones come
            plan = Engine.resume_plan(CheckpointManager(self.config.run_dir / "checkpoints"), self.state.step)
            self.engine = Engine(self.config, self.env, plan, seq_len=self.seq_len,
                                 num_microbatches=self.num_microbatches)
            self._build_schedulers()
            self.train_loader = self._build_train_loader()
            self._resume(plan)
        else:
            self.train_loader = self._build_train_loader()
            self.stage_scheduler = (build_scheduler(self.engine.optimizer, schedule_config(stage, self.recipe))
                                    if stage.own_schedule else None)
            if self.stage_scheduler is None:
                self.scheduler.step(increment=0)  # the run's learning rate again
            self._forget_spike_windows()
        self.eval_tasks = self._load_eval_tasks()
        self.logger.print(self._banner())

    def _forget_spike_windows(self) -> None:
        """At a stage's start: its losses (another length, other data) are not compared with the last stage's."""
        for window in self.spikes.windows.values():
            window.clear()

    def _account_nonfinite(self, result) -> None:
        """Count dropped updates; stop (saving nothing) when the policy or the streak says so."""
        if math.isfinite(result.loss) and math.isfinite(result.grad_norm):  # (a spike's drop is train.spike's)
            self.nonfinite_streak = 0
            return
        train, step = self.config.train, self.state.step
        what = f"non-finite loss {result.loss} / gradient norm {result.grad_norm} at step {step}"
        if result.applied:  # the engine could not drop it (DeepSpeed): the weights are suspect now
            raise NonFiniteError(f"{what}; engine {self.config.engine} has already applied the update, so the run "
                                 f"stops here without saving; `latest` is the last good checkpoint "
                                 f"(step {self.state.last_saved_step}). Lower optim.lr or raise optim.grad_clip")
        self.state.skipped_steps += 1
        self.nonfinite_streak += 1
        if train.nonfinite == "stop" or self.nonfinite_streak >= train.nonfinite_limit:
            why = ("train.nonfinite is 'stop'" if train.nonfinite == "stop" else
                   f"{self.nonfinite_streak} non-finite steps in a row (train.nonfinite_limit)")
            raise NonFiniteError(f"{what}: {why}; stopping without saving, `latest` is the last good checkpoint "
                                 f"(step {self.state.last_saved_step}). Lower optim.lr, raise optim.grad_clip or "
                                 f"check the data")
        self.logger.print(f"{what}: update dropped (train.nonfinite: skip; {self.state.skipped_steps} so far)")

    def _train_step(self, batches):
        """One engine step; with train.spike skip or rollback the engine asks the spike check before
        updating (the non-finite path drops the update)."""
        self.spikes.reasons = []
        if self.spikes.drops_updates:
            return self.engine.train_step(batches, self.spikes.check)
        return self.engine.train_step(batches)

    def _spiked(self, result) -> bool:
        """train.spike after a step: warn, count a dropped update, or roll back (then True)."""
        spikes, step, action = self.spikes, self.state.step, self.config.train.spike.action
        if action == "off":
            return False
        if not spikes.drops_updates:
            spikes.check(result.loss, result.grad_norm)
        if spikes.reasons:
            what = f"spike at step {step}: {'; '.join(spikes.reasons)}"
            saved = None
            if action == "rollback":  # the newest checkpoint, published (checkpoint.async_save), none being written
                self._finish_saves(wait=True)
                saved = CheckpointManager(self.config.run_dir / "checkpoints").latest_step()
            if saved is not None:
                skipped = self._roll_back(saved, step)
                self.logger.print(f"{what}: rolled back to the checkpoint of step {saved}; global batches "
                                  f"{skipped[0]}-{skipped[1]} of the data are skipped (train.spike.action: rollback)")
                return True
            if spikes.drops_updates:
                self.state.skipped_steps += 1
                why = "no checkpoint to roll back to yet" if action == "rollback" else "train.spike.action: skip"
                self.logger.print(f"{what}: update dropped ({why})")
            else:
                self.logger.print(f"warning: {what} (train.spike.action: log)")
        if result.applied:
            spikes.keep(result.loss, result.grad_norm)
        return False

    @_unwatched
    def _roll_back(self, saved: int, spike_step: int) -> list[int]:
        """Reload checkpoint `saved` but keep the data position, so the global batches read since it
        (the spike's included) are never trained on; re-save `saved` with that position and the record,
        so a resume skips them too. Returns the skipped range, counted over the run's global batches."""
        earlier = sum(last - first + 1 for first, last in (r["skipped_batches"] for r in self.spikes.rollbacks))
        skipped = [saved + earlier + 1, spike_step + earlier]
        plan = type(self.engine).resume_plan(CheckpointManager(self.config.run_dir / "checkpoints"), saved)
        self._build_schedulers()  # megatron's load adds to its count
        self._resume(plan, keep_data_position=True)
        self.spikes.rollbacks.append({"spike_step": spike_step, "to_step": saved, "skipped_batches": skipped})
        self.save()
        self._finish_saves(wait=True)  # the skip is on disk before training goes on
        return skipped

    def evaluate(self) -> dict:
        """val/loss; with data.sources also val/<name>/loss from each source's val split, and val/loss
        is their mean under the mixture's weights."""
        if not self.sources:
            loss = self._val_loss(self.config.data.path)
            return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        per_source = {s.name: self._val_loss(s.path) for s in self.sources}
        loss = sum(s.weight * per_source[s.name] for s in self.sources) / sum(s.weight for s in self.sources)
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)),
                **{f"val/{name}/loss": value for name, value in per_source.items()}}

    def _val_loss(self, data_dir: str) -> float:
        cfg = self.config
        loader = build_dataloader(data_dir, "val", cfg.train.micro_batch_size, self.env.dp_rank,
                                  self.env.dp_size, 0, cfg.data.seed, infinite=True,
                                  expected_tokenizer_id=self.tokenizer_id)
        total, count = self.engine.evaluate(iter(loader), cfg.eval.batches)
        return total / max(count, 1.0)

    def _source_tokens(self) -> dict:
        """data/<name>/tokens: tokens drawn from each source so far (its sequences x seq_len)."""
        if not self.sources:
            return {}
        return {f"data/{name}/tokens": draws * self.seq_len for name, draws in self.train_loader.cursors.items()}

    def _log_new_epochs(self) -> None:
        """A mixture's source that begins another epoch (reshuffled) says so."""
        if self.sources:
            for message in self.train_loader.new_epochs:
                self.logger.print(f"step {self.state.step}: {message}")
            self.train_loader.new_epochs.clear()

    def _check_data_left(self) -> None:
        """A mixture stops before a global batch would read a source past its max_repetition, on every
        rank at the same step (the cursors are global). That step is saved: changing the setting and
        starting again resumes it."""
        if not self.sources:
            return
        try:
            self.train_loader.check_next_global_batch()
        except SourceExhausted:
            if self.config.checkpoint.save_on_exit and self.state.step > (self.state.last_saved_step or 0):
                self.save()
            self._finish_saves(wait=True)
            raise

    @_unwatched
    def _log_eval(self) -> None:
        metrics = self.evaluate() | self._stage_metric()
        self.logger.print(f"step {self.state.step}: val loss {metrics['val/loss']:.4f}, ppl {metrics['val/ppl']:.2f}")
        if self.eval_tasks:
            metrics |= self._evaluate_tasks()
        self.logger.log(self.state.step, metrics)

    def _evaluate_tasks(self) -> dict:
        """eval.tasks on every data-parallel rank's share (pretrain/evaluate); an error is logged and
        training goes on."""
        from megatron.core import parallel_state

        from .evaluate import evaluate_tasks, flat_metrics
        from .evaluate.report import markdown

        try:
            with self.engine.full_model() as model:
                if model is None:
                    self.logger.print("eval.tasks skipped: scoring needs the whole model on each rank (no pipeline "
                                      "stages, no sequence or context parallelism); evaluate a checkpoint with "
                                      "python -m pretrain.evaluate instead")
                    return {}
                tokenizer = load_tokenizer(self.manifest["tokenizer"]["spec"])
                with self.engine.autocast:
                    results = evaluate_tasks(model, tokenizer, self.eval_tasks, dp_rank=self.env.dp_rank,
                                             dp_size=self.env.dp_size, group=parallel_state.get_data_parallel_group(),
                                             max_length=self.seq_len)
        except Exception as err:  # noqa: BLE001 - an evaluation failure must not end a training run
            self.logger.print(f"eval.tasks failed at step {self.state.step} (training goes on): "
                              f"{type(err).__name__}: {err}")
            return {"eval/errors": 1}
        self.logger.print(f"step {self.state.step}: tasks\n{markdown(results)}")
        return flat_metrics(results)

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
        self._stop_time = self._stop_time or time.monotonic()

    def _check_term_grace(self, save_s: float, step_s: float) -> None:
        """Once: say whether a SIGTERM (which waits for the step in flight, then a save) fits in the
        grace SLURM/torchrun give the ranks (launch.term_grace_s)."""
        if self._grace_checked:
            return
        self._grace_checked = True
        grace = self.config.launch.term_grace_s
        if step_s + save_s > grace:
            self.logger.print(f"a SIGTERM would not be saved in time: one step ({step_s:.1f} s) + one save "
                              f"({save_s:.1f} s) > launch.term_grace_s ({grace} s); raise it (below SLURM's "
                              f"KillWait) or checkpoint faster")

    def _stop_signal_name(self) -> str:
        return signal.Signals(self._stop_signal).name if self._stop_signal else "a stop request from another rank"

    def _memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        import psutil

        return psutil.Process().memory_info().rss / 2**30

    @_unwatched
    def _print_sample(self) -> None:
        cfg = self.config
        if not cfg.eval.sample_tokens:
            return
        with self.engine.full_model() as model:
            if model is None:
                self.logger.print("no sample: decoding needs the whole model on one rank and no sequence parallelism")
                return
            tokenizer = load_tokenizer(self.manifest["tokenizer"]["spec"])
            prompt = torch.tensor([tokenizer.encode(cfg.eval.sample_prompt)], device=self.device)
            generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
            model.eval()
            with self.engine.autocast:
                out = generate(model, prompt, cfg.eval.sample_tokens, temperature=cfg.eval.sample_temperature,
                               top_k=cfg.eval.sample_top_k, generator=generator)
            model.train()
        self.logger.print(f"sample after step {self.state.step}:\n{tokenizer.decode(out[0].tolist())}")

    # --- checkpoints --------------------------------------------------------------------------
    @_unwatched
    def save(self) -> float:
        """Save this step; returns the seconds it took (with checkpoint.async_save, the seconds training
        waited: for the previous save in flight, the common state and starting the writers).

        A stop signal arriving now waits until the checkpoint is complete; writer processes started
        for the save inherit the mask, so a signal sent to the whole process group cannot kill them
        mid-write either."""
        start = time.perf_counter()
        self._finish_saves(wait=True)  # asynchronous: at most one save in flight
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            common = {**self.state.common(), "scheduler": self.scheduler.state_dict(),
                      "stage_scheduler": self.stage_scheduler and {"stage": self.stage.name,
                                                                   "state": self.stage_scheduler.state_dict()},
                      "spikes": self.spikes.state_dict(),
                      "config": self.config.to_dict(), "tokenizer_id": self.tokenizer_id, "layout": layout_of(self.env)}
            rank_state = {"rng": rng_state(self.device), "data": self.train_loader.state_dict()}
            path = self.engine.save(self.state.step, common, rank_state)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.state.last_saved_step = self.state.step
        seconds = time.perf_counter() - start
        self.logger.print(f"{'writing' if self.config.checkpoint.async_save else 'saved'} checkpoint {path} "
                          f"({seconds:.1f} s)")
        return seconds

    def _finish_saves(self, wait: bool, step_s: float | None = None) -> None:
        """Publish the asynchronous saves every rank has written (wait: the one in flight too); on every
        rank at the same point. step_s: check the SIGTERM grace against the whole write. Only the wait
        for a write is unwatched: a rank stuck before the check's all-reduce is a hang."""
        with self.watchdog.paused() if wait else contextlib.nullcontext():
            published = self.engine.checkpoints.finish_saves(wait)
        for path, save_s in published:
            self.logger.print(f"published checkpoint {path} ({save_s:.1f} s after its save started)")
            if step_s is not None:
                self._check_term_grace(save_s, step_s)

    def _resume(self, plan, keep_data_position: bool = False) -> None:
        """keep_data_position: the loader stays where it is (a spike's rollback)."""
        restored = self.engine.load(plan)
        if restored.common.get(WEIGHTS_ONLY):  # imported weights: fresh optimizer, schedule and data order
            if self.env.rank == 0:
                print(f"resumed from {plan.directory} (imported weights only: training starts at step 0)", flush=True)
            return
        self._load_schedulers(restored.common)
        if not keep_data_position and plan.step > self.stage.first_step:  # on a boundary: the next stage's new loader
            restore_loader(self.train_loader, restored.data_states, self.env.dp_rank, self.env.dp_size)
        if restored.rng is not None:
            set_rng_state(restored.rng, self.device)
        else:  # another world size: fresh per-rank streams, reproducible from the step
            seed_everything(self.config.train.seed + plan.step, self.env.rank)
        self.state.restore(restored.common, plan.step)
        self.spikes.load_state_dict(restored.common.get("spikes"))
        if plan.step == self.stage.first_step:
            self._forget_spike_windows()
        if self.env.rank == 0 and not keep_data_position:
            universal = "the universal form of " if getattr(self.engine, "universal", False) else ""
            print(f"resumed from {universal}{plan.directory} (saved at layout {plan.common['layout']}, engine "
                  f"{self.engine.name})", flush=True)

    def close(self) -> None:
        if hasattr(self, "profiler"):  # training ended inside profile.steps: write what was traced
            self.profiler.finish()
        if hasattr(self, "train_loader"):
            self.train_loader.close()
        if hasattr(self, "logger"):
            self.logger.close()
        shutdown_distributed()
