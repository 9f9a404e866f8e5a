"""Command line of the scaling-law harness.

    python -m pretrain.scaling fit --points sweep.csv --approach 3 --json
    python -m pretrain.scaling coord-check --config configs/tiny.yaml --widths 64,128,256,512 --out coord/
"""
import argparse
import json
import sys
from pathlib import Path


def _fit(args) -> int:
    from .fit import FitError, Points, fit

    try:
        points = Points.from_csv(args.points, loss_column=args.loss_column)
        kwargs = dict(bootstrap=args.bootstrap, level=args.level, seed=args.seed, target_flops=args.target_flops)
        result = fit(points, args.approach, **kwargs)
    except FitError as err:
        print(f"fit: {err}", file=sys.stderr)
        return 2
    out = result.to_dict()
    out.pop("residuals", None)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in result.params.items():
            interval = result.intervals.get(key)
            band = f"  [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else ""
            print(f"{key:>8} = {value:.4g}{band}")
        print("optimum:", {k: f"{v:.4g}" for k, v in result.optimum.items()})
    return 0


def _plan(args) -> int:
    import yaml

    from .plan import HparamRules, Planner, SizeRule, apply_overrides, format_table, to_json

    base = yaml.safe_load(Path(args.base).read_text()) or {}
    overrides = {k: v for k, v in (("lr", args.lr), ("batch_tokens", args.batch_tokens), ("beta2", args.beta2),
                                   ("warmup_steps", args.warmup_steps)) if v is not None}
    planner = Planner(
        base=base, seq_len=args.seq_len, archs=tuple(args.arms), micro_batch=args.micro_batch,
        size_rule=SizeRule(aspect=args.aspect, head_size=args.head_size, kv_group=args.kv_group),
        rules=HparamRules(overrides=overrides), tolerance=args.tolerance, decay_fraction=args.decay_fraction,
        seed=args.seed, mup_base_width=(args.mup_base_width or min(args.widths)) if args.mup else None,
    )
    if args.mode == "isoflop" and not args.budgets:
        print("plan: --mode isoflop needs --budgets", file=sys.stderr)
        return 2
    try:
        if args.mode == "isoflop":
            points = planner.isoflop(args.budgets, args.widths, args.sizes_per_budget, args.spread)
        else:
            points = planner.ladder(args.widths, tuple(args.ratios))
    except ValueError as err:  # a model the arms and widths cannot build (e.g. --mup with the Transformer arm)
        print(f"plan: {err}", file=sys.stderr)
        return 2
    print(format_table(points, args.tflops_per_gpu))
    if args.dry_run:
        return 0
    out = Path(args.out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for point in points:
        tree = apply_overrides(base, point.overrides)
        tree["runs_dir"] = str(out / "runs")
        (out / "configs" / f"{point.name}.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    existing = []
    if args.append and (out / "plan.json").exists():
        existing = json.loads((out / "plan.json").read_text())["points"]
        names = {p.name for p in points}
        existing = [p for p in existing if p["name"] not in names]
    (out / "plan.json").write_text(json.dumps({"base": args.base, "seq_len": args.seq_len, "mode": args.mode,
                                               "points": existing + to_json(points)}, indent=1))
    print(f"wrote {out / 'plan.json'} and {len(points)} configs in {out / 'configs'}")
    return 0


def _collect(args) -> int:
    from .collect import collect, write_table

    rows = collect(args.sweep)
    csv_path, parquet_path = write_table(rows, Path(args.sweep) / "results")
    fitted = sum(r["post_cooldown"] and not r["diverged"] for r in rows)
    print(f"{len(rows)} rows ({fitted} fitted, {sum(r['diverged'] for r in rows)} from diverged runs) -> "
          f"{csv_path}, {parquet_path}")
    return 0


def _compare(args) -> int:
    from .collect import read_table
    from .compare import compare_table

    rows = read_table(Path(args.sweep) / "results" / "results.csv")
    result = compare_table(rows, args.budgets or None, baseline=args.baseline, bootstrap=args.bootstrap,
                           seed=args.seed)
    path = Path(args.sweep) / "results" / "compare.json"
    path.write_text(json.dumps({str(k): v for k, v in result.items()}, indent=1))
    for seq_len, arms in result.items():
        for arm, entry in arms.items():
            where = f"seq_len {seq_len} {arm} vs {args.baseline}"
            if "error" in entry:
                print(f"{where}: {entry['error']}")
                continue
            for row in entry["multiplier"]:
                band = row.get("interval", [float("nan")] * 2)
                print(f"{where} C={row['flops']:.3g}: compute multiplier {row['multiplier']:.3g} "
                      f"[{band[0]:.3g}, {band[1]:.3g}]")
            for name, e in entry["exponents"].items():
                print(f"{where} {name}: {arm} {e[arm]:.3g} {args.baseline} {e[args.baseline]:.3g} "
                      f"p={e.get('p_value', float('nan')):.3g}")
    print(f"wrote {path}")
    return 0


def _plot(args) -> int:
    from .collect import read_table
    from .plot import plot_all

    sweep = Path(args.sweep)
    rows = read_table(sweep / "results" / "results.csv")
    compare_path = sweep / "results" / "compare.json"
    comparison = json.loads(compare_path.read_text()) if compare_path.exists() else None
    elapsed = None
    if (sweep / "launch.json").exists():
        elapsed = json.loads((sweep / "launch.json").read_text()).get("elapsed_s")
    from .plot import fit_arms

    report = plot_all(rows, sweep / "report", sweep=sweep, fits=fit_arms(rows, args.bootstrap, args.seed),
                      comparison=comparison, elapsed_s=elapsed)
    print(f"wrote {report} and its plots")
    return 0


def _launch(args) -> int:
    from .launch import launch_local, launch_slurm

    if args.mode == "local":
        ran = launch_local(args.sweep, max_attempts=args.max_attempts, timeout_s=args.timeout)
        for name, status in ran.items():
            print(f"{name}: {status}")
        print(f"{len(ran)} points run" if ran else "nothing to run: every point is done, diverged or out of attempts")
        return 0 if all(s in ("done", "diverged") for s in ran.values()) else 1
    jobs = launch_slurm(args.sweep, max_attempts=args.max_attempts, throttle=args.throttle,
                        launch_args=[*args.launch_arg, *(f"--sbatch-arg={arg}" for arg in args.sbatch)])
    print(json.dumps(jobs) if jobs else "nothing to submit")
    return 0


def _coord_check(args) -> int:
    import yaml

    from model import ModelConfig

    from .coord_check import coord_check, write

    if not Path(args.config).is_file():
        print(f"coord-check: recipe {args.config} does not exist (e.g. configs/tiny.yaml)", file=sys.stderr)
        return 2
    tree = yaml.safe_load(Path(args.config).read_text()) or {}
    model_fields = dict(tree.get("model") or {})
    if args.pattern is not None:
        model_fields |= {"layer_pattern": args.pattern, "num_layers": len(args.pattern)}
    optim = tree.get("optim") or {}
    try:
        widths = [int(w) for w in args.widths.split(",")]
        model = ModelConfig(**model_fields)
        result = coord_check(model, widths, args.steps, lr=args.lr or float(optim.get("lr", 3e-4)),
                             betas=(float(optim.get("beta1", 0.9)), float(optim.get("beta2", 0.95))),
                             eps=args.eps or float(optim.get("eps", 1e-8)), seq_len=args.seq_len, batch=args.batch,
                             seeds=args.seeds)
    except (TypeError, ValueError) as err:  # the recipe's model, or one of its widths, is not a valid model
        print(f"coord-check: {args.config} --widths {args.widths}: {err}", file=sys.stderr)
        return 2
    json_path, png_path = write(result, Path(args.out))
    for parametrisation, quantities in result["slopes"].items():
        print(f"{parametrisation}: slope of log mean |change| at step {args.steps} against log width: " +
              ", ".join(f"{q} {s['change']:+.2f}" for q, s in quantities.items()))
    print(f"wrote {json_path} and {png_path}")
    return 0


def _arm(text: str) -> str:
    from .plan import check_arm

    try:
        return check_arm(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="lay out a sweep: one config per point, FLOPs target vs achieved")
    plan.add_argument("--base", required=True, help="base recipe YAML (vocabulary, data, everything not swept)")
    plan.add_argument("--mode", choices=("isoflop", "ladder"), default="isoflop",
                      help="isoFLOP grid per budget, or a tokens-per-parameter WSD ladder per width")
    plan.add_argument("--budgets", type=float, nargs="*", default=[], help="compute budgets in FLOPs (isoflop)")
    plan.add_argument("--widths", type=int, nargs="+", required=True, help="candidate model widths")
    plan.add_argument("--arms", "--archs", dest="arms", nargs="+", default=["sessa", "transformer"], type=_arm,
                      help="architectures (sessa, transformer) or layer-pattern units repeated to each depth "
                           "(S- : Sessa + MLP, SSS* : one attention block in four, M- : Mamba-2 + MLP)")
    plan.add_argument("--seq-len", type=int, required=True, help="tokens per sequence of the prepared data")
    plan.add_argument("--sizes-per-budget", type=int, default=3, help="model sizes per isoFLOP budget")
    plan.add_argument("--spread", type=float, default=4.0, help="isoflop sizes span N*/spread .. N* x spread")
    plan.add_argument("--ratios", type=float, nargs="+", default=[10, 20, 40, 80], help="ladder tokens per parameter")
    plan.add_argument("--aspect", type=float, default=64.0, help="width / layers of the width-depth rule")
    plan.add_argument("--head-size", type=int, default=64, help="attention head size of the width-depth rule")
    plan.add_argument("--kv-group", type=int, default=1, help="query heads per kv-head")
    plan.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (batch rounding)")
    plan.add_argument("--decay-fraction", type=float, default=0.2, help="WSD cooldown share of each run")
    plan.add_argument("--tolerance", type=float, default=0.02, help="flag points off budget by more than this")
    plan.add_argument("--seed", type=int, default=1234, help="training seed of every point")
    plan.add_argument("--lr", type=float, help="fixed learning rate instead of the per-size rule")
    plan.add_argument("--batch-tokens", type=int, help="fixed global batch (tokens) instead of the rule")
    plan.add_argument("--beta2", type=float, help="fixed Adam beta2 instead of the rule")
    plan.add_argument("--warmup-steps", type=int, help="fixed warmup instead of the rule")
    plan.add_argument("--mup", action="store_true", help="every point under μP (model.mup; docs/mup.md); the LR rule "
                      "is evaluated at the base width's compute on the point's tokens")
    plan.add_argument("--mup-base-width", type=int, help="μP's base width (default: the smallest of --widths)")
    plan.add_argument("--tflops-per-gpu", type=float, help="measured model TFLOP/s per GPU, for the GPU-hour estimate")
    plan.add_argument("--out", default="sweeps/default", help="sweep directory (plan.json, configs/)")
    plan.add_argument("--dry-run", action="store_true", help="print the table only")
    plan.add_argument("--append", action="store_true", help="add these points to an existing plan.json")
    plan.set_defaults(handler=_plan)

    launch = sub.add_parser("launch", help="run the plan's points not done yet (local, or SLURM arrays)")
    launch.add_argument("--sweep", required=True, help="sweep directory written by plan")
    launch.add_argument("--mode", choices=("local", "slurm"), default="local")
    launch.add_argument("--max-attempts", type=int, default=2, help="attempts per point (local: runs; SLURM: submissions, each "
                        "task also requeueing itself while its checkpoint advances)")
    launch.add_argument("--throttle", type=int, default=4, help="SLURM: array tasks running at once")
    launch.add_argument("--timeout", type=float, default=3600, help="local: seconds per point")
    launch.add_argument("--launch-arg", action="append", default=[], metavar="ARG",
                        help="SLURM: argument for `python -m launch.slurm`, e.g. --launch-arg=--gpus-per-node=1 "
                             "(repeatable; resources otherwise come from the configs' launch: section)")
    launch.add_argument("--sbatch", action="append", default=[], metavar="ARG",
                        help="SLURM: extra sbatch argument, e.g. --sbatch=--exclusive (repeatable)")
    launch.set_defaults(handler=_launch)

    collect = sub.add_parser("collect", help="results table (CSV + Parquet) of a sweep's runs")
    collect.add_argument("--sweep", required=True, help="sweep directory (plan.json, runs/)")
    collect.set_defaults(handler=_collect)

    compare = sub.add_parser("compare", help="each arm vs a baseline arm: compute multiplier, exponent test")
    compare.add_argument("--sweep", required=True, help="sweep directory with results/results.csv")
    compare.add_argument("--baseline", default="transformer", type=_arm, help="the arm the others are compared with")
    compare.add_argument("--budgets", type=float, nargs="*", default=[], help="budgets (default: the sweep's)")
    compare.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per architecture")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    compare.set_defaults(handler=_compare)

    plot = sub.add_parser("plot", help="PNG plots and report.md of a collected sweep")
    plot.add_argument("--sweep", required=True, help="sweep directory with results/results.csv")
    plot.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the bands")
    plot.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    plot.set_defaults(handler=_plot)

    coord = sub.add_parser("coord-check", help="μP coordinate check: activation changes against width, with "
                           "and without μP (pretrain/scaling/coord_check.py)")
    coord.add_argument("--config", required=True, help="recipe YAML: its model: and optim: sections")
    coord.add_argument("--widths", required=True, help="comma-separated widths, e.g. 64,128,256,512")
    coord.add_argument("--steps", type=int, default=10, help="Adam steps per width")
    coord.add_argument("--out", required=True, help="directory for coord_check.json and coord_check.png")
    coord.add_argument("--pattern", help="model.layer_pattern instead of the recipe's (num_layers follows)")
    coord.add_argument("--lr", type=float, help="learning rate instead of the recipe's optim.lr")
    coord.add_argument("--eps", type=float, help="Adam eps instead of the recipe's optim.eps (docs/mup.md: its "
                       "default 1e-8 damps the small gradients of a wide μP model)")
    coord.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    coord.add_argument("--batch", type=int, default=8, help="sequences in the batch")
    coord.add_argument("--seeds", type=int, default=1, help="initialisations averaged per width")
    coord.set_defaults(handler=_coord_check)

    fit = sub.add_parser("fit", help="fit a scaling law (Chinchilla approach 1, 2 or 3) with bootstrap intervals")
    fit.add_argument("--points", required=True, help="CSV with columns params, tokens, loss (optional: budget)")
    fit.add_argument("--approach", type=int, choices=(1, 2, 3), default=3, help="Chinchilla approach")
    fit.add_argument("--loss-column", default="loss", help="column holding the loss (e.g. loss_nats)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    fit.add_argument("--level", type=float, default=0.95, help="interval coverage")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    fit.add_argument("--target-flops", type=float, default=None, help="budget for N*, D*, L* (default: largest seen)")
    fit.add_argument("--json", action="store_true", help="print one JSON object")
    fit.set_defaults(handler=_fit)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
