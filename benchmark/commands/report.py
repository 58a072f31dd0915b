"""``python -m benchmark report``: one Markdown page with tables, comparisons, figures, report cards, provenance."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write one Markdown report: tables, comparisons, Kaplan-Meier figures, report cards, provenance",
    )
    p.add_argument("--results", required=True, help="result-store root")
    p.add_argument("--out", default=None, help="Markdown file (default <results>/report.md); figures beside it")
    p.add_argument("--km-methods", default=None,
                   help="comma list of methods with Kaplan-Meier figures (default: the best of each backbone)")
    p.add_argument("--split", choices=("train-median", "pooled-median"), default="train-median",
                   help="Kaplan-Meier threshold rule")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the significance markers")
    p.add_argument("--boot-seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise alpha of the markers (Holm per column)")
    p.add_argument("--reference", default=None,
                   help="mark every method against this one (default: all pairs of methods)")
    p.add_argument("--dataset", default=None,
                   help="only these cohorts (comma list; default: every cohort in the store)")
    p.add_argument("--cards-from-records", action="store_true",
                   help="read cohort report cards off the stored predictions instead of auditing the clinical table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from benchmark.analysis.report import build_report
    from benchmark.analysis.tables import filter_datasets
    from benchmark.store.query import Results

    km = [m.strip().lower() for m in args.km_methods.split(",")] if args.km_methods else None
    results = Results.open(args.results)
    if args.dataset:  # the report of some cohorts only
        results = Results(results.root, tuple(filter_datasets(results.records, args.dataset)), results.notes)
    path = build_report(results, args.out, km_methods=km, split=args.split, n_boot=args.n_boot,
                        alpha=args.alpha, boot_seed=args.boot_seed, audit_cards=not args.cards_from_records,
                        reference=args.reference.lower() if args.reference else None)
    print(f"wrote {path}")
    return 0
