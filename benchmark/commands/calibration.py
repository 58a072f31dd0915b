"""``python -m benchmark calibration``: how often each offered significance test marks a column of equally good
training procedures, per family, next to alpha."""
from __future__ import annotations

import argparse

from benchmark.analysis.significance import STAT_TESTS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibration",
        help="false-mark rate of every significance test and family on stores of equally good methods (vs alpha)",
        description=(
            "Run every offered test of `table --significance` in both families (every method vs a reference; all "
            "pairs) on every column (cohort x backbone x recipe x selection) of the given stores, and print the "
            "fraction of columns with any mark, its Monte-Carlo SE and alpha, split by the fewest events in a "
            "validation fold. The stores must hold equally good training procedures (`make calibration`: one "
            "procedure registered under several names, on data with and without signal; or `run --signal none`); "
            "the fraction then estimates the family-wise error rate and should be <= alpha + 2 SE."
        ),
    )
    p.add_argument("--results", nargs="+", required=True, help="result-store roots of one null design")
    p.add_argument("--design", default=None, help="a label for the design, printed with the table")
    p.add_argument("--methods", default=None, help="comma list of methods (default: every method in the stores)")
    p.add_argument("--reference", default=None, help="reference of the vs-reference family (default: first by name)")
    p.add_argument("--tests", default=",".join(STAT_TESTS),
                   help=f"comma list of tests (default all: {', '.join(STAT_TESTS)})")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--boot-seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from benchmark.analysis.statistics import calibration_rates, null_means
    from benchmark.store.query import Results

    tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    unknown = [t for t in tests if t not in STAT_TESTS]
    if unknown or not tests:
        raise ValueError(f"--tests: unknown test(s) {unknown}; expected some of {', '.join(STAT_TESTS)}")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha: must lie in (0, 1); got {args.alpha}")
    methods = [m.strip().lower() for m in args.methods.split(",")] if args.methods else None
    stores = [Results.open(root) for root in args.results]
    table = calibration_rates(stores, methods=methods, reference=args.reference.lower() if args.reference else None,
                              tests=tests, alpha=args.alpha, n_boot=args.n_boot, seed=args.boot_seed)
    if table.empty:
        raise ValueError("--results: no column with at least two methods in the given stores")
    means = null_means(stores, methods)
    print(f"design: {args.design or ', '.join(args.results)}")
    print("mean C-index over columns (SE over columns; equal procedures: equal means expected):")
    for method, row in means.iterrows():
        print(f"  {method:<24} {row['mean']:.3f} (SE {row['se']:.3f}, {int(row['columns'])} columns)")
    print("\n| family | test | events per fold | columns | marked | rate (MC SE) | alpha | within alpha + 2 SE | "
          "without withholding | lost resamples |\n|---|---|---|---|---|---|---|---|---|---|")
    for _, r in table.iterrows():
        print(f"| {r['family']} | {r['test']} | {r['events per fold']} | {r['columns']} | {r['marked']} | "
              f"{r['rate']:.3f} ({r['se']:.3f}) | {args.alpha:g} | {'yes' if r['within'] else 'NO'} | "
              f"{r['unwithheld']:.3f} | {r['lost resamples']} |")
    return 0
