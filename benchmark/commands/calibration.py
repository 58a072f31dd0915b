"""``python -m benchmark calibration``: the family-wise marking rate of the significance test on real stores."""
from __future__ import annotations

import argparse

from benchmark.analysis.significance import TESTS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibration",
        help="how often the table's significance test marks a row when no method carries signal (vs alpha)",
        description=(
            "Run the declared family of tests of `table --significance` on every column (cohort x backbone x "
            "recipe x selection) of the given stores, and print the fraction of columns with any mark next to "
            "alpha. On stores run with `run --signal none` every method is equally good, so this fraction "
            "estimates the family-wise error rate; it should be <= alpha within its Monte-Carlo error. A store "
            "gives one column per cohort: pass several stores (other data seeds) for a usable estimate."
        ),
    )
    p.add_argument("--results", nargs="+", required=True, help="result-store roots (run on --signal none data)")
    p.add_argument("--methods", default=None, help="comma list of methods (default: every method in the stores)")
    family = p.add_mutually_exclusive_group()
    family.add_argument("--reference", default=None, help="family: every method vs this one")
    family.add_argument("--all-pairs", action="store_true", help="family: every pair (the default)")
    p.add_argument("--test", choices=TESTS, default="auto")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--boot-seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from benchmark.analysis.statistics import SignificanceOptions, calibration_rate, null_means
    from benchmark.store.query import Results

    options = SignificanceOptions(family="reference" if args.reference else "all-pairs",
                                  reference=args.reference.lower() if args.reference else None, alpha=args.alpha,
                                  test=args.test, n_boot=args.n_boot, seed=args.boot_seed)
    methods = [m.strip().lower() for m in args.methods.split(",")] if args.methods else None
    stores = [Results.open(root) for root in args.results]
    rate = calibration_rate(stores, options, methods)
    if not rate.columns:
        raise ValueError("no column with at least two methods in the given stores")
    means = null_means(stores, methods)
    print("mean C-index over columns (0.5 expected with no signal; SE over columns):")
    for method, row in means.iterrows():
        print(f"  {method:<24} {row['mean']:.3f} (SE {row['se']:.3f}, {int(row['columns'])} columns)")
    verdict = "within" if rate.within(args.alpha) else "ABOVE"
    print(f"{rate.marked} of {rate.columns} columns marked: family-wise rate {rate.rate:.3f} "
          f"(Monte-Carlo SE {rate.standard_error:.3f}) vs alpha {args.alpha:g}: {verdict} alpha + 2 SE")
    return 0
