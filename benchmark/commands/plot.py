"""``python -m benchmark plot km|heatmap|tuning``: the paper's Figure 2 (Kaplan-Meier), Figure 3 (attention heatmaps) and
the tuning studies (optimisation history, parameter importances)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cell_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True, help="result-store root")
    p.add_argument("--method", required=True, help="method whose cells to use")
    p.add_argument("--backbone", default=None, help="backbone (when the store holds several)")
    p.add_argument("--recipe", default=None, help="recipe label (when the store holds several)")
    p.add_argument("--selection", default=None, help="selection rule (when the store holds several)")
    p.add_argument("--seed", type=int, default=None, help="training seed (when the store holds several)")
    p.add_argument("--out", default=None, help="output folder (default <results>/figures)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")


def _register_heatmap(sub) -> None:
    hm = sub.add_parser(
        "heatmap",
        help="attention maps of a trained fold model on one slide (PNG + PDF)",
        description=(
            "Rebuild a fold's trained model from the store, run it on the bag holding the slide, and draw each "
            "attention map on the patch grid, or with --slide-file over the slide's thumbnail beside the slide "
            "itself. On synthetic cohorts the tissue types and planted signal are drawn beside them, with the "
            "overlap (AUC, top-10%% precision) reported."
        ),
    )
    _cell_options(hm)
    hm.add_argument("--dataset", required=True, help="cohort")
    hm.add_argument("--slide", required=True, help="slide id (or sample id)")
    hm.add_argument("--fold", type=int, default=None,
                    help="fold whose model to use (default: the fold that validated this slide)")
    hm.add_argument("--retrain", action="store_true", help="re-train the fold if its weights were not saved")
    where = hm.add_mutually_exclusive_group()
    where.add_argument("--slide-file", default=None, metavar="PATH",
                       help="the slide's image (.svs, .tif, .ndpi, ...): draw the maps over it (needs the slides "
                            "extra: pip install -e '.[slides]')")
    where.add_argument("--slide-dir", default=None, metavar="DIR",
                       help="folder of slide images named <slide id><--slide-ext>")
    hm.add_argument("--slide-ext", default=".svs", help="file extension with --slide-dir (default .svs)")
    hm.add_argument("--top-k", type=int, default=0, metavar="K",
                    help="save the K highest- and lowest-attention patches of every map (PNG + index.csv; needs "
                         "a slide image)")
    hm.add_argument("--geojson", default=None, metavar="FILE",
                    help="write every patch with its scores as GeoJSON for QuPath (File > Import objects from file)")
    hm.set_defaults(func=run_heatmap)


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

    _register_heatmap(sub)

    tune = sub.add_parser(
        "tuning",
        help="optimisation history and parameter importances of the tuning studies (PNG + PDF)",
        description="One figure pair per outer fold tuned by `benchmark tune`: the inner C-index of every trial "
                    "with the best so far, and the fANOVA importance of each hyper-parameter (Optuna's matplotlib "
                    "visualisation).",
    )
    tune.add_argument("--results", required=True, help="result-store root (the default storage is under it)")
    tune.add_argument("--storage", default=None, help="journal file or RDB URL (default <results>/tuning/optuna.journal)")
    tune.add_argument("--method", default=None, help="only this method's studies")
    tune.add_argument("--dataset", default=None, help="only this cohort's studies")
    tune.add_argument("--out", default=None, help="output folder (default <results>/figures/tuning)")
    tune.set_defaults(func=run_tuning)


def _write_json(path: str | None, data) -> None:
    if path:
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


def _retrain_hint(record, results) -> str:
    """The exact command that re-trains a record's cell with weights."""
    from benchmark.settings.config import RunConfig

    try:
        return f"`{RunConfig.from_record(record).to_cli(results)} --save-weights last --overwrite`"
    except (ValueError, KeyError):
        return "`python -m benchmark run ... --overwrite` with the cell's settings"


def _fold_model(store, record, retrain: bool):
    """The fold's trained model: its saved weights, or (``retrain``) the cell trained again through the runner."""
    from benchmark.analysis.plots import stale_data_reason
    from benchmark.settings.config import RunConfig
    from benchmark.execution.cells import CellTask, Execution, execute_cell, load_trained_model

    stale = stale_data_reason(record)
    if stale and not retrain:
        raise ValueError(f"{record.get('_path', 'record')}: {stale}. Re-train this cell: {_retrain_hint(record, store.root)} "
                         "(or add --retrain to this command)")
    if not stale:
        try:
            return load_trained_model(store, record), record
        except FileNotFoundError as exc:
            if not retrain:
                raise FileNotFoundError(f"{exc}. Re-train this cell with weights: {_retrain_hint(record, store.root)} "
                                        "(or add --retrain to this command)") from None
    config = RunConfig.from_record(record)
    # under the cell's lock, so a grid running on the same store never trains this cell at the same time
    summary = execute_cell(CellTask(config, str(store.root), Execution(device="auto", save_weights=True),
                                    skip_if_finished=False))
    if summary["status"] != "ok":
        raise RuntimeError(f"re-training {summary['cell']} failed: {summary['error']}")
    record = store.read(config.cell)
    return load_trained_model(store, record), record


