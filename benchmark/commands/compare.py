"""``python -m benchmark compare``: paired comparisons of methods on identical folds."""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="paired comparison of methods: per-fold differences, paired bootstrap, mean ranks + CD diagram",
        description=(
            "Compare methods evaluated on the same folds. Per cohort: the per-fold C-index differences and a "
            "paired bootstrap over patients of the pooled out-of-fold risks (CI and two-sided p-value of the "
            "difference). Over cohorts: mean ranks, Friedman test and Nemenyi critical-difference diagram."
        ),
    )
    p.add_argument("--results", required=True, help="result-store root")
    p.add_argument("--methods", required=True, help="comma list of at least two methods, e.g. crossfusion,amil")
    p.add_argument("--dataset", default="all", help="cohort, comma list, or 'all' (default)")
    p.add_argument("--backbone", default=None, help="backbone (required when the store holds several)")
    p.add_argument("--recipe", default=None)
    p.add_argument("--selection", default=None)
    p.add_argument("--seed", type=int, default=None, help="training seed of the cells")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (p-values, Nemenyi CD)")
    p.add_argument("--cd-out", default=None, help="critical-difference diagram PNG (default <results>/figures/cd_<methods>.png)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from benchmark.analysis import statistics as compare
    from benchmark.store.query import Results

    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    if len(methods) < 2:
        raise ValueError("--methods needs at least two methods")
    filters = dict(backbone=args.backbone, recipe=args.recipe, selection=args.selection, seed=args.seed)
    results = Results.open(args.results)  # read once
    for note in results.notes:
        print(f"note: {note}")
    for m in methods:
        if not results.select(method=m, **filters):
            raise FileNotFoundError(f"{args.results}: no successful records of method {m!r}")
    if args.dataset.lower() == "all":
        per_method = [{r["cohort"] for r in results.select(method=m, **filters)} for m in methods]
        cohorts = sorted(set.intersection(*per_method))
        if not cohorts:
            raise FileNotFoundError(f"{args.results}: no cohort has results for all of {', '.join(methods)}")
    else:
        cohorts = [c.strip().lower() for c in args.dataset.split(",") if c.strip()]

    pairs = []
    for cohort in cohorts:
        cells = {m: results.cell(m, cohort, **filters) for m in methods}
        print(f"\n== {cohort} ==")
        for a, b in itertools.combinations(methods, 2):
            cmp = compare.compare_cells(cells[a], cells[b], n_boot=args.n_boot, seed=args.boot_seed,
                                        confidence=args.confidence)
            bs = cmp.bootstrap
            star = " *" if bs.p_value < args.alpha else ""
            folds = " ".join(f"{d:+.3f}" for d in cmp.fold_differences)
            print(f"{a} vs {b}: per-fold dC [{folds}] mean {cmp.mean_difference:+.3f}")
            print(f"    pooled C {bs.c_index_a:.3f} vs {bs.c_index_b:.3f}: dC {bs.difference:+.3f} "
                  f"[{bs.ci_low:+.3f}, {bs.ci_high:+.3f}] ({bs.confidence:.0%} CI), p = {bs.p_value:.3g}{star} "
                  f"({bs.n_patients} patients, {bs.n_boot} resamples, seed {bs.seed})")
            pairs.append(cmp.as_dict())

    scores = compare.score_table(results, methods, cohorts=cohorts, **filters)
    out: dict = {"methods": methods, "cohorts": cohorts, "alpha": args.alpha, "pairs": pairs}
    if len(scores):
        summary = compare.rank_summary(scores, alpha=args.alpha)
        print(f"\nMean rank over {len(scores)} dataset(s) (1 = best; mean fold C-index per dataset):")
        for name, r in summary.ranks.items():
            print(f"  {name:<16} {r:.2f}   mean C {scores[name].mean():.3f}")
        fried = ("n/a (needs >= 3 methods and >= 2 datasets)" if summary.friedman_p_value is None
                 else f"chi2 = {summary.friedman_statistic:.2f}, p = {summary.friedman_p_value:.3g}")
        print(f"Friedman test: {fried}; Nemenyi CD (alpha={args.alpha:g}) = {summary.critical_difference:.2f}")
        cd_path = Path(args.cd_out) if args.cd_out else Path(args.results) / "figures" / f"cd_{'-'.join(methods)}.png"
        compare.critical_difference_diagram(summary, cd_path, title="Mean rank by C-index")
        print(f"critical-difference diagram: {cd_path}")
        out.update(
            mean_ranks=summary.ranks.to_dict(), scores=scores.to_dict(), friedman_statistic=summary.friedman_statistic,
            friedman_p_value=summary.friedman_p_value, critical_difference=summary.critical_difference,
            cd_diagram=str(cd_path),
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=lambda o: None if o is np.nan else str(o)))
    return 0
