"""``python -m benchmark run``: train and evaluate a grid of cells into the result store."""
from __future__ import annotations

import argparse
from pathlib import Path

SYNTHETIC_DEFAULT_RECIPE = "demo"
#: ``benchmark.data.synth.SIGNALS`` names, spelled out so the CLI starts without importing numpy / pandas (tested equal).
SIGNAL_CHOICES = ("mixed", "cross", "fine", "coarse", "none", "cross-xor")
REAL_DEFAULT_RECIPE = "paper"
#: ``benchmark.data.labels.RULES``, spelled out for the same reason (tested equal).
BIN_RULE_CHOICES = ("train", "cohort", "cohort-slides")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="train + evaluate methods x cohorts x backbones x folds into the result store",
        description=(
            "Train and evaluate every cell of the grid. Finished cells are skipped (--overwrite redoes them); a "
            "crashed cell is recorded as an error and the grid goes on. Without --data-root the embedded synthetic "
            f"cohorts are used (generated on first use) and the default recipe is {SYNTHETIC_DEFAULT_RECIPE!r}; with "
            f"--data-root the default recipe is {REAL_DEFAULT_RECIPE!r} (the paper's shared hyper-parameters)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--methods", default="amil", help="'all' or a comma list of registered methods")
    p.add_argument("--dataset", default="blca", help="'all' or a comma list of cohorts")
    p.add_argument("--backbone", default="resnet50", help="'all' (the five base backbones) or a comma list")
    p.add_argument("--data-root", default=None, help="real data root (default: embedded synthetic cohorts)")
    p.add_argument("--signal", default="mixed", choices=SIGNAL_CHOICES,
                   help="planted signal of the embedded synthetic cohorts (ignored with --data-root); "
                        "results default to results/synthetic-<signal> when it is not 'mixed'")
    p.add_argument("--recipe", default=None,
                   help=f"paper | mahmood | demo (default: {SYNTHETIC_DEFAULT_RECIPE} on synthetic data, "
                        f"{REAL_DEFAULT_RECIPE} with --data-root)")
    p.add_argument("--selection", default="last", choices=("last", "inner", "paper-max"),
                   help="model selection; paper-max looks at the reported fold (optimistic, marked in tables)")
    p.add_argument("--folds", default="0-4", help="e.g. 0-4, 0,2 or all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=None, help="result store root (default results/synthetic or results/real)")
    p.add_argument("--overwrite", action="store_true", help="redo finished cells")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (each uses one torch thread)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override recipe fields, e.g. --set lr=3e-4 epochs=4; repeatable (values accumulate)")
    p.add_argument("--method-option", nargs="+", action="extend", default=[], metavar="[METHOD.]KEY=VALUE",
                   dest="method_options",
                   help="constructor options, for every selected method or one (amil.dropout=0.1); repeatable")
    p.add_argument("--unit", default="patient", choices=("patient", "slide"))
    p.add_argument("--bin-rule", default="train", choices=BIN_RULE_CHOICES,
                   help="bin edges from the training fold (train), the cohort (MCAT) or its slides (CrossFusion)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--strict", action="store_true", help="exit with code 1 when any cell failed")
    p.add_argument("--no-weights", action="store_true", help="do not save model weights beside the records")
    p.set_defaults(func=main)


def _method_options(items: list[str], methods: list[str]) -> dict[str, dict]:
    from benchmark.training.recipes import parse_assignments, parse_option_value

    out: dict[str, dict] = {m: {} for m in methods}
    for key, value in parse_assignments(items, "--method-option").items():
        target, dot, name = key.rpartition(".")
        if dot and target.lower() not in out:
            raise ValueError(f"--method-option {key}: method {target!r} is not among the selected methods {methods}")
        for m in ([target.lower()] if dot else methods):
            out[m][name] = parse_option_value(value)
    return out


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from benchmark.data.backbones import resolve_backbones
    from benchmark.data.cohorts import resolve_cohorts
    from benchmark.training.recipes import get_recipe, parse_assignments
    from benchmark.training.registry import load_plugins, resolve_methods
    from benchmark.training.runner import (
        RunSpec, default_results_dir, expand_grid, get_cohort_data, parse_folds, recipe_label, run_grid, summary_table,
    )
    from benchmark.store.records import Cell, ResultStore
    from benchmark.training.trainer import resolve_device

    console = Console()
    load_plugins(args.plugin)
    methods = resolve_methods(args.methods)
    cohorts = resolve_cohorts(args.dataset)
    backbones = resolve_backbones(args.backbone)
    if args.jobs < 1:
        raise ValueError("--jobs must be >= 1")
    try:  # fail early on an unknown or unavailable device
        resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {args.device}: {str(exc).splitlines()[0]}") from None
    recipe_name = args.recipe or (SYNTHETIC_DEFAULT_RECIPE if args.data_root is None else REAL_DEFAULT_RECIPE)
    default_results = default_results_dir(args.data_root)
    if args.data_root is None and args.signal != "mixed":  # a control cohort: same generator, other signal
        from benchmark.data.synth import ensure_synthetic

        args.data_root = str(ensure_synthetic("demo", seed=0, signal=args.signal, cohorts=cohorts, backbones=backbones))
        default_results = default_results.with_name(f"synthetic-{args.signal}")
    overrides = parse_assignments(args.overrides)
    recipe_notes: list[str] = []
    recipe = get_recipe(recipe_name, overrides, notes=recipe_notes)
    method_options = _method_options(args.method_options, methods)
    label = recipe_label(recipe.name, {
        "set": overrides, "method_options": sorted(args.method_options),
        "unit": args.unit if args.unit != "patient" else None,
        "bin_rule": args.bin_rule if args.bin_rule != "train" else None,
    })
    spec = RunSpec(
        recipe=recipe, recipe_label=label, selection=args.selection, seed=args.seed, data_root=args.data_root,
        unit=args.unit, bin_rule=args.bin_rule, device=args.device, method_options=method_options,
        save_weights=not args.no_weights, plugins=tuple(args.plugin),
    )
    results = Path(args.results) if args.results else default_results
    store = ResultStore(results)
    store.prepare("--results" if args.results else "results folder")  # writable, stale temporary files removed

    # Load every cohort once here: validates names and paths, generates synthetic data before workers start.
    n_folds = None
    for cohort in cohorts:
        for backbone in backbones:
            data = get_cohort_data(Cell(methods[0], cohort, backbone, 0), spec)
            n_folds = len(data.folds) if n_folds is None else min(n_folds, len(data.folds))
    folds = parse_folds(args.folds, n_folds)
    if n_folds is not None and max(folds) >= n_folds:
        raise ValueError(f"--folds {args.folds}: the cohorts have only {n_folds} folds (0-{n_folds - 1})")

    source = "embedded synthetic cohorts" if args.data_root is None else f"data root {args.data_root}"
    if args.signal != "mixed" and recipe_name == SYNTHETIC_DEFAULT_RECIPE:
        source = f"embedded synthetic cohorts with a '{args.signal}' signal ({args.data_root})"
    demo_note = " [yellow](a DEMO recipe sized for the synthetic data, not a result recipe)[/yellow]" \
        if recipe.name == "demo" else ""
    console.print(f"[bold]recipe {label}[/bold]{demo_note}: " + ", ".join(
        f"{k}={v}" for k, v in recipe.to_dict().items() if k != "name"))
    for note in recipe_notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"selection {args.selection}, seed {args.seed}, device {args.device}, {source}, results -> {results}")
    cells = expand_grid(methods, cohorts, backbones, folds, spec)
    console.print(f"{len(methods)} method(s) x {len(cohorts)} cohort(s) x {len(backbones)} backbone(s) x "
                  f"{len(folds)} fold(s) = {len(cells)} cells, {args.jobs} job(s)")
    report = run_grid(cells, spec, store, jobs=args.jobs, overwrite=args.overwrite, console=console)
    console.print(summary_table(store, cells))
    n_err = sum(1 for r in report.ran if r["status"] != "ok")
    console.print(f"{len(report.ran)} cell(s) run in {report.seconds:.1f} s, {len(report.skipped)} skipped, "
                  f"{n_err} error(s); records under {results / 'cells'}")
    # Errors are recorded (and shown as missing in tables); the exit code stays 0 so `make table1` still
    # writes its table. --strict turns them into exit code 1.
    return 1 if (n_err and args.strict) else 0
