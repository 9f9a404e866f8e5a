"""The DeepSpeed engine: ZeRO 0-3 (+ CPU offload) over megatron-core tensor parallelism.

    python -m pretrain --config configs/tiny.yaml --engine deepspeed --deepspeed.stage 2
    torchrun --nproc-per-node 8 -m pretrain --config configs/1.3b.yaml --engine deepspeed --deepspeed.stage 3

The model (either `model.arch`) is wrapped by `deepspeed.initialize` with a config generated from ours
(`deepspeed_config`); a step is gradient accumulation through `engine.backward`/`engine.step`.
Checkpoints are DeepSpeed's sharded checkpoints plus the loop's state, published with the same
`iter_NNNNNNN` + atomic `latest` scheme (CheckpointManager.save_with); their layout and the tools that
read them (universal conversion, consolidation) are in checkpoints/deepspeed_format.py. A weights-only
torch_dist checkpoint (`python -m checkpoints import`) starts a run too: its weights are loaded into
the model before `deepspeed.initialize` (so ZeRO's master copies start from them), at any TP size.

Non-finite steps: DeepSpeed applies the update inside `engine.step()` (it skips only fp16 overflows),
so a non-finite loss or gradient norm is detected after the fact and always stops the run
(`train.nonfinite: skip` needs engine: megatron); the checkpoint before it stays `latest`.
"""
import contextlib
import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.profiler import record_function

from checkpoints import CheckpointManager
from checkpoints.deepspeed_format import RANK_STATE_GLOB, TRAINER_STATE, UNIVERSAL, rank_state_name
from checkpoints.importer import WEIGHTS_ONLY
from model.mup import lr_multiplier
from model.profile_ranges import OPTIMIZER_STEP
from model.recompute import recompute_blocks
from model.transformer import build_model, init_model_weights, megatron_config_for

from ..batches import masked_loss_sum, model_inputs, target_count
from ..config import ConfigError, RunConfig
from ..state import layout_of, no_weight_decay
from . import Restored, ResumePlan, StepResult, load_model_weights

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


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


def checkpoint_activations(model, mode: str, *, reentrant: bool = False) -> None:
    """DeepSpeed's activation checkpointing (model/recompute.py): "full" recomputes each Sessa block,
    "feedback" each block's mixer (attention + feedback solve). Non-reentrant by default; ZeRO-3 needs
    the reentrant variant (its recomputation in backward runs under ZeRO-3's backward hooks; the
    non-reentrant one would keep references to parameters ZeRO-3 has already released)."""
    if mode == "none":
        return
    if not hasattr(model, "layers"):
        raise ConfigError(f"deepspeed.activation_checkpointing: {mode} is implemented for model.arch: sessa; "
                          f"set it to none for model.arch: transformer")
    from deepspeed.runtime.activation_checkpointing import checkpointing

    run = checkpointing.checkpoint if reentrant else checkpointing.non_reentrant_checkpoint
    recompute_blocks(model, "selective" if mode == "feedback" else mode, run)


