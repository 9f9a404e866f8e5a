"""The sweep planner: compute budgets -> one training config per (arm, size, tokens) point.

An arm is an architecture (`sessa`, `transformer`) or a layer-pattern unit of model/blocks.py
(`S-`: Sessa + MLP, `SSS*`: one attention block in four, `M-`: Mamba-2 + MLP), repeated to the
size rule's depth (rounded to whole units, at least one). Pattern arms use the MLP width rule of
ModelConfig (8/3 x width) like the Transformer arm; run and file names spell a pattern with letters
(`arm_slug`: S s, * a, - f, M m, prefixed with p: `S-` -> `psf`).

Sizes come from a width/depth rule (`SizeRule`): layers = round(width / aspect), heads of
`head_size`, kv-heads = heads / kv_group. Two layouts:

  isoflop  per budget C, `sizes_per_budget` widths around the 20-tokens-per-parameter optimum
           (targets N*(C) x spread^[-1..1], nearest candidate width each), tokens = C / FLOPs-per-token.
  ladder   per width, one WSD run whose cooldown branches stop at `ratios` x N tokens (default
           10, 20, 40, 80 = 0.5, 1, 2, 4 x 20 tokens/param). The longest branch is the main run;
           every shorter branch forks from its constant-LR phase at step (1 - f) x its own length
           and decays for the last fraction f, so each branch is a complete WSD run (a valid point).

Steps are whole: tokens are rounded to steps x batch, the achieved FLOPs (model convention of the
FLOP ledger, the one MFU uses) recorded next to the target, and points off target by more than
`tolerance` (2%) flagged. Hyper-parameters per size follow `HparamRules` (each overridable):
  lr     = 0.3118 * C^-0.1250        DeepSeek LLM (2024), eq. 1, fitted on C in FLOPs
  batch  = 0.2920 * C^0.3271 tokens  ibid.; rounded to whole micro-batches of sequences
  warmup = N tokens (one per parameter), at most 25% of the steps (OLMo model ladder)
  beta2  = 0.99 below 64 sequences per batch, else 0.95 (Porian et al. 2024: small batches need 0.99)
The GPU-hour cost uses a measured throughput (benchmarks/train_step.py's model TFLOP/s per device).

    python -m pretrain.scaling plan --base configs/tiny.yaml --budgets 1e13 3e13 --widths 32 48 64 96 --dry-run
"""
import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from model.config import ARCHS, BLOCK_TYPES, ModelConfig

from model.flops import count_params, ledger

TOKENS_PER_PARAM = 20.0
DEFAULT_SEED = 1234


_SLUG_LETTERS = str.maketrans({"S": "s", "*": "a", "-": "f", "M": "m"})


def check_arm(arm: str) -> str:
    """`arm` itself if it is an architecture or a layer pattern unit; a ValueError naming both otherwise."""
    if arm in ARCHS or (arm and not set(arm) - set(BLOCK_TYPES)):
        return arm
    blocks = ", ".join(f"{c!r} {name}" for c, name in BLOCK_TYPES.items())
    raise ValueError(f"arm {arm!r} is neither an architecture {ARCHS} nor a layer pattern of the block "
                     f"characters ({blocks}), e.g. S- or SSS*")


def arm_slug(arm: str) -> str:
    """A file- and shell-safe name of an arm (patterns hold '*' and '-')."""
    return arm if arm in ARCHS else "p" + check_arm(arm).translate(_SLUG_LETTERS)


