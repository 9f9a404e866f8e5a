"""The megatron-core engine: TP/SP/PP(+virtual stages) model chunks in megatron DDP, megatron's
(distributed) optimizer, steps through megatron's pipeline schedules, `dist_checkpointing` checkpoints
(a reshardable torch_dist directory; CheckpointManager publishes it atomically)."""
import collections
import contextlib
import functools
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch.profiler import record_function

from checkpoints import CheckpointManager
from checkpoints.importer import WEIGHTS_ONLY
from checkpoints.megatron_fixes import apply_megatron_fixes, initialise_optimizer_state, load_optimizer_state
from model.mup import lr_multiplier, width_multiplier
from model.profile_ranges import GRADIENT_REDUCTION, OPTIMIZER_STEP
from model.recompute import recompute_blocks, torch_checkpoint
from model.transformer import build_model, init_model_weights, megatron_config_for

from ..batches import context_piece, masked_loss_sum, model_inputs
from ..config import ConfigError, RunConfig
from ..state import layout_of, no_weight_decay
from . import Restored, ResumePlan, StepResult, load_model_weights

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}  # reloadable at any DP size


def _ranged(name: str, function):
    """`function` inside the profiler range `name` (model/profile_ranges.py)."""
    @functools.wraps(function)
    def call(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)
    return call


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


