"""One dataclass tree for a pretraining run, loaded from YAML with dotted CLI overrides.

    python -m pretrain --config configs/tiny.yaml --optim.lr 3e-4 --train.max_steps 200

Every section validates itself in `__post_init__` and names the offending field.
"""
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipeline.mixture import DEFAULT_MAX_REPETITION
from model import ModelConfig


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what to change."""


@dataclass(kw_only=True)
class SpikeConfig:
    """Loss spikes (pretrain/spikes.py): a step spikes when its loss (or gradient norm) exceeds the mean
    plus `threshold` standard deviations of the last `window` kept steps."""
    action: str = "log"  # "off", "log" (warning + train/spike), "skip" (drop the update) or "rollback"
    window: int = 100  # kept steps the mean and standard deviation are taken over; no check before that
    threshold: float = 6.0  # k in: value > mean + k x std
    grad_norm: bool = True  # watch the gradient norm too (its own window, the same rule)

    def __post_init__(self):
        if self.action not in ("off", "log", "skip", "rollback"):
            raise ConfigError(f"train.spike.action must be 'off', 'log', 'skip' or 'rollback', got {self.action!r}")
        if self.window < 2:
            raise ConfigError(f"train.spike.window must be >= 2 (steps), got {self.window}")
        if not self.threshold > 0:
            raise ConfigError(f"train.spike.threshold must be > 0 (standard deviations), got {self.threshold}")


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 100
    global_batch_tokens: int = 16384  # tokens per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 1  # sequences per forward pass per rank; the rest is gradient accumulation
    seed: int = 1234
    exit_interval: int = 0  # save and exit after a step divisible by this (0: run to max_steps)
    nonfinite: str = "skip"  # a NaN/inf loss or gradient norm: "skip" (drop the update, count it) or "stop"
    nonfinite_limit: int = 5  # with "skip": stop after this many non-finite steps in a row
    recompute: str = "none"  # megatron engine: "selective" (attention + feedback solve) or "full" (whole block)
    hang_timeout_s: float = 300.0  # no finished step for this long: dump stacks and exit (pretrain/watchdog.py); 0: off
    spike: SpikeConfig = field(default_factory=SpikeConfig)  # loss spikes: detect, then log / skip / rollback

    def __post_init__(self):
        if self.nonfinite not in ("skip", "stop"):
            raise ConfigError(f"train.nonfinite must be 'skip' or 'stop', got {self.nonfinite!r}")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"train.recompute must be 'none', 'selective' or 'full', got {self.recompute!r}")
        if self.nonfinite_limit < 1:
            raise ConfigError(f"train.nonfinite_limit must be >= 1, got {self.nonfinite_limit}")
        for name in ("max_steps", "global_batch_tokens", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.exit_interval < 0:
            raise ConfigError(f"train.exit_interval must be >= 0, got {self.exit_interval}")
        if self.hang_timeout_s < 0:
            raise ConfigError(f"train.hang_timeout_s must be >= 0 (0: no hang watchdog), got {self.hang_timeout_s}")


@dataclass(kw_only=True)
class SourceConfig:
    """One source of a mixture (data_pipeline/mixture.py)."""
    name: str  # names it in metrics (data/<name>/tokens, val/<name>/loss) and messages
    path: str  # directory written by `python -m data_pipeline prepare`
    weight: float = 1.0  # relative share of the training sequences
    max_repetition: float = DEFAULT_MAX_REPETITION  # epochs of it a run may read (OLMo-core's default: 1)

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ConfigError(f"data.sources name must be non-empty and free of '/', got {self.name!r}")
        if not self.weight > 0:
            raise ConfigError(f"data.sources {self.name!r}: weight must be > 0, got {self.weight}")
        if not self.max_repetition >= 1:
            raise ConfigError(f"data.sources {self.name!r}: max_repetition must be >= 1 (epochs), "
                              f"got {self.max_repetition}")


@dataclass(kw_only=True)
class DataConfig:
    path: str = ""  # directory written by `python -m data_pipeline prepare` (default data/builtin); with
    # `sources`, the first source's (it fixes tokenizer and sequence length, which all sources share)
    sources: list[SourceConfig] = field(default_factory=list)  # a weighted mixture instead of one `path`
    num_workers: int = 2  # DataLoader worker processes per rank
    seed: int = 1234  # shard/sample shuffling seed
    document_masking: bool = True  # a packed document sees only itself (attention and feedback solve)
    reset_positions: bool = True  # with document_masking: RoPE positions restart at 0 at each document

    def __post_init__(self):
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.sources:
            names = [s.name for s in self.sources]
            if len(set(names)) != len(names):
                raise ConfigError(f"data.sources names must be distinct, got {names}")
            if self.path and self.path != self.sources[0].path:
                raise ConfigError(f"data.path ({self.path}) and data.sources are both set: data.path is the "
                                  f"one-source shorthand; remove it, or make it a source")
            self.path = self.sources[0].path
        elif not self.path:
            self.path = "data/builtin"


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1  # not applied to norms, biases or the gamma parameters
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables
    distributed: bool = True  # megatron's distributed optimizer (ZeRO-1: Adam states sharded over DP)
    overlap_grad_reduce: bool = True  # megatron engine: reduce gradient buckets during the backward
    bucket_size: int = 40_000_000  # elements per gradient-reduction bucket (megatron's default)

    def __post_init__(self):
        if not 0 < self.lr:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr must lie in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0")
        if self.bucket_size < 1:
            raise ConfigError(f"optim.bucket_size must be >= 1, got {self.bucket_size}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must lie in [0, 1), got {getattr(self, name)}")


@dataclass(kw_only=True)
class ScheduleConfig:
    style: str = "cosine"  # "cosine" (warmup + cosine to min_lr) or "wsd" (warmup-stable-decay)
    warmup_steps: int = 10
    wsd_decay_fraction: float = 0.2  # share of steps spent in the final decay for "wsd"
    wsd_decay_style: str = "linear"  # "linear", "cosine", "exponential" or "minus_sqrt"

    def __post_init__(self):
        if self.style not in ("cosine", "wsd"):
            raise ConfigError(f"schedule.style must be 'cosine' or 'wsd', got {self.style!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 < self.wsd_decay_fraction <= 1:
            raise ConfigError(f"schedule.wsd_decay_fraction must lie in (0, 1], got {self.wsd_decay_fraction}")


@dataclass(kw_only=True)
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_stages: int = 1  # model chunks per pipeline rank (> 1: megatron's interleaved 1F1B)
    pipeline_layout: str = ""  # layers per stage, e.g. "3|3|2|2" (pipeline x virtual_stages entries); "": even
    sequence_parallel: bool = False
    context: int = 1  # context parallelism: each sequence split into pieces over this many ranks
    context_layout: str = "contiguous"  # "zigzag": rank r holds pieces r and 2 context - 1 - r (balanced causal work)
    timeout_minutes: float = 30.0  # a collective waiting longer fails (init_process_group's timeout)

    def __post_init__(self):
        if self.tensor < 1 or self.pipeline < 1 or self.virtual_stages < 1 or self.context < 1:
            raise ConfigError("parallel.tensor, parallel.pipeline, parallel.virtual_stages and parallel.context "
                              "must be >= 1")
        if self.virtual_stages > 1 and self.pipeline == 1:
            raise ConfigError("parallel.virtual_stages > 1 needs parallel.pipeline > 1")
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")
        if not self.timeout_minutes > 0:
            raise ConfigError(f"parallel.timeout_minutes must be > 0, got {self.timeout_minutes}")
        if self.context_layout not in ("contiguous", "zigzag"):
            raise ConfigError(f"parallel.context_layout must be 'contiguous' or 'zigzag', got {self.context_layout!r}")

    def stage_layers(self, num_layers: int) -> list[list[int]]:
        """Global layer numbers of each of the pipeline x virtual_stages stages, in model order.
        Stage v * pipeline + r is model chunk v of pipeline rank r (megatron's interleaving)."""
        stages = self.pipeline * self.virtual_stages
        if self.pipeline_layout:
            try:
                counts = [int(part) for part in self.pipeline_layout.split("|")]
            except ValueError:
                raise ConfigError(f"parallel.pipeline_layout must look like '3|3|2|2', got {self.pipeline_layout!r}") from None
            if len(counts) != stages or sum(counts) != num_layers or min(counts) < 1:
                raise ConfigError(f"parallel.pipeline_layout {self.pipeline_layout!r} must give {stages} stages "
                                  f"(pipeline x virtual_stages) of >= 1 layers summing to model.num_layers={num_layers}")
        else:
            if num_layers < stages:
                raise ConfigError(f"model.num_layers ({num_layers}) is smaller than parallel.pipeline x "
                                  f"parallel.virtual_stages = {stages}: every stage needs a layer")
            if num_layers % stages:
                raise ConfigError(f"model.num_layers ({num_layers}) is not divisible by parallel.pipeline x "
                                  f"parallel.virtual_stages = {stages}; set parallel.pipeline_layout, e.g. "
                                  f"'{'|'.join(str(num_layers // stages + (i < num_layers % stages)) for i in range(stages))}'")
            counts = [num_layers // stages] * stages
        starts = [sum(counts[:i]) for i in range(stages)]
        return [list(range(start, start + count)) for start, count in zip(starts, counts)]


@dataclass(kw_only=True)
class CheckpointConfig:
    interval_steps: int = 100  # save every N steps (0: never by step count)
    interval_minutes: float = 0.0  # and/or every N minutes of wall time (0: never by time)
    keep_last: int = 3  # keep the newest k checkpoints ...
    keep_every: int = 0  # ... plus every checkpoint whose step is a multiple of n (0: none)
    resume: bool = True  # continue from `latest` in the run directory when there is one
    save_on_exit: bool = True  # save when training ends or on SIGTERM/SIGUSR1
    async_save: bool = False  # megatron engine: write checkpoints in a background process while training goes on

    def __post_init__(self):
        if self.interval_steps < 0 or self.interval_minutes < 0 or self.keep_every < 0:
            raise ConfigError("checkpoint.interval_steps, interval_minutes and keep_every must be >= 0")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True)
class LoggingConfig:
    interval: int = 1  # steps between console/metrics lines
    wandb: str = "offline"  # "offline", "online" or "disabled"; online needs WANDB_API_KEY
    wandb_project: str = "sessa-pretrain"
    progress_bar: bool = True
    peak_tflops: float = 0.0  # per-device peak for MFU (e.g. 989 for H100/H200 bf16); 0: no MFU

    def __post_init__(self):
        if self.wandb not in ("offline", "online", "disabled"):
            raise ConfigError(f"logging.wandb must be 'offline', 'online' or 'disabled', got {self.wandb!r}")
        if self.interval < 1:
            raise ConfigError(f"logging.interval must be >= 1, got {self.interval}")


@dataclass(kw_only=True)
class EvalConfig:
    interval: int = 50  # steps between validation passes (0: only at the end)
    batches: int = 4  # validation micro-batches per pass, per data-parallel rank
    sample_prompt: str = "The"
    sample_tokens: int = 48  # tokens generated at the end of training (0: none)
    sample_temperature: float = 0.8
    sample_top_k: int = 40
    tasks: str = ""  # evaluation tasks run every `interval` steps: built-in names or task files, comma-separated


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """Used with `engine: deepspeed` (pretrain/engines/deepspeed.py); ignored by the megatron engine."""
    stage: int = 1  # ZeRO stage: 0 (plain DP), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)
    offload_optimizer: bool = False  # optimizer states and step on the CPU (ZeRO-Offload)
    offload_params: bool = False  # parameters on the CPU between uses (ZeRO-Infinity; stage 3 only)
    cpu_adam: bool = True  # with offload_optimizer: DeepSpeed's compiled CPU-Adam; false: torch AdamW
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction bucket
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather bucket (stages 1-2)
    prefetch_bucket_size: int = 50_000_000  # elements of parameters prefetched ahead (stage 3)
    overlap_comm: bool = False  # overlap gradient reduction with backward (more memory)
    activation_checkpointing: str = "none"  # "none", "full" (each layer) or "feedback" (each layer's mixer)
    config_json: str = ""  # optional DeepSpeed JSON file whose keys override the generated config

    def __post_init__(self):
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_params and self.stage != 3:
            raise ConfigError(f"deepspeed.offload_params needs deepspeed.stage 3, got stage {self.stage}")
        if self.offload_optimizer and self.stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.stage >= 1")
        for name in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"deepspeed.{name} must be >= 1, got {getattr(self, name)}")
        if self.activation_checkpointing not in ("none", "full", "feedback"):
            raise ConfigError(f"deepspeed.activation_checkpointing must be 'none', 'full' or 'feedback', "
                              f"got {self.activation_checkpointing!r}")
        if self.config_json and not Path(self.config_json).is_file():
            raise ConfigError(f"deepspeed.config_json {self.config_json!r} does not exist")