@dataclass(kw_only=True)
class SizeRule:
    """Width -> depth and heads."""

    aspect: float = 64.0  # width / layers (Kaplan et al. 2020: flat for 20..200; 64 is common at small scale)
    head_size: int = 64  # heads = width / head_size (at least 1)
    kv_group: int = 1  # query heads per kv-head (1: multi-head attention)
    min_layers: int = 1

    def model_fields(self, width: int) -> dict:
        heads = max(1, width // self.head_size)
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads of size {self.head_size}")
        kv = max(1, heads // self.kv_group)
        while heads % kv:
            kv -= 1
        return {"hidden_size": width, "num_layers": max(self.min_layers, round(width / self.aspect)),
                "num_heads": heads, "num_kv_heads": kv}


@dataclass(kw_only=True)
class HparamRules:
    """Per-size optimisation hyper-parameters; a fixed value in `overrides` replaces a rule."""

    lr_coef: float = 0.3118
    lr_exponent: float = -0.1250
    batch_coef: float = 0.2920
    batch_exponent: float = 0.3271
    warmup_tokens_per_param: float = 1.0
    max_warmup_fraction: float = 0.25
    small_batch_sequences: int = 64
    overrides: dict = field(default_factory=dict)  # e.g. {"lr": 3e-3, "batch_tokens": 4096, "beta2": 0.95}

    def batch_tokens(self, flops: float, seq_len: int, micro_batch: int) -> int:
        if "batch_tokens" in self.overrides:
            return int(self.overrides["batch_tokens"])
        unit = seq_len * micro_batch
        return max(1, round(self.batch_coef * flops**self.batch_exponent / unit)) * unit

    def lr(self, flops: float) -> float:
        return float(self.overrides.get("lr", self.lr_coef * flops**self.lr_exponent))

    def warmup_steps(self, params: int, batch_tokens: int, steps: int) -> int:
        if "warmup_steps" in self.overrides:
            return int(self.overrides["warmup_steps"])
        return max(1, min(round(self.warmup_tokens_per_param * params / batch_tokens),
                          int(self.max_warmup_fraction * steps)))

    def beta2(self, batch_tokens: int, seq_len: int) -> float:
        if "beta2" in self.overrides:
            return float(self.overrides["beta2"])
        return 0.99 if batch_tokens // seq_len < self.small_batch_sequences else 0.95


@dataclass
class PlanPoint:
    """One training run (or cooldown branch) of the sweep."""

    name: str
    arch: str
    width: int
    layers: int
    heads: int
    kv_heads: int
    params: int
    params_non_embedding: int
    seq_len: int
    flops_per_token: float  # model convention, training
    target_flops: float
    tokens: int
    batch_tokens: int
    steps: int
    achieved_flops: float
    rel_error: float  # achieved / target - 1
    off_budget: bool
    lr: float
    warmup_steps: int
    beta2: float
    decay_fraction: float  # WSD: the last fraction of `steps` decays the LR
    fork_of: str = ""  # ladder branches: the run whose checkpoint at `fork_step` they continue
    fork_step: int = 0
    overrides: dict = field(default_factory=dict)  # the dotted config overrides of this point
    config_hash: str = ""


def config_hash(tree: dict) -> str:
    """Hash of what determines the result: model, data, optimisation, schedule and steps (not the
    run name, paths, logging, checkpoint cadence or evaluation)."""
    keep = {k: tree.get(k) for k in ("model", "train", "data", "optim", "schedule") if k in tree}
    keep.get("data", {}).pop("num_workers", None)
    if "train" in keep:
        keep["train"] = {k: v for k, v in keep["train"].items() if k not in ("exit_interval", "micro_batch_size")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flatten(prefix: str, tree: dict) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(f"{prefix}{key}.", value))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(base: dict, overrides: dict) -> dict:
    tree = copy.deepcopy(base)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


@dataclass
class Planner:
    base: dict  # the base recipe (YAML tree): vocabulary, data, and anything the sweep does not vary
    seq_len: int
    archs: tuple = ("sessa", "transformer")  # arms: architectures or layer-pattern units
    size_rule: SizeRule = field(default_factory=SizeRule)
    rules: HparamRules = field(default_factory=HparamRules)
    micro_batch: int = 1
    tolerance: float = 0.02
    decay_fraction: float = 0.2
    seed: int = DEFAULT_SEED
    # μP (model/mup.py): every point gets model.mup with this base width (and the size rule's head size
    # there), and the LR rule is evaluated at the base width's compute on the point's tokens (below)
    mup_base_width: int | None = None

    def model_config(self, arm: str, width: int) -> ModelConfig:
        fields = dict(self.base.get("model", {})) | self.size_rule.model_fields(width)
        if self.mup_base_width:
            base = self.size_rule.model_fields(self.mup_base_width)
            fields |= {"mup": True, "mup_base_width": self.mup_base_width,
                       "mup_base_head_size": self.mup_base_width // base["num_heads"]}
        if check_arm(arm) in ARCHS:
            fields |= {"arch": arm, "layer_pattern": ""}
        else:
            repeats = max(1, round(fields["num_layers"] / len(arm)))
            fields |= {"arch": "sessa", "layer_pattern": arm * repeats, "num_layers": len(arm) * repeats}
        if arm == "transformer" or set(arm) & {"-", "*"}:
            fields.pop("ffn_hidden_size", None)  # derived from the width
        return ModelConfig(**fields)

    def _point(self, name: str, arch: str, width: int, target_flops: float, *, tokens: float | None = None,
               budget_for_rules: float | None = None, batch_tokens: int | None = None) -> PlanPoint:
        config = self.model_config(arch, width)
        per_token = ledger(config, self.seq_len).per_token("model")
        params = count_params(config)
        if self.seed != DEFAULT_SEED:  # repeated seeds of a point (the noise floor) get their own runs
            name = f"{name}-s{self.seed}"
        flops_for_rules = budget_for_rules or target_flops
        batch = batch_tokens or self.rules.batch_tokens(flops_for_rules, self.seq_len, self.micro_batch)
        wanted = tokens if tokens is not None else target_flops / per_token
        steps = max(2, round(wanted / batch))
        achieved = steps * batch * per_token
        rel = achieved / target_flops - 1
        warmup = self.rules.warmup_steps(params, batch, steps)
        lr_flops = flops_for_rules
        if self.mup_base_width:  # μP takes the width out of the LR: the rule at the base width, same tokens
            lr_flops *= ledger(self.model_config(arch, self.mup_base_width), self.seq_len).per_token("model") / per_token
        point = PlanPoint(
            name=name, arch=arch, width=width, layers=config.num_layers, heads=config.num_heads,
            kv_heads=config.num_kv_heads, params=params, params_non_embedding=count_params(config, True),
            seq_len=self.seq_len, flops_per_token=per_token, target_flops=target_flops, tokens=steps * batch,
            batch_tokens=batch, steps=steps, achieved_flops=achieved, rel_error=rel,
            off_budget=abs(rel) > self.tolerance, lr=self.rules.lr(lr_flops), warmup_steps=warmup,
            beta2=self.rules.beta2(batch, self.seq_len), decay_fraction=self.decay_fraction,
        )
        return point

    def _finish(self, point: PlanPoint) -> PlanPoint:
        config = self.model_config(point.arch, point.width)
        overrides = {f"model.{k}": v for k, v in config.to_dict().items() if k != "vocab_size"}
        overrides |= {
            "run_name": point.name,
            "train.max_steps": point.steps, "train.global_batch_tokens": point.batch_tokens,
            "train.micro_batch_size": self.micro_batch, "train.seed": self.seed,
            "optim.lr": point.lr, "optim.min_lr": 0.0, "optim.beta2": point.beta2,  # WSD cools down to 0
            "schedule.style": "wsd", "schedule.warmup_steps": point.warmup_steps,
            "schedule.wsd_decay_fraction": round(point.decay_fraction, 6),
            "eval.interval": 0, "eval.sample_tokens": 0,  # held-out loss once, at the end (post-cooldown)
            "checkpoint.interval_steps": 0,  # saved on exit; ladder mains also at their branches' forks
        }
        point.overrides = overrides
        point.config_hash = config_hash(apply_overrides(self.base, overrides))
        return point

    def isoflop(self, budgets: list[float], widths: list[int], sizes_per_budget: int = 3,
                spread: float = 4.0) -> list[PlanPoint]:
        points = []
        for arch in self.archs:
            sizes = {w: count_params(self.model_config(arch, w)) for w in widths}
            for budget in budgets:
                n_opt = math.sqrt(budget / (6 * TOKENS_PER_PARAM))
                chosen = []
                for i in range(sizes_per_budget):
                    exponent = -1 + 2 * i / max(1, sizes_per_budget - 1)
                    target = n_opt * spread**exponent
                    free = [w for w in widths if w not in chosen]
                    if free:
                        chosen.append(min(free, key=lambda w: abs(math.log(sizes[w] / target))))
                for width in sorted(chosen):
                    point = self._point(f"{arm_slug(arch)}-w{width}-c{budget:.0e}".replace("+", ""), arch, width,
                                        budget)
                    points.append(self._finish(point))
        return points

    def ladder(self, widths: list[int], ratios: tuple = (10, 20, 40, 80)) -> list[PlanPoint]:
        """WSD ladder: per width, the longest run and cooldown branches forked from it."""
        points = []
        for arch in self.archs:
            for width in widths:
                config = self.model_config(arch, width)
                params = count_params(config)
                per_token = ledger(config, self.seq_len).per_token("model")
                longest = max(ratios) * params
                # one batch and LR for the whole ladder (the branches share the constant phase)
                main = self._point(f"{arm_slug(arch)}-w{width}-r{max(ratios):g}", arch, width, longest * per_token,
                                   tokens=longest)
                for ratio in sorted(ratios):
                    tokens = ratio * params
                    name = f"{arm_slug(arch)}-w{width}-r{ratio:g}"
                    point = self._point(name, arch, width, tokens * per_token, tokens=tokens,
                                        budget_for_rules=main.target_flops, batch_tokens=main.batch_tokens)
                    point.warmup_steps = main.warmup_steps
                    stable = int(round((1 - self.decay_fraction) * point.steps))
                    point.decay_fraction = (point.steps - stable) / point.steps
                    if ratio != max(ratios):
                        point.fork_of, point.fork_step = main.name, stable
                    points.append(self._finish(point))
                forks = [p.fork_step for p in points if p.fork_of == main.name]
                if forks:  # the main keeps a checkpoint at every fork step (gcd cadence, none pruned)
                    every = math.gcd(*forks)
                    main_point = next(p for p in points if p.name == main.name)
                    main_point.overrides |= {"checkpoint.interval_steps": every, "checkpoint.keep_every": every}
        return points


def format_table(points: list[PlanPoint], tflops_per_gpu: float | None = None) -> str:
    head = (f"{'name':<28} {'N':>9} {'L':>3} {'D':>5} {'tokens':>10} {'tok/N':>6} {'batch':>6} {'steps':>6} "
            f"{'target':>9} {'achieved':>9} {'off%':>6} {'lr':>8} {'wu':>4} {'b2':>5} fork")
    if tflops_per_gpu:
        head += "  GPU-h"
    lines = [head]
    for p in points:
        line = (f"{p.name:<28} {p.params:>9.3g} {p.layers:>3} {p.width:>5} {p.tokens:>10.3g} {p.tokens / p.params:>6.1f} "
                f"{p.batch_tokens:>6} {p.steps:>6} {p.target_flops:>9.3g} {p.achieved_flops:>9.3g} "
                f"{100 * p.rel_error:>+6.2f}{'!' if p.off_budget else ' '}{p.lr:>8.2g} {p.warmup_steps:>4} {p.beta2:>5} "
                f"{p.fork_of + '@' + str(p.fork_step) if p.fork_of else '-'}")
        if tflops_per_gpu:
            line += f"  {gpu_hours(p, tflops_per_gpu):.3g}"
        lines.append(line)
    flagged = sum(p.off_budget for p in points)
    lines.append(f"{len(points)} points, {flagged} off budget by more than the tolerance (marked !)")
    if tflops_per_gpu:
        lines.append(f"estimated cost: {sum(gpu_hours(p, tflops_per_gpu) for p in points):.3g} "
                     f"GPU-hours at {tflops_per_gpu} model TFLOP/s per GPU (branches: their cooldown only)")
    return "\n".join(lines)


def gpu_hours(point: PlanPoint, tflops_per_gpu: float) -> float:
    """GPU-hours of a point; a forked branch only pays for the steps after its fork."""
    steps = point.steps - point.fork_step
    return steps * point.batch_tokens * point.flops_per_token / (tflops_per_gpu * 1e12) / 3600


def to_json(points: list[PlanPoint]) -> list[dict]:
    return [asdict(p) for p in points]