class MegatronEngine:
    name = "megatron"
    reduction_wait_s = 0.0  # seconds in finalize_model_grads so far: a faster rank waits there for the slower ones

    def __init__(self, config: RunConfig, env, plan: ResumePlan | None, *, seq_len: int, num_microbatches: int,
                 draw_weights: bool = True):
        """draw_weights False leaves the weights as allocated, for a caller that sets them itself (the
        GPU check draws them on the device: the layout-independent CPU draw takes minutes at 1.3B).
        Tensor parallelism 1 only: megatron marks the tensor-parallel weights while drawing them."""
        if not draw_weights and config.parallel.tensor > 1:
            raise ValueError("draw_weights=False needs parallel.tensor 1 (megatron's construction-time draw "
                             "marks the tensor-parallel weights)")
        self.config, self.env, self.device = config, env, env.device
        self.seq_len, self.num_microbatches = seq_len, num_microbatches
        apply_megatron_fixes()
        self._build_model(draw_weights)
        self._build_optimizer()
        self.checkpoints = CheckpointManager(config.run_dir / "checkpoints", config.checkpoint.keep_last,
                                             config.checkpoint.keep_every, async_save=config.checkpoint.async_save)

    # --- setup --------------------------------------------------------------------------------
    def _build_model(self, draw_weights: bool) -> None:
        """This rank's model chunks: one per virtual pipeline stage (one without interleaving)."""
        cfg, env = self.config, self.env
        virtual = cfg.parallel.virtual_stages
        recompute = cfg.train.recompute
        transformer_recompute = {}  # the Transformer arm recomputes through megatron's TransformerBlock
        if cfg.model.arch == "transformer" and recompute != "none":
            transformer_recompute = {"recompute_granularity": recompute}
            if recompute == "full":
                transformer_recompute |= {"recompute_method": "uniform", "recompute_num_layers": 1}
        self.megatron_config = megatron_config_for(
            cfg.model, sequence_parallel=cfg.parallel.sequence_parallel, calculate_per_token_loss=True,
            virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None,
            batch_p2p_comm=self.device.type == "cuda",  # gloo's batched p2p mis-orders interleaved stages
            **({} if draw_weights else {"perform_initialization": False}),
            **transformer_recompute,
        )
        stages = cfg.parallel.stage_layers(cfg.model.num_layers)
        self.chunks = []
        for v in range(virtual):
            stage = v * env.pp_size + env.pp_rank
            chunk = build_model(cfg.model, self.megatron_config, pre_process=stage == 0,
                                post_process=stage == len(stages) - 1, layer_numbers=stages[stage],
                                vp_stage=v if virtual > 1 else None)
            if draw_weights:
                init_model_weights(chunk, cfg.train.seed)
            if cfg.model.arch == "sessa":
                recompute_blocks(chunk, recompute, torch_checkpoint)
            self.chunks.append(chunk.to(self.device))
        # Overlap: each gradient bucket is reduced (reduce-scattered with the distributed optimizer) as
        # soon as the last micro-batch's backward has produced it; finalize_model_grads waits for them.
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.optim.overlap_grad_reduce,
            use_distributed_optimizer=cfg.optim.distributed, bucket_size=cfg.optim.bucket_size,
        )
        self.ddp = [DistributedDataParallel(self.megatron_config, ddp_config, chunk, disable_bucketing=i > 0)
                    for i, chunk in enumerate(self.chunks)]
        per_chunk = lambda funcs: funcs if virtual > 1 else funcs[0]  # noqa: E731
        self.megatron_config.finalize_model_grads_func = self._finalize_grads
        self.megatron_config.no_sync_func = per_chunk([d.no_sync for d in self.ddp])
        if cfg.optim.overlap_grad_reduce:  # start every chunk's reduction at its last backward (megatron's align)
            self.megatron_config.grad_sync_func = per_chunk([_ranged(GRADIENT_REDUCTION, d.start_grad_sync)
                                                             for d in self.ddp])
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
        no_decay = ParamKey(with_name_predicate=ParamWithNamePredicate(name="no_decay", fn=no_weight_decay))
        overrides = {no_decay: ParamGroupOverride(wd_mult=0.0)}
        if cfg.model.mup:  # μP's per-role Adam LR (model/mup.py): the scheduler reads each group's max_lr/min_lr
            width = width_multiplier(cfg.model)
            scaled = ParamKey(with_name_predicate=ParamWithNamePredicate(
                name="mup_lr", fn=lambda param, name: lr_multiplier(name, param.ndim, cfg.model) != 1.0))
            overrides[scaled] = ParamGroupOverride(max_lr=cfg.optim.lr / width, min_lr=cfg.optim.min_lr / width)
        self.optimizer = get_megatron_optimizer(optim, self.ddp, config_overrides=overrides)

    def banner(self) -> str:
        cfg = self.config
        virtual = cfg.parallel.virtual_stages
        return (f"engine megatron{f', {virtual} virtual stages' if virtual > 1 else ''}, recompute "
                f"{cfg.train.recompute}, gradient reduction {'overlapped' if cfg.optim.overlap_grad_reduce else 'after backward'}")

    # --- steps --------------------------------------------------------------------------------
    def _finalize_grads(self, *args, **kwargs):
        """megatron's finalize_model_grads, which waits for the data-parallel gradient reduction, timed."""
        start = time.perf_counter()
        with record_function(GRADIENT_REDUCTION):
            finalize_model_grads(*args, **kwargs)
        self.reduction_wait_s += time.perf_counter() - start

    def _forward_step(self, data_iterator, model):
        batch = model_inputs(next(data_iterator), self.config.data, self.device)
        if self.env.cp_size > 1:  # the context-parallel ranks of a data-parallel rank read the same batches
            batch = context_piece(batch, self.env.cp_rank, self.env.cp_size)
        with self.autocast:
            per_token_loss = model(batch["inputs"], batch["labels"], **batch["model_kwargs"])
        return per_token_loss, lambda output: self._loss_func(output, batch["targets_mask"])

    @staticmethod
    def _loss_func(per_token_loss, targets_mask):
        total, count = masked_loss_sum(per_token_loss, targets_mask)
        return total, count.to(torch.int), {"lm loss": torch.stack((total.detach(), count.float()))}

    def _sum_over_stages(self, reduced: list[dict]) -> torch.Tensor:
        """(loss sum, target count) over micro-batches, data- and context-parallel ranks, known to every stage."""
        totals = torch.zeros(2, device=self.device)
        for entry in reduced:  # only the last pipeline stage computes losses
            totals += entry["lm loss"].to(self.device)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        return totals

    def _chunk_iterators(self, iterator):
        """megatron's schedules take one data iterator per model chunk when stages interleave."""
        return iterator if len(self.chunks) == 1 else _SharedBatches(iterator, len(self.chunks)).readers()

    def _run_schedule(self, iterator, num_microbatches: int, forward_only: bool) -> list[dict]:
        return get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=self._chunk_iterators(iterator), model=self.ddp,
            num_microbatches=num_microbatches, seq_length=self.seq_len,
            micro_batch_size=self.config.train.micro_batch_size, forward_only=forward_only,
        )

    def train_step(self, micro_batches, keep_update=None) -> StepResult:
        """keep_update(loss, grad_norm) -> bool, asked before the update (train.spike's skip and rollback)."""
        for chunk in self.ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        totals = self._sum_over_stages(self._run_schedule(micro_batches, self.num_microbatches, False))
        loss = (totals[0] / totals[1]).item()
        with record_function(OPTIMIZER_STEP):
            return self._optimizer_step(loss, keep_update)

    def _optimizer_step(self, loss: float, keep_update=None) -> StepResult:
        """megatron's optimizer.step() in its parts, with the gradient norm checked before the update:
        a non-finite loss or norm, or keep_update saying no, drops the update (every rank agrees: both
        are all-reduced)."""
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        found_inf = self.optimizer.prepare_grads()  # fp16 loss scaling: an overflow skips, as megatron does
        grad_norm = float("inf") if found_inf else float(self.optimizer.get_grad_norm())
        if found_inf or not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(grad_norm))):
            return StepResult(loss, grad_norm, applied=False)
        if keep_update is not None and not keep_update(loss, grad_norm):
            return StepResult(loss, grad_norm, applied=False)
        for optimizer in optimizers:
            params = optimizer.get_parameters()
            if optimizer.config.clip_grad > 0 and params:
                clip_grad_by_total_norm_fp32(params, optimizer.config.clip_grad, grad_norm,
                                             optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        self.optimizer.step_with_ready_grads()
        return StepResult(loss, grad_norm, applied=True)

    def evaluate(self, micro_batches, num_batches: int) -> tuple[float, float]:
        for chunk in self.ddp:
            chunk.eval()
        with torch.no_grad():
            totals = self._sum_over_stages(self._run_schedule(micro_batches, num_batches, True))
        for chunk in self.ddp:
            chunk.train()
        return totals[0].item(), totals[1].item()

    @contextlib.contextmanager
    def full_model(self):
        """The whole model when this rank holds it (no pipeline stages, no sequence or context parallelism)."""
        whole = (len(self.chunks) == 1 and self.env.pp_size == 1 and self.env.cp_size == 1
                 and not self.config.parallel.sequence_parallel)
        yield self.chunks[0] if whole else None

    # --- checkpoints --------------------------------------------------------------------------
    @staticmethod
    def resume_plan(manager: CheckpointManager, step: int) -> ResumePlan:
        """The checkpoint of `step` as this engine resumes it (its format checked, common state read)."""
        where = manager.step_dir(step)
        if (where / "trainer_state.pt").is_file():
            raise ConfigError(f"checkpoint {where} was written by engine: deepspeed; resume it with "
                              f"--engine deepspeed, or start a new run_name")
        return ResumePlan(step, where, manager.load_common(step))

    def _sharded_state(self, common: dict, rank_state: dict | None, saved_layout: dict | None = None) -> dict:
        """rank_state None: the state to load into (every saved DP rank's loader state, this rank's RNG
        when the world size is unchanged)."""
        env, loading = self.env, rank_state is None
        model_state = {}
        for chunk in self.chunks:  # keys carry global layer numbers: chunks never collide
            model_state.update(chunk.sharded_state_dict(prefix="model."))
        layout = saved_layout or layout_of(self.env)
        state = {
            **common,
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=loading, metadata=OPTIMIZER_SHARDING),
            # Every data-parallel rank's loader position, loaded by all ranks so the DP size may change
            # (when loading only DP rank 0's request counts as the main replica).
            "data": [ShardedObject("data_loader_state", None if loading else rank_state["data"], (layout["dp"],), (i,),
                                   replica_id=(env.tp_rank, env.pp_rank, env.cp_rank, env.dp_rank if loading else 0))
                     for i in (range(layout["dp"]) if loading else [env.dp_rank])],
            "layout": layout_of(self.env),
        }
        if not loading or layout["world_size"] == env.world_size:
            state["rng"] = ShardedObject("rng_state", None if loading else rank_state["rng"],
                                         (layout["world_size"],), (env.rank,), replica_id=0)
        return state

    def save(self, step: int, common: dict, rank_state: dict):
        return self.checkpoints.save(step, self._sharded_state(common, rank_state))

    def load(self, plan: ResumePlan) -> Restored:
        if plan.common.get(WEIGHTS_ONLY):  # written by `python -m checkpoints import`: the model only
            load_model_weights(self.checkpoints, plan.step, self.chunks)
            return Restored(plan.common, [], None)
        initialise_optimizer_state(self.optimizer)
        loaded = self.checkpoints.load(plan.step, self._sharded_state({}, None, saved_layout=plan.common["layout"]))
        for chunk in self.chunks:
            keys = chunk.sharded_state_dict(prefix="model.").keys()
            chunk.load_global_state_dict({k: loaded["model"][k] for k in keys}, prefix="model.")
        load_optimizer_state(self.optimizer, loaded["optimizer"])
        return Restored(plan.common, list(loaded["data"]), loaded.get("rng"))