@dataclass(kw_only=True)
class LaunchConfig:
    """SLURM resources for `python -m launch.slurm` (its flags override these); not read by training."""
    nodes: int = 1
    gpus_per_node: int = -1  # -1: what SLURM reports for the partition's nodes (0 on CPU nodes)
    time: object = ""  # time limit, quoted: "24:00:00" (unquoted, YAML reads 24:00:00 as seconds); "": partition's
    partition: str = ""  # "": the cluster's default partition
    account: str = ""
    term_grace_s: int = 20  # seconds the ranks get to save after SIGTERM; keep it below SLURM's KillWait

    def __post_init__(self):
        if not isinstance(self.time, str):
            raise ConfigError(f"launch.time must be a quoted SLURM time such as \"24:00:00\", got {self.time!r} "
                              f"(YAML reads an unquoted 24:00:00 as a number of seconds)")
        if self.nodes < 1 or self.gpus_per_node < -1 or self.term_grace_s < 1:
            raise ConfigError(f"launch.nodes ({self.nodes}) and launch.term_grace_s ({self.term_grace_s}) must be "
                              f">= 1, launch.gpus_per_node ({self.gpus_per_node}) >= 0 (or -1: detect)")


@dataclass(kw_only=True)
class ProfileConfig:
    """torch.profiler traces of chosen steps (pretrain/profiling.py), under runs/NAME/profile/."""
    steps: str = ""  # training steps to trace, "10-12" or "10" (1-based, as in the log); "": no profiling
    ranks: str = "0"  # global ranks that trace: "0", "0,3", "0-7" or "all"

    def __post_init__(self):
        self.step_range()
        self._rank_ranges()

    def step_range(self) -> tuple[int, int] | None:
        """(first, last) step to trace, both included; None when profiling is off."""
        if not self.steps:
            return None
        first, _, last = self.steps.partition("-")
        try:
            first, last = int(first), int(last or first)
        except ValueError:
            raise ConfigError(f"profile.steps must look like '10-12' or '10', got {self.steps!r}") from None
        if not 1 <= first <= last:
            raise ConfigError(f"profile.steps {self.steps!r}: needs 1 <= first <= last step")
        return first, last

    def traces_on(self, rank: int) -> bool:
        return self.ranks == "all" or any(first <= rank <= last for first, last in self._rank_ranges())

    def _rank_ranges(self) -> list[tuple[int, int]]:
        if self.ranks == "all":
            return []
        ranges = []
        for part in self.ranks.split(","):
            first, _, last = part.strip().partition("-")
            try:
                first, last = int(first), int(last or first)
            except ValueError:
                raise ConfigError(f"profile.ranks must look like '0', '0,3', '0-7' or 'all', "
                                  f"got {self.ranks!r}") from None
            if not 0 <= first <= last:
                raise ConfigError(f"profile.ranks {self.ranks!r}: needs 0 <= first <= last rank")
            ranges.append((first, last))
        return ranges