def _slide_file(slide: str, slide_file, slide_dir, slide_ext: str) -> Path | None:
    """The slide image the user named (``--slide-file``, or ``<--slide-dir>/<slide><--slide-ext>``)."""
    if slide_dir is None:
        return Path(slide_file) if slide_file is not None else None
    if not Path(slide_dir).is_dir():
        raise FileNotFoundError(f"--slide-dir {slide_dir}: not a directory")
    from benchmark.naming import path_under

    ext = slide_ext if slide_ext.startswith(".") else f".{slide_ext}"
    try:
        return path_under(slide_dir, f"{slide}{ext}")
    except ValueError:
        raise ValueError(f"--slide-dir {slide_dir}: slide id {slide!r} would name a file outside it") from None


def heatmap(results, method: str, dataset: str, slide: str, *, fold=None, out=None, retrain=False,
            cohort_data=None, slide_file=None, slide_dir=None, slide_ext=".svs", top_k=0, geojson=None, **filters):
    """Attention heatmaps of one fold's model on one slide (the ``plot heatmap`` command without printing)."""
    from benchmark.analysis.plots import attention_heatmaps, fold_record_for, sample_of_slide
    from benchmark.store.query import Results
    from benchmark.store.records import ResultStore
    from benchmark.settings.config import RunConfig
    from benchmark.execution.cells import get_cohort_data

    if top_k < 0:
        raise ValueError(f"--top-k {top_k}: must be >= 0")
    records = Results.open(results).cell(method, dataset, **filters)
    cohort = cohort_data if cohort_data is not None else get_cohort_data(RunConfig.from_record(records[0]))
    sample_id = sample_of_slide(cohort.samples, slide)
    slide_id = slide if slide in tuple(cohort.samples.loc[sample_id, "slide_ids"]) \
        else cohort.samples.loc[sample_id, "slide_ids"][0]
    image = _slide_file(slide_id, slide_file, slide_dir, slide_ext)
    record = fold_record_for(records, sample_id, fold)
    model, record = _fold_model(ResultStore(results), record, retrain)
    return attention_heatmaps(model, record, cohort, slide, Path(out) if out is not None else Path(results) / "figures",
                              slide_file=image, top_k=top_k, geojson=geojson)


def run_heatmap(args: argparse.Namespace) -> int:
    res = heatmap(
        args.results, args.method, args.dataset, args.slide, fold=args.fold, out=args.out, backbone=args.backbone,
        recipe=args.recipe, selection=args.selection, seed=args.seed, retrain=args.retrain,
        slide_file=args.slide_file, slide_dir=args.slide_dir, slide_ext=args.slide_ext, top_k=args.top_k,
        geojson=args.geojson,
    )
    print(f"{res.method} fold {res.fold} on {res.cohort} slide {res.slide_id} (sample {res.sample_id})")
    for m, g in sorted(res.geometry.items()):
        print(f"  {m:>2}x patches: {g.side:g} level-0 px ({g.size} px at {m}x) from {g.source}")
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
    top = res.overlay.top_patches if res.overlay is not None else []
    _write_json(args.json, {"method": res.method, "cohort": res.cohort, "fold": res.fold, "slide": res.slide_id,
                            "sample": res.sample_id, "overlap": res.overlap, "files": [str(f) for f in res.files],
                            "patch_geometry": {f"{m}x": vars(g) for m, g in res.geometry.items()},
                            "top_patches": top})
    return 0


def run_tuning(args: argparse.Namespace) -> int:
    import optuna

    from benchmark.analysis.plots import plot_tuning
    from benchmark.tuning.study import open_storage

    storage = open_storage(args.storage, args.results)
    names = [n for n in optuna.get_all_study_names(storage)
             if (args.method is None or n.split("|")[0] == args.method.lower())
             and (args.dataset is None or n.split("|")[1] == args.dataset.lower())]
    if not names:
        raise FileNotFoundError(f"no tuning study matches in {args.storage or Path(args.results) / 'tuning'}; "
                                "run `python -m benchmark tune` first")
    out = Path(args.out) if args.out else Path(args.results) / "figures" / "tuning"
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        stem = out / name.replace("|", "_").replace("/", "-")
        for path in plot_tuning(study, stem):
            print(f"wrote {path}")
    return 0
