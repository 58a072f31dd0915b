"""``python -m benchmark compare``: paired comparisons of methods on identical folds, with Holm-adjusted p-values."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmark.analysis.significance import TEST_CHOICES, test_help


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="paired comparison of methods: per-fold differences, raw and Holm-adjusted p, CIs, MDE, CD diagram",
        description=(
            "Compare methods evaluated on the same folds. Per cohort: the per-fold differences of the table's "
            "quantity (mean over repeat x fold of the per-fold C-index), a paired test of every pair of a family "
            "declared up front (all pairs, or every method vs --reference) with raw and Holm-adjusted p-values, "
            "each method's 95%% CI and the minimum detectable difference of the design. Over cohorts: mean ranks, "
            "Friedman / Iman-Davenport test and the Nemenyi critical-difference diagram (backbones averaged)."
        ),
    )
    p.add_argument("--results", required=True, help="result-store root")
    p.add_argument("--methods", required=True, help="comma list of at least two methods, e.g. crossfusion,amil")
    p.add_argument("--dataset", default="all", help="cohort, comma list, or 'all' (default)")
    p.add_argument("--backbone", default=None, help="backbone (required when the store holds several)")
    p.add_argument("--recipe", default=None)
    p.add_argument("--selection", default=None)
    p.add_argument("--seed", type=int, default=None, help="one training seed (default: seeds averaged per fold)")
    family = p.add_mutually_exclusive_group()
    family.add_argument("--reference", default=None, help="family: every method vs this one (m = k - 1)")
    family.add_argument("--all-pairs", action="store_true", help="family: every pair (m = k(k-1)/2; the default)")
    p.add_argument("--test", choices=TEST_CHOICES, default="auto", help=test_help())
    p.add_argument("--metric", choices=("c_index", "c_index_uno"), default="c_index",
                   help="c_index_uno: corrected t only (the bootstrap recomputes Harrell's C)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--confidence", type=float, default=0.95, help="level of the per-method intervals")
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise significance level (Holm, Nemenyi CD)")
    p.add_argument("--cd-out", default=None, help="critical-difference diagram PNG (default <results>/figures/cd_<methods>.png)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.set_defaults(func=run)


def _cohorts(results, methods: list[str], dataset: str, filters: dict) -> list[str]:
    if dataset.lower() != "all":
        return [c.strip().lower() for c in dataset.split(",") if c.strip()]
    per_method = [{r["cohort"] for r in results.select(method=m, **filters)} for m in methods]
    cohorts = sorted(set.intersection(*per_method))
    if not cohorts:
        raise FileNotFoundError(f"{results.root}: no cohort has results for all of {', '.join(methods)}")
    return cohorts


def _rows(results, methods: list[str], cohort: str, filters: dict) -> dict[str, list[dict]]:
    """Each method's ok records on ``cohort`` (every repeat and seed), from one backbone / recipe / selection."""
    rows = {m: results.select(method=m, cohort=cohort, **filters) for m in methods}
    for m, recs in rows.items():
        if not recs:
            raise FileNotFoundError(f"{results.root}: no successful records for {m} on {cohort}")
        protocols = {(r["backbone"], r["recipe"], r["selection"]) for r in recs}
        if len(protocols) > 1:
            options = "; ".join(f"--backbone {b} --recipe {rc} --selection {s}" for b, rc, s in sorted(protocols))
            raise ValueError(f"{results.root}: several cells match {m}/{cohort}; choose one with {options}")
    return rows


