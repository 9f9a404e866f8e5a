"""Hybrid stacks at matched parameters: validation loss, tokens/s (and task accuracy) after the same tokens.

    python benchmarks/hybrid_compare.py --data /tmp/hc-data --target 1848074 --steps 300
    python benchmarks/hybrid_compare.py --config configs/tasks/two-style-easy.yaml --data data/two-style-easy \
        --task two-style --target 1000000 --steps 300          # accuracy on the task's test split
    python benchmarks/hybrid_compare.py --match-only            # parameter matching only, no training
Arms (model.layer_pattern units, tiled): sessa (S x n), S- (S- x n), SSS* (SSS* x n), transformer
(model.arch transformer, n layers), no-feedback (S x n, model.feedback false), M- (Mamba-2, M- x n).
Each arm gets the n (and, with MLP blocks, the model.ffn_hidden_size: for each n the multiple of 16
that brings the total nearest --target, and of the n that fit, the one whose width is nearest the
recipe's own) whose total parameters (model.flops.count_params) are within --tolerance of --target
(default: the recipe's model); an arm that cannot be matched is refused. Every arm then trains with
the real trainer (`python -m pretrain`, one process each) on the same recipe, data, seed, schedule
and steps; the table reads metrics.jsonl: the final val/loss, the median train/tokens_per_s over the
logging windows, and with --task eval/<task>/accuracy. Extra `--section.field value` arguments go
to every run. Prints a markdown table, or JSON with --json.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.flops import count_params  # noqa: E402
from pretrain.config import load_config  # noqa: E402

ARMS = {  # name: (layer-pattern unit, fixed model overrides); the transformer's unit is one layer
    "sessa": ("S", {}),
    "S-": ("S-", {}),
    "SSS*": ("SSS*", {}),
    "transformer": ("*-", {"arch": "transformer"}),
    "no-feedback": ("S", {"feedback": "false"}),
    "M-": ("M-", {}),
}
RUN_NAMES = {"sessa": "sessa", "S-": "s-mlp", "SSS*": "sss-attn", "transformer": "transformer",
             "no-feedback": "no-feedback", "M-": "mamba2"}
FFN_MULTIPLE = 16


@dataclass
class Match:
    """One arm's model: its overrides of the recipe's model section and its parameter count."""
    arm: str
    repeats: int
    ffn_hidden_size: int | None  # None: no MLP blocks
    params: int
    deviation: float  # params / target - 1
    overrides: dict

    @property
    def label(self) -> str:
        unit, _ = ARMS[self.arm]
        shape = f"{self.repeats} layers" if self.arm == "transformer" else f"{unit} x {self.repeats}"
        if self.arm == "no-feedback":
            shape += ", no feedback"
        return shape + (f", ffn {self.ffn_hidden_size}" if self.ffn_hidden_size else "")


def arm_overrides(arm: str, repeats: int, ffn: int | None) -> dict:
    """The model.* overrides of `arm` with `repeats` pattern units (and MLP width `ffn`)."""
    unit, fixed = ARMS[arm]
    if fixed.get("arch") == "transformer":
        overrides = {"num_layers": repeats, "layer_pattern": "", **fixed}
    else:
        overrides = {"num_layers": len(unit) * repeats, "layer_pattern": unit * repeats, **fixed}
    if ffn is not None:
        overrides["ffn_hidden_size"] = ffn
    return overrides


def cli(overrides: dict, section: str = "model") -> list[str]:
    return [arg for key, value in overrides.items() for arg in (f"--{section}.{key}", str(value))]


def match_arm(config: str, arm: str, target: int, tolerance: float = 0.02) -> Match:
    """The arm's model within `tolerance` of `target` parameters, counted on the recipe `config` with
    the very overrides training gets: among the depths that fit, the one with the smallest deviation,
    or (arms with MLP blocks, each depth with the multiple-of-16 MLP width whose total is nearest
    `target`) the one whose MLP width is nearest the recipe's own. ValueError if none fits."""
    base_ffn = load_config(config).model.ffn_hidden_size
    has_mlp = "-" in ARMS[arm][0]

    def candidate(repeats, ffn):
        overrides = arm_overrides(arm, repeats, ffn)
        params = count_params(load_config(config, cli(overrides)).model)
        return Match(arm, repeats, ffn, params, params / target - 1, overrides)

    tried = []
    for repeats in range(1, 1025):
        if has_mlp:  # parameters are linear in the MLP width: solve for it, rounded to the multiple
            low, high = candidate(repeats, FFN_MULTIPLE), candidate(repeats, 2 * FFN_MULTIPLE)
            per_unit = high.params - low.params
            units = max(1, round(1 + (target - low.params) / per_unit))
            tried.append(candidate(repeats, units * FFN_MULTIPLE) if units > 1 else low)
        else:
            tried.append(candidate(repeats, None))
        if tried[-1].deviation > tolerance:
            break
    fits = [m for m in tried if abs(m.deviation) <= tolerance]
    if not fits:
        near = ", ".join(f"{m.label}: {m.params:,} ({m.deviation:+.1%})"
                         for m in sorted(tried, key=lambda m: abs(m.deviation))[:2])
        raise ValueError(f"arm {arm}: no model within {tolerance:.0%} of {target:,} parameters on {config} "
                         f"(nearest: {near}); choose another --target or leave the arm out of --arms")
    if has_mlp:
        return min(fits, key=lambda m: (abs(math.log(m.ffn_hidden_size / base_ffn)), abs(m.deviation)))
    return min(fits, key=lambda m: abs(m.deviation))