class DeepSpeedEngine:
    name = "deepspeed"
    reduction_wait_s = 0.0  # not measured: DeepSpeed reduces inside its backward, where waiting and work mix

    def __init__(self, config: RunConfig, env, plan: ResumePlan | None, *, seq_len: int, num_microbatches: int):
        if env.device.type == "cpu":  # say so, instead of DeepSpeed's warning that it found no accelerator
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.config, self.env, self.device = config, env, env.device
        self.seq_len, self.num_microbatches = seq_len, num_microbatches
        imported = bool(plan and plan.common.get(WEIGHTS_ONLY))
        self.universal = bool(plan and not imported and self._needs_universal(plan))
        cfg = config
        self.checkpoints = CheckpointManager(cfg.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                             cfg.checkpoint.keep_every)
        self.megatron_config = megatron_config_for(cfg.model, sequence_parallel=False, calculate_per_token_loss=True)
        model = build_model(cfg.model, self.megatron_config)
        init_model_weights(model, cfg.train.seed)
        if imported:  # before deepspeed.initialize, so ZeRO's master copies start from these weights
            load_model_weights(self.checkpoints, plan.step, [model])
        # DeepSpeed broadcasts (and ZeRO-3 partitions) every parameter as `p.data.view(torch.uint8)`,
        # which fails for 0-dim tensors (the gamma biases): they train as shape [1] here (broadcasting
        # gives the same forward) and are restored to shape [] by consolidation (checkpoints/deepspeed_format.py).
        self.scalar_params = [name for name, param in model.named_parameters() if param.dim() == 0]
        for name in self.scalar_params:
            param = model.get_parameter(name)
            param.data = param.data.reshape(1)
        checkpoint_activations(model, cfg.deepspeed.activation_checkpointing, reentrant=cfg.deepspeed.stage == 3)
        self.chunks = [model.to(self.device)]
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         and cfg.model.dtype == "float32" else contextlib.nullcontext())

        groups = {}  # (wd_mult, μP LR multiplier of model/mup.py: 1 without μP) -> the group
        for name, param in model.named_parameters():
            wd_mult, lr_mult = 0.0 if no_weight_decay(param, name) else 1.0, lr_multiplier(name, param.ndim, cfg.model)
            group = groups.setdefault((wd_mult, lr_mult), {"params": [], "wd_mult": wd_mult})
            if lr_mult != 1.0:  # the scheduler's max_lr/min_lr for this group (its defaults otherwise)
                group |= {"max_lr": cfg.optim.lr * lr_mult, "min_lr": cfg.optim.min_lr * lr_mult}
            group["params"].append(param)
        groups = [groups[key] for key in sorted(groups, key=lambda key: (-key[0], -key[1]))]
        kwargs = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                      weight_decay=cfg.optim.weight_decay)
        if cfg.deepspeed.offload_optimizer and cfg.deepspeed.cpu_adam:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)
        self.ds_config = deepspeed_config(cfg, num_microbatches, env.dp_size, load_universal=self.universal)
        _skip_cpu_shm_comm()
        for name, value in (("LOCAL_RANK", env.local_rank), ("RANK", env.rank), ("WORLD_SIZE", env.world_size)):
            os.environ.setdefault(name, str(value))  # a single process started without a launcher
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                    mpu=MegatronMPU, dist_init_required=False)
        if cfg.deepspeed.stage == 3 and cfg.model.tie_embeddings:
            # The LM head reads the embedding's weight outside the embedding's own forward: ZeRO-3 must
            # keep it gathered for the whole model forward.
            deepspeed.zero.register_external_parameter(model, _embedding_weight(model))
        self.optimizer = optimizer  # its param groups are the ones DeepSpeed steps

    def banner(self) -> str:
        ds = self.config.deepspeed
        offload = " + optimizer offload" * ds.offload_optimizer + " + parameter offload" * ds.offload_params
        return f"engine deepspeed, ZeRO stage {ds.stage}{offload}, activation checkpointing {ds.activation_checkpointing}"

    # --- steps --------------------------------------------------------------------------------
    def _loss_sum(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = model_inputs(batch, self.config.data, self.device)
        with self.autocast:
            per_token_loss = self.engine(inputs["inputs"], inputs["labels"], **inputs["model_kwargs"])
        return masked_loss_sum(per_token_loss, inputs["targets_mask"])

    def train_step(self, micro_batches) -> StepResult:
        # The step's loss is (sum over the global batch) / (its number of target tokens N), as in the
        # megatron engine. DeepSpeed divides by the accumulation steps and averages over DP ranks,
        # so each micro-batch's backward sees its loss sum scaled by micro-batches x DP / N.
        batches = [next(micro_batches) for _ in range(self.num_microbatches)]
        dp_group = parallel_state.get_data_parallel_group()
        count = torch.tensor(float(sum(target_count(b) for b in batches)), device=self.device)
        dist.all_reduce(count, group=dp_group)
        scale = self.num_microbatches * self.env.dp_size / max(count.item(), 1.0)
        totals = torch.zeros(2, device=self.device)
        grad_norm = None
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            total, tokens = self._loss_sum(batch)
            self.engine.backward(total * scale)  # the last one also reduces the gradients (DeepSpeed's hooks)
            if last and self.config.deepspeed.stage == 0:
                grad_norm = self._grad_norm()  # DeepSpeed reports none without ZeRO
            with record_function(OPTIMIZER_STEP) if last else contextlib.nullcontext():
                self.engine.step()  # the optimizer steps at the last micro-batch only
            totals += torch.stack((total.detach(), tokens.float()))
        dist.all_reduce(totals, group=dp_group)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        return StepResult((totals[0] / totals[1]).item(), grad_norm, applied=True)

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

    def evaluate(self, micro_batches, num_batches: int) -> tuple[float, float]:
        totals = torch.zeros(2, device=self.device)
        self.engine.eval()
        with torch.no_grad():
            for _, batch in zip(range(num_batches), micro_batches):
                totals += torch.stack([t.float() for t in self._loss_sum(batch)])
        self.engine.train()
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        return totals[0].item(), totals[1].item()

    @contextlib.contextmanager
    def full_model(self):
        """The whole model (ZeRO-3: its parameters gathered for the duration)."""
        import deepspeed

        params = list(self.chunks[0].parameters()) if self.config.deepspeed.stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, enabled=bool(params)):
            yield self.chunks[0]

    # --- checkpoints --------------------------------------------------------------------------
    @staticmethod
    def resume_plan(manager: CheckpointManager, step: int) -> ResumePlan:
        """The checkpoint of `step` as this engine resumes it (its format checked, common state read)."""
        where = manager.step_dir(step)
        if not (where / TRAINER_STATE).is_file():
            common = manager.load_common(step) if (where / "metadata.json").is_file() else {}
            if common.get(WEIGHTS_ONLY):  # `python -m checkpoints import`: weights for a fresh run
                return ResumePlan(step, where, common)
            raise ConfigError(f"checkpoint {where} was not written by engine: deepspeed (no {TRAINER_STATE}); "
                              f"resume it with engine: megatron or start a new run_name")
        return ResumePlan(step, where, torch.load(where / TRAINER_STATE, weights_only=False))

    def _needs_universal(self, plan: ResumePlan) -> bool:
        """Another data-parallel size or ZeRO stage loads the checkpoint's universal form."""
        common, where = plan.common, plan.directory
        saved = (common["layout"]["dp"], common["layout"]["tp"], common["zero_stage"])
        ours = (self.env.dp_size, self.env.tp_size, self.config.deepspeed.stage)
        if saved == ours:
            return False
        if saved[1] != ours[1]:
            raise ConfigError(f"checkpoint {where} was saved at parallel.tensor={saved[1]}; the DeepSpeed engine "
                              f"resumes only at the same tensor-parallel size (now {ours[1]})")
        if not (where / UNIVERSAL).is_dir():
            raise ConfigError(
                f"checkpoint {where} was saved at DP={saved[0]}, ZeRO stage {saved[2]}; this run has DP={ours[0]}, "
                f"stage {ours[2]} (deepspeed.stage). Convert it first: "
                f"python -m checkpoints.deepspeed_format to-universal {where}")
        return True

    def save(self, step: int, common: dict, rank_state: dict):
        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)
            if self.env.rank == 0:  # DeepSpeed copies its recovery scripts next to the tags; not ours
                for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                    (tmp.parent / script).unlink(missing_ok=True)
            torch.save({"rank": self.env.rank, "dp_rank": self.env.dp_rank, **rank_state},
                       tmp / rank_state_name(self.env.rank))
            if self.env.rank == 0:
                torch.save({**common, "engine": "deepspeed", "layout": layout_of(self.env),
                            "zero_stage": self.config.deepspeed.stage, "scalar_params": self.scalar_params},
                           tmp / TRAINER_STATE)

        return self.checkpoints.save_with(step, write)

    def load(self, plan: ResumePlan) -> Restored:
        where, common = plan.directory, plan.common
        if common.get(WEIGHTS_ONLY):  # loaded at construction, before deepspeed.initialize
            return Restored(common, [], None)
        load_dir, tag = (str(where), UNIVERSAL) if self.universal else (str(where.parent), where.name)
        path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {where}")
        ranks = [torch.load(p, weights_only=False) for p in sorted(where.glob(RANK_STATE_GLOB))]
        data_states = [next(r["data"] for r in ranks if r["dp_rank"] == i) for i in range(common["layout"]["dp"])]
        same_world = common["layout"]["world_size"] == self.env.world_size
        return Restored(common, data_states, ranks[self.env.rank]["rng"] if same_world else None)


def _embedding_weight(model) -> torch.nn.Parameter:
    """The input embedding matrix of either architecture (SessaLM.embedding, GPTModel.embedding.word_embeddings)."""
    embedding = model.embedding
    return embedding.weight if hasattr(embedding, "weight") else embedding.word_embeddings.weight
