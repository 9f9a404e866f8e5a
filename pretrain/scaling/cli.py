"""Command line of the scaling-law harness.

    python -m pretrain.scaling fit --points sweep.csv --approach 3 --json
"""
import argparse
import json
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

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