def train_arm(match: Match, args, extra: list[str], runs_dir: Path) -> dict:
    """Train one matched arm with `python -m pretrain`; its final val/loss, median tokens/s (and task accuracy)."""
    run_name = RUN_NAMES[match.arm]
    run_dir = runs_dir / run_name
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists (a rerun would resume it and append to its metrics); "
                         "remove it or pass another --runs-dir")
    settings = {"run_name": run_name, "runs_dir": runs_dir, "data.path": args.data, "train.max_steps": args.steps,
                "data.num_workers": 0, "logging.wandb": "disabled", "logging.progress_bar": "false",
                "checkpoint.interval_steps": 0, "checkpoint.save_on_exit": "false", "eval.interval": 0,
                "eval.sample_tokens": 0}
    if args.task:
        settings["eval.tasks"] = args.task
    command = [sys.executable, "-m", "pretrain", "--config", args.config, *cli(match.overrides),
               *(arg for key, value in settings.items() for arg in (f"--{key}", str(value))), *extra]
    runs_dir.mkdir(parents=True, exist_ok=True)
    log = runs_dir / f"{run_name}.log"
    print(f"[{match.arm}] {match.label}, {match.params:,} parameters: {' '.join(command[1:])} (log {log})",
          file=sys.stderr)
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"arm {match.arm} failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val/loss" in r][-1]
    logged = [r for r in records if "train/loss" in r]
    result = {"val_loss": final["val/loss"], "train_loss": logged[-1]["train/loss"],
              "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in logged),
              "tokens": logged[-1]["train/consumed_tokens"]}
    if args.task:
        result["accuracy"] = final.get(f"eval/{args.task}/accuracy")
    return result


def table(rows: list[dict], target: int, task: str | None) -> str:
    head = "| arm | model | parameters | vs target | val loss | tokens/s |" + (f" {task} accuracy |" if task else "")
    lines = [head, "|" + "---|" * head.count(" |")]
    for row in rows:
        line = (f"| {row['arm']} | {row['model']} | {row['params']:,} | {row['deviation']:+.2%} | "
                + (f"{row['val_loss']:.4f} | {row['tokens_per_s']:,.0f} |" if "val_loss" in row else "| |"))
        if task:
            line += f" {row['accuracy']:.3f} |" if row.get("accuracy") is not None else " |"
        lines.append(line)
    return f"target {target:,} parameters\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="the recipe every arm trains")
    parser.add_argument("--data", default="data/builtin", help="prepared data (data.path)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--target", type=int, default=None, help="parameters to match (default: the recipe's model)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest |params / target - 1|")
    parser.add_argument("--steps", type=int, default=300, help="train.max_steps of every run")
    parser.add_argument("--task", default=None, help="an eval task (eval.tasks, e.g. two-style) scored at the end")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: a new temp dir)")
    parser.add_argument("--match-only", action="store_true", help="print the matched models, train nothing")
    parser.add_argument("--json", action="store_true")
    args, extra = parser.parse_known_args()
    target = args.target or count_params(load_config(args.config).model)
    try:
        matches = [match_arm(args.config, arm, target, args.tolerance) for arm in args.arms]
    except ValueError as err:
        raise SystemExit(f"hybrid_compare: {err}") from None
    rows = [{"arm": m.arm, "model": m.label, **asdict(m)} for m in matches]
    if not args.match_only:
        runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="hybrid-compare-"))
        for row, match in zip(rows, matches):
            row.update(train_arm(match, args, extra, runs_dir))
    if args.json:
        print(json.dumps({"target": target, "config": args.config, "steps": args.steps, "arms": rows}, indent=1))
    else:
        print(table(rows, target, args.task))


if __name__ == "__main__":
    main()
