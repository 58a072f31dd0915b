"""``python -m benchmark table 1|2``: the paper's tables from the result store."""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmark.analysis.significance import TEST_CHOICES, test_help


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "table",
        help="Table 1 (methods x cohorts) or Table 2 (backbones x cohorts) from the result store",
        description="Render Table 1 (rows = methods, columns = cohorts) or Table 2 (rows = backbones, columns = "
                    "cohorts + Mean, one method). Cells: mean ± population std (or --ci) over folds; bold = highest mean "
                    "(untested), or with --significance the rows not significantly below the best; missing cells "
                    "shown as missing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("number", choices=("1", "2"), help="which table")
    p.add_argument("--results", default="results/synthetic", help="result store root")
    p.add_argument("--format", default="md", choices=("md", "latex", "csv"))
    p.add_argument("--out", default=None, help="write to FILE instead of stdout")
    p.add_argument("--method", default="crossfusion", help="Table 2: the method")
    p.add_argument("--backbone", default=None, help="Table 1: the backbone (default resnet50 when present)")
    p.add_argument("--recipe", default=None,
                   help="recipe name, or one configuration's folder key (needed when the store holds several)")
    p.add_argument("--selection", default=None, help="selection rule (needed when the store holds several)")
    p.add_argument("--seed", type=int, default=None, help="one seed (default: average the seeds per fold)")
    p.add_argument("--tuned", action="store_true",
                   help="show each method's tuned cells (`benchmark tune`, marked ‡, budget in the footer) where it "
                        "has some; without it tuned cells are left out")
    p.add_argument("--metric", default="c_index", choices=("c_index", "c_index_uno", "mean_auc", "ibs"))
    p.add_argument("--significance", action="store_true",
                   help="mark rows by a family of paired tests declared up front, Holm-adjusted per column "
                        "(benchmark.analysis.significance); the footer states test, adjustment, alpha and m")
    family = p.add_mutually_exclusive_group()
    family.add_argument("--reference", default=None,
                        help="family: every row vs this one (m = k - 1); marks ↓ worse / ↑ better")
    family.add_argument("--all-pairs", action="store_true",
                        help="family: every pair of rows (m = k(k-1)/2; the default); marks rows below another")
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise significance level")
    p.add_argument("--test", default="auto", choices=TEST_CHOICES, help=test_help())
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--dataset", default=None,
                   help="only these cohorts (comma list; default: every cohort in the store, the paper's six first)")
    p.add_argument("--published", default=None, choices=("crossfusion",),
                   help="show the paper's C-index (mean ± std) beside each cell it reports, and whether the paper's "
                        "mean lies inside our cell's 95%% CI (datasets/published/)")
    p.add_argument("--ci", action="store_true",
                   help="show each cell's 95%% confidence interval (corrected t over folds) instead of ± std")
    p.set_defaults(func=main)


def significance_hook(args: argparse.Namespace):
    """The declared family of tests of ``--significance`` (None without it)."""
    if not args.significance:
        if args.reference or args.all_pairs:
            raise ValueError("--reference / --all-pairs declare the family of --significance; add --significance")
        return None
    from benchmark.analysis.statistics import SignificanceOptions
    from benchmark.analysis.tables import METRICS

    return SignificanceOptions(family="reference" if args.reference else "all-pairs",
                               reference=args.reference.lower() if args.reference else None, alpha=args.alpha,
                               test=args.test, n_boot=args.n_boot, seed=args.boot_seed, metric=args.metric,
                               higher_is_better=METRICS[args.metric])


def main(args: argparse.Namespace) -> int:
    from benchmark.analysis.tables import add_published, filter_datasets, render, table1, table2
    from benchmark.store.query import Results

    results = Results.open(args.results)  # read once; what was left out while reading goes to the footer
    records = filter_datasets(results.records, args.dataset)
    hook = significance_hook(args)
    ci = 0.95 if args.ci else None
    if args.number == "1":
        table = table1(records, recipe=args.recipe, selection=args.selection, backbone=args.backbone, seed=args.seed,
                       metric=args.metric, significance=hook, ci=ci, tuned=args.tuned)
    else:
        table = table2(records, method=args.method, recipe=args.recipe, selection=args.selection, seed=args.seed,
                       metric=args.metric, significance=hook, ci=ci, tuned=args.tuned)
    if args.published:
        add_published(table, args.published, int(args.number), method=args.method)
    table.notes += list(results.notes)
    text = render(table, args.format)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0
