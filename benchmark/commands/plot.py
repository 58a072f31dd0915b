"""``python -m benchmark plot km|heatmap``: the paper's Figure 2 (Kaplan-Meier) and Figure 3 (attention heatmaps)."""
from __future__ import annotations

import argparse
import json


def _cell_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True, help="result-store root")
    p.add_argument("--method", required=True, help="method whose cells to use")
    p.add_argument("--backbone", default=None, help="backbone (when the store holds several)")
    p.add_argument("--recipe", default=None, help="recipe label (when the store holds several)")
    p.add_argument("--selection", default=None, help="selection rule (when the store holds several)")
    p.add_argument("--seed", type=int, default=None, help="training seed (when the store holds several)")
    p.add_argument("--out", default=None, help="output folder (default <results>/figures)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="Kaplan-Meier curves with log-rank test, attention heatmaps")
    sub = p.add_subparsers(dest="plot", required=True, metavar="FIGURE")

    km = sub.add_parser(
        "km",
        help="Kaplan-Meier curves of high vs low predicted risk, log-rank p-value (PNG + PDF)",
        description=(
            "Split each fold's validation patients at a risk threshold, pool the folds, and draw both Kaplan-Meier "
            "curves (95%% bands) with an at-risk table and the log-rank p-value. train-median (default): the "
            "median risk of the fold's training samples; pooled-median: the pooled out-of-fold median, as the "
            "official CrossFusion code."
        ),
    )
    _cell_options(km)
    km.add_argument("--dataset", default="all", help="cohort, comma list, or 'all' (default)")
    km.add_argument("--split", choices=("train-median", "pooled-median"), default="train-median")
    km.add_argument("--layout", choices=("panels", "figures"), default=None,
                    help="one figure with a panel per cohort (default for several) or one figure per cohort")
    km.set_defaults(func=run_km)

    hm = sub.add_parser(
        "heatmap",
        help="attention maps of a trained fold model on one slide (PNG + PDF)",
        description=(
            "Rebuild a fold's trained model from the store, run it on the bag holding the slide, and draw each "
            "attention map on the patch grid. On synthetic cohorts the tissue types and planted signal are drawn "
            "beside them, with the overlap (AUC, top-10%% precision) reported."
        ),
    )
    _cell_options(hm)
    hm.add_argument("--dataset", required=True, help="cohort")
    hm.add_argument("--slide", required=True, help="slide id (or sample id)")
    hm.add_argument("--fold", type=int, default=None,
                    help="fold whose model to use (default: the fold that validated this slide)")
    hm.add_argument("--retrain", action="store_true", help="re-train the fold if its weights were not saved")
    hm.set_defaults(func=run_heatmap)


def _write_json(path: str | None, data) -> None:
    if path:
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))


def run_km(args: argparse.Namespace) -> int:
    from benchmark.analysis.plots import SPLIT_DESCRIPTIONS, format_p, plot_km
    from benchmark.store.query import Results

    results = plot_km(
        Results.open(args.results), args.method, args.dataset, split=args.split, out=args.out, layout=args.layout,
        backbone=args.backbone, recipe=args.recipe, selection=args.selection, seed=args.seed,
    )
    print(f"{args.method}: {SPLIT_DESCRIPTIONS[args.split]}")
    for km in results:
        print(f"  {km.cohort:<8} high {km.n_high:>4} ({km.events_high} events)  low {km.n_low:>4} "
              f"({km.events_low} events)  log-rank p = {format_p(km.p_value)}")
    for f in sorted({str(f) for km in results for f in km.files}):
        print(f"wrote {f}")
    _write_json(args.json, [km.as_dict() for km in results])
    return 0


def run_heatmap(args: argparse.Namespace) -> int:
    from benchmark.analysis.plots import attention_heatmaps

    res = attention_heatmaps(
        args.results, args.method, args.dataset, args.slide, fold=args.fold, out=args.out, backbone=args.backbone,
        recipe=args.recipe, selection=args.selection, seed=args.seed, retrain=args.retrain,
    )
    print(f"{res.method} fold {res.fold} on {res.cohort} slide {res.slide_id} (sample {res.sample_id})")
    for pm in res.maps:
        line = f"  {pm.name:<20} {pm.magnification:>2}x  {len(pm.values)} patches"
        if pm.name in res.overlap:
            o = res.overlap[pm.name]
            # the class sizes say when an AUC rests on one or two patches (e.g. an almost all-tumour 5x bag)
            line += (f"  AUC vs tumour patches {o['auc']:.3f} ({o['n_signal']} tumour vs "
                     f"{o['n_patches'] - o['n_signal']} other); top-10% attention on tumour {o['top_precision']:.1%}"
                     f" (chance {o['prevalence']:.1%})")
        print(line)
    for f in res.files:
        print(f"wrote {f}")
    _write_json(args.json, {"method": res.method, "cohort": res.cohort, "fold": res.fold, "slide": res.slide_id,
                            "sample": res.sample_id, "overlap": res.overlap, "files": [str(f) for f in res.files]})
    return 0
