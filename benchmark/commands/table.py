"""``python -m benchmark table 1|2``: the paper's tables from the result store."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "table",
        help="Table 1 (methods x cohorts) or Table 2 (backbones x cohorts) from the result store",
        description="Render Table 1 (rows = methods, columns = cohorts) or Table 2 (rows = backbones, columns = "
                    "cohorts + Mean, one method). Cells: mean ± population std over folds; best bold, second "
                    "underlined; missing cells shown as missing.",
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
                   help="mark rows significantly worse than each column's best (paired bootstrap, benchmark.analysis.statistics)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from benchmark.analysis.tables import render, table1, table2
    from benchmark.store.query import Results

    results = Results.open(args.results)  # read once; what was left out while reading goes to the footer
    records = list(results.records)
    hook = None
    if args.significance:
        from benchmark.analysis.statistics import significant_rows

        hook = significant_rows
    if args.number == "1":
        table = table1(records, recipe=args.recipe, selection=args.selection, backbone=args.backbone, seed=args.seed,
                       metric=args.metric, significance=hook, tuned=args.tuned)
    else:
        table = table2(records, method=args.method, recipe=args.recipe, selection=args.selection, seed=args.seed,
                       metric=args.metric, significance=hook, tuned=args.tuned)
    table.notes += list(results.notes)
    text = render(table, args.format)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0