@dataclass(kw_only=True)
class RunConfig:
    run_name: str = "tiny"
    runs_dir: str = "runs"
    engine: str = "megatron"  # "megatron" (DDP + distributed optimizer) or "deepspeed" (ZeRO, see deepspeed:)
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    stages: list[dict] = field(default_factory=list)  # a campaign: [{name, steps, dotted overrides}] (pretrain/stages.py)

    def __post_init__(self):
        if self.engine not in ("megatron", "deepspeed"):
            raise ConfigError(f"engine must be 'megatron' or 'deepspeed', got {self.engine!r}")
        if self.engine == "deepspeed":
            if self.parallel.pipeline > 1:
                raise ConfigError(f"engine: deepspeed does not support parallel.pipeline > 1 (got "
                                  f"{self.parallel.pipeline}): ZeRO-2/3 cannot shard gradients across megatron's "
                                  f"pipeline schedule; use engine: megatron for pipeline parallelism")
            if self.parallel.sequence_parallel:
                raise ConfigError("engine: deepspeed does not support parallel.sequence_parallel (the norms' "
                                  "gradients need megatron's tensor-parallel reduction); set it to false or "
                                  "use engine: megatron")
            if self.train.spike.action in ("skip", "rollback"):
                raise ConfigError(f"train.spike.action {self.train.spike.action!r} needs engine: megatron (DeepSpeed "
                                  f"applies the update inside its step); use 'log' with engine: deepspeed")
            if self.checkpoint.async_save:  # DeepSpeed's decoupled writer needs its compiled async-I/O op (libaio)
                raise ConfigError("checkpoint.async_save is implemented for engine: megatron (megatron-core's "
                                  "asynchronous dist_checkpointing save); set it to false with engine: deepspeed")
        if self.schedule.warmup_steps >= self.train.max_steps:
            raise ConfigError(f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be smaller than "
                              f"train.max_steps ({self.train.max_steps})")
        if self.parallel.context > 1:
            self._check_context_parallel()
        self.parallel.stage_layers(self.model.num_layers)  # validates the pipeline split
        try:
            self.model.check_tensor_parallel(self.parallel.tensor)
        except ValueError as err:
            raise ConfigError(f"{err} (parallel.tensor)") from None
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"run_name must be a non-empty folder name without '/', got {self.run_name!r}")
        traced = self.profile.step_range()
        if traced and traced[0] > self.train.max_steps:
            raise ConfigError(f"profile.steps {self.profile.steps!r} starts after train.max_steps "
                              f"({self.train.max_steps}): nothing would be traced")

    def _check_context_parallel(self) -> None:
        """parallel.context > 1 runs every block type and both architectures, on the megatron engine."""
        cp = self.parallel.context
        if self.engine != "megatron":
            raise ConfigError(f"parallel.context {cp} needs engine: megatron, whose distributed optimizer shards "
                              "over data x context ranks as ZeRO-1 does (DeepSpeed's own sequence parallelism is "
                              "Ulysses, which the feedback solve and Mamba state cannot use: "
                              "docs/context_parallel.md)")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading ----------------------------------------------------------------------------------