def _compare_cohort(cohort: str, rows: dict, options, confidence: float) -> dict:
    """Print and return one cohort's family of tests, intervals and MDE."""
    from benchmark.analysis import statistics as stats_layer
    from benchmark.analysis.significance import bounded_interval

    result = options(rows)
    data = stats_layer.column_data(rows, options.metric, predictions=False)
    print(f"\n== {cohort} == {data.n_folds} folds x {data.n_repeats} repeat(s), {len(data.fold_values[data.methods[0]])}"
          f" validation folds")
    print("   " + result.footer("*"))
    pairs = []
    for pair in result.pairs:
        # against a reference, read as "method vs reference" (d > 0: the method is better)
        a, b = pair[::-1] if pair[0] == result.reference else pair
        sign = -1.0 if pair[0] == result.reference else 1.0
        diffs = np.subtract(data.fold_values[a], data.fold_values[b])
        raw, adjusted = result.raw_p[pair], result.adjusted_p[pair]
        star = " *" if adjusted <= options.alpha else ""
        print(f"{a} vs {b}: per-fold d [{' '.join(f'{d:+.3f}' for d in diffs)}] mean {diffs.mean():+.3f}; "
              f"p = {raw:.3g}, Holm p = {adjusted:.3g}{star}")
        pairs.append({"a": a, "b": b, "cohort": cohort, "fold_differences": diffs.tolist(),
                      "mean_fold_difference": float(diffs.mean()), "tested_difference": sign * result.differences[pair],
                      "p_value": float(raw), "holm_p_value": float(adjusted),
                      "significant": bool(adjusted <= options.alpha)})
    intervals = {m: bounded_interval(v, data.n_folds, confidence) for m, v in data.fold_values.items()}
    print(f"mean {options.metric} [{confidence:.0%} CI, corrected t; ^ = clipped to [0, 1]]: " +
          ", ".join(f"{m} {mean:.3f} [{lo:.3f}, {hi:.3f}]{'^' if clipped else ''}"
                    for m, (mean, lo, hi, clipped) in intervals.items()))
    mde = result.mde
    print(mde.describe() if mde is not None else "minimum detectable difference: no spread between rows observed")
    return {"cohort": cohort, "test": result.test, "family": result.family, "reference": result.reference,
            "n_comparisons": result.n_comparisons, "footer": result.footer("*"), "pairs": pairs,
            "withheld": result.withheld, "lost_resamples": result.lost,
            "intervals": {m: list(v[:3]) for m, v in intervals.items()},
            "clipped": {m: v[3] for m, v in intervals.items()},
            "mde": None if mde is None else mde.value, "mde_range": None if mde is None else [mde.low, mde.high]}


def _ranks(results, methods, cohorts, filters, args) -> dict:
    from benchmark.analysis import statistics as stats_layer

    scores = stats_layer.score_table(results, methods, cohorts=cohorts, **filters)
    if not len(scores):
        return {}
    summary = stats_layer.rank_summary(scores, alpha=args.alpha)
    print(f"\nMean rank over {len(scores)} cohort(s) (1 = best; mean fold C-index, backbones averaged):")
    for name, r in summary.ranks.items():
        print(f"  {name:<16} {r:.2f}   mean C {scores[name].mean():.3f}")
    print(summary.describe())
    cd_path = Path(args.cd_out) if args.cd_out else Path(args.results) / "figures" / f"cd_{'-'.join(methods)}.png"
    stats_layer.critical_difference_diagram(summary, cd_path, title="Mean rank by C-index")
    print(f"critical-difference diagram: {cd_path}")
    f = summary.friedman
    return {"mean_ranks": summary.ranks.to_dict(), "scores": scores.to_dict(), "critical_difference":
            summary.critical_difference, "significant": summary.significant, "cd_diagram": str(cd_path),
            "friedman_statistic": None if f is None else f.chi2, "friedman_p_value": None if f is None else f.chi2_p_value,
            "iman_davenport_f": None if f is None else f.f, "iman_davenport_p_value": None if f is None else f.f_p_value}


def run(args: argparse.Namespace) -> int:
    from benchmark.analysis.statistics import SignificanceOptions
    from benchmark.store.query import Results

    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    if len(methods) < 2:
        raise ValueError("--methods needs at least two methods")
    reference = args.reference.lower() if args.reference else None
    if reference is not None and reference not in methods:
        raise ValueError(f"--reference {reference!r} is not among --methods {methods}")
    options = SignificanceOptions(family="reference" if reference else "all-pairs", reference=reference,
                                  alpha=args.alpha, test=args.test, n_boot=args.n_boot, seed=args.boot_seed,
                                  metric=args.metric)
    filters = dict(backbone=args.backbone, recipe=args.recipe, selection=args.selection, seed=args.seed)
    results = Results.open(args.results)  # read once
    for note in results.notes:
        print(f"note: {note}")
    for m in methods:
        if not results.select(method=m, **filters):
            raise FileNotFoundError(f"{args.results}: no successful records of method {m!r}")
    cohorts = _cohorts(results, methods, args.dataset, filters)
    per_cohort = [_compare_cohort(c, _rows(results, methods, c, filters), options, args.confidence) for c in cohorts]
    out: dict = {"methods": methods, "cohorts": cohorts, "alpha": args.alpha, "cohort_tests": per_cohort,
                 "pairs": [p for c in per_cohort for p in c["pairs"]]}
    out.update(_ranks(results, methods, cohorts, filters, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=lambda o: None if o is np.nan else str(o)))
    return 0