def _coerce(value, annotation, where: str):
    """Convert a YAML/CLI value to the field's annotated type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, options[0], where)
    if origin is list:
        if isinstance(value, str):  # a CLI override: --data.sources '[{name: web, path: data/web}]'
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of fields, got {value!r}")
        return _build(annotation, value, where)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, str):  # CLI values, and YAML's "3e-4" (YAML 1.1 reads it as a string)
            try:
                value = float(value) if annotation is float else int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (annotation is int and not isinstance(value, int)):
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(f"{where} must be {kind}, got {value!r}")
        return annotation(value)
    if annotation is str:
        return str(value)
    return value


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(f'{where}.{k}' if where else k for k in unknown)}; "
                          f"valid fields: {', '.join(sorted(known))}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {err}") from None
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {err}") from None


def apply_override(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {part} is not a section")
    node[leaf] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """YAML file + ["--section.field", "value", ...] overrides -> a validated RunConfig."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; recipes live in configs/ (e.g. configs/tiny.yaml)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    overrides = list(overrides or [])
    while overrides:
        flag = overrides.pop(0)
        if "=" in flag:
            flag, value = flag.split("=", 1)
        elif overrides:
            value = overrides.pop(0)
        else:
            raise ConfigError(f"override {flag} has no value")
        if not flag.startswith("--"):
            raise ConfigError(f"overrides look like --section.field value, got {flag!r}")
        apply_override(tree, flag[2:], value)
    if tree.get("stages") and "max_steps" not in (tree.get("train") or {}):  # a campaign's length is its stages'
        steps = [stage.get("steps") if isinstance(stage, dict) else None for stage in tree["stages"]]
        if all(isinstance(n, int) and n >= 1 for n in steps):
            tree.setdefault("train", {})["max_steps"] = sum(steps)
    if "model" not in tree:
        raise ConfigError(f"{path}: the 'model' section is required (vocab_size, hidden_size, num_layers, num_heads)")
    return _build(RunConfig, tree, "")


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
