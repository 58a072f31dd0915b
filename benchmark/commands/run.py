"""``python -m benchmark run``: train and evaluate a grid of cells into the result store."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SYNTHETIC_DEFAULT_RECIPE = "demo"
#: ``benchmark.data.synth.SIGNALS`` names, spelled out so ``--help`` starts without importing numpy / pandas
#: (tested equal).
SIGNAL_CHOICES = ("mixed", "cross", "fine", "coarse", "none", "cross-xor")
REAL_DEFAULT_RECIPE = "paper"
#: Defaults of the settings an experiment file may also give (the command line wins over the file).
DEFAULTS: dict[str, Any] = {
    "methods": "amil", "datasets": "blca", "backbones": "resnet50", "folds": "all", "seeds": "0", "repeats": 1,
    "repeat": None, "recipe": None,
    "selection": "last", "unit": "patient", "bin_rule": "train", "n_bins": 4, "data_root": None, "signal": "mixed",
    "results": None, "jobs": 1, "device": "auto", "save_weights": True, "plugins": [],
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="train + evaluate methods x cohorts x backbones x folds into the result store",
        description=(
            "Train and evaluate every cell of the grid. Finished cells are skipped (--overwrite redoes them); a "
            "crashed cell is recorded as an error and the grid goes on. Without --data-root the embedded synthetic "
            f"cohorts are used (generated on first use) and the default recipe is {SYNTHETIC_DEFAULT_RECIPE!r}; with "
            f"--data-root it is {REAL_DEFAULT_RECIPE!r} (the paper's shared hyper-parameters). Settings can also "
            "come from an experiment file (--config FILE.toml); options given here override it."
        ),
    )
    add_grid_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="redo finished cells")
    p.add_argument("--strict", action="store_true", help="exit with code 1 when any cell failed")
    p.add_argument("--tuned", action="store_true",
                   help="train each cell with the setting `benchmark tune` chose for its outer fold (docs/TUNING.md)")
    p.add_argument("--tuning", default=None, metavar="ID",
                   help="with --tuned: the tuning protocol id, when the storage holds several for a cell")
    p.add_argument("--storage", default=None, help="with --tuned: the tuning storage (journal file or RDB URL; "
                                                   "default <results>/tuning/optuna.journal)")
    p.set_defaults(func=main)


def add_grid_arguments(p: argparse.ArgumentParser) -> None:
    """The grid options shared by ``run`` and ``tune`` (what the cells are and how they are trained)."""
    p.add_argument("--config", default=None, metavar="FILE", help="experiment file (TOML), see docs/CORE.md")
    p.add_argument("--methods", default=None, help="'all' or a comma list of registered methods (default amil)")
    p.add_argument("--dataset", dest="datasets", default=None, help="'all' or a comma list of cohorts (default blca)")
    p.add_argument("--backbone", dest="backbones", default=None,
                   help="'all' (the five base backbones) or a comma list (default resnet50)")
    p.add_argument("--data-root", default=None, help="real data root (default: embedded synthetic cohorts)")
    p.add_argument("--signal", default=None, choices=SIGNAL_CHOICES,
                   help="planted signal of the embedded synthetic cohorts (default mixed; ignored with --data-root); "
                        "results default to results/synthetic-<signal> when it is not 'mixed'")
    p.add_argument("--recipe", default=None,
                   help=f"paper | mahmood | demo (default: {SYNTHETIC_DEFAULT_RECIPE} on synthetic data, "
                        f"{REAL_DEFAULT_RECIPE} with --data-root)")
    p.add_argument("--selection", default=None, choices=("last", "inner", "paper-max"),
                   help="model selection (default last); paper-max looks at the reported fold (optimistic, marked "
                        "in tables)")
    p.add_argument("--folds", default=None, help="e.g. 0-4, 0,2 or all (default all)")
    p.add_argument("--seed", dest="seeds", default=None, help="training seed(s), e.g. 0 or 0-2 (default 0)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeated cross-validation: R split sets (repeat 0 = the cohort's split files, 1..R-1 "
                        "stratified patient-level folds drawn with seed r; default 1)")
    p.add_argument("--repeat", default=None, help="only these repeats, e.g. 2 or 1-3 (instead of --repeats)")
    p.add_argument("--results", default=None, help="result store root (default results/synthetic or results/real)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes, each with one torch thread (default 1)")
    p.add_argument("--plugin", dest="plugins", action="append", default=None, metavar="MODULE",
                   help="import MODULE first (it registers extra methods); repeatable")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override recipe fields, e.g. --set lr=3e-4 epochs=4 (repeatable)")
    p.add_argument("--method-option", action="extend", nargs="+", default=[], metavar="[METHOD.]KEY=VALUE",
                   dest="method_options", help="constructor options, for every selected method or one "
                                               "(amil.dropout=0.1); repeatable")
    p.add_argument("--unit", default=None, choices=("patient", "slide"), help="bag unit (default patient)")
    p.add_argument("--bin-rule", default=None, choices=("train", "cohort"),
                   help="bin edges from the training fold (train, default) or the whole cohort (MCAT's rule)")
    p.add_argument("--n-bins", type=int, default=None, help="discrete-time bins (default 4)")
    p.add_argument("--device", default=None, help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-weights", action="store_true", help="do not save model weights beside the records")


def _method_options(items: list[str], methods: list[str]) -> dict[str, dict]:
    """``--method-option`` items -> ``{method or "*": {name: value}}`` (a name without a method reaches all)."""
    from benchmark.training.recipes import parse_assignments, parse_option_value

    out: dict[str, dict] = {}
    for key, value in parse_assignments(items, "--method-option").items():
        target, dot, name = key.rpartition(".")
        target = target.lower() if dot else "*"
        if dot and target not in methods:
            raise ValueError(f"--method-option {key}: method {target!r} is not among the selected methods {methods}")
        out.setdefault(target, {})[name] = parse_option_value(value)
    return out


def _as_text_list(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the defaults, then the experiment file, then the options given on the command line."""
    from benchmark.training.config import read_experiment_file

    merged = dict(DEFAULTS)
    file = read_experiment_file(args.config) if args.config else {}
    merged.update({k: v for k, v in file.items() if k not in ("set", "method_options")})
    merged.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None})
    if args.no_weights:
        merged["save_weights"] = False
    merged["overrides"] = {**{k: str(v) for k, v in (file.get("set") or {}).items()}}
    merged["file_method_options"] = file.get("method_options") or {}
    return merged


def _repeats(s: dict[str, Any]) -> tuple[int, ...]:
    from benchmark.training.runner import parse_folds

    if s["repeat"] is not None:
        return tuple(parse_folds(_as_text_list(s["repeat"])))
    if int(s["repeats"]) < 1:
        raise ValueError(f"--repeats: needs at least 1 repeat, got {s['repeats']}")
    return tuple(range(int(s["repeats"])))


def build_experiment(args: argparse.Namespace):
    """The :class:`~benchmark.training.config.Experiment` of a ``run`` command line (and its experiment file)."""
    from benchmark.data.backbones import resolve_backbones
    from benchmark.data.cohorts import resolve_cohorts
    from benchmark.training.config import Experiment
    from benchmark.training.recipes import parse_assignments
    from benchmark.training.registry import load_plugins, resolve_methods
    from benchmark.training.runner import parse_folds

    s = settings(args)
    load_plugins(s["plugins"])
    methods = resolve_methods(_as_text_list(s["methods"]))
    options = {m: dict(o) for m, o in s["file_method_options"].items()}
    for target, opts in _method_options(args.method_options, methods).items():
        options.setdefault(target, {}).update(opts)
    folds = None if str(s["folds"]).strip().lower() == "all" else tuple(parse_folds(_as_text_list(s["folds"])))
    recipe = s["recipe"] or (SYNTHETIC_DEFAULT_RECIPE if s["data_root"] is None else REAL_DEFAULT_RECIPE)
    experiment = Experiment(
        methods=tuple(methods), cohorts=tuple(resolve_cohorts(_as_text_list(s["datasets"]))),
        backbones=tuple(resolve_backbones(_as_text_list(s["backbones"]))), folds=folds,
        seeds=tuple(parse_folds(_as_text_list(s["seeds"]))), repeats=_repeats(s), recipe=recipe,
        overrides={**s["overrides"], **parse_assignments(args.overrides)}, method_options=options,
        selection=s["selection"], unit=s["unit"], bin_rule=s["bin_rule"], n_bins=int(s["n_bins"]),
        data_root=s["data_root"], signal=s["signal"], results=s["results"], jobs=int(s["jobs"]),
        device=s["device"], save_weights=bool(s["save_weights"]), plugins=tuple(s["plugins"]),
    )
    experiment.check()
    return experiment


def _results_dir(experiment) -> Path:
    from benchmark.training.runner import default_results_dir

    if experiment.results:
        return Path(experiment.results)
    default = default_results_dir(experiment.data_root)
    if experiment.data_root is None and experiment.signal != "mixed":  # a control cohort: other signal
        default = default.with_name(f"synthetic-{experiment.signal}")
    return default


def _n_folds(experiment) -> int:
    """Load every cohort once (validates names and paths, generates synthetic data before workers start)."""
    from benchmark.training.config import RunConfig
    from benchmark.training.runner import get_cohort_data

    counts = [len(get_cohort_data(RunConfig(experiment.methods[0], c, b, unit=experiment.unit,
                                            data_root=experiment.data_root, signal=experiment.signal,
                                            repeat=r)).folds)
              for c in experiment.cohorts for b in experiment.backbones for r in experiment.repeats]
    return min(counts)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from benchmark.store.records import ResultStore
    from benchmark.training.runner import Execution, run_grid, summary_table
    from benchmark.training.trainer import resolve_device

    console = Console()
    experiment = build_experiment(args)
    resolve_device(experiment.device)  # fail early on an unavailable device
    results = _results_dir(experiment)
    configs = experiment.configs(_n_folds(experiment))
    if args.tuned:
        from benchmark.commands.tune import retrain_tuned

        return retrain_tuned(configs, experiment, results, args.storage, args.tuning, args.overwrite, console)
    first = configs[0]
    demo_note = " [yellow](a DEMO recipe sized for the synthetic data, not a result recipe)[/yellow]" \
        if first.recipe == "demo" else ""
    console.print(f"[bold]recipe {first.label()}[/bold]{demo_note}: " + ", ".join(
        f"{k}={v}" for k, v in first.resolved_recipe().to_dict().items() if k != "name"))
    source = "embedded synthetic cohorts" if experiment.data_root is None else f"data root {experiment.data_root}"
    if experiment.data_root is None and experiment.signal != "mixed":
        source += f" with a '{experiment.signal}' signal"
    console.print(f"selection {experiment.selection}, seed(s) {list(experiment.seeds)}, device {experiment.device}, "
                  f"{source}, results -> {results}")
    n_folds = len(configs) // (len(experiment.methods) * len(experiment.cohorts) * len(experiment.backbones)
                                * len(experiment.seeds) * len(experiment.repeats))
    console.print(f"{len(experiment.methods)} method(s) x {len(experiment.cohorts)} cohort(s) x "
                  f"{len(experiment.backbones)} backbone(s) x {len(experiment.repeats)} repeat(s) x {n_folds} fold(s) x "
                  f"{len(experiment.seeds)} seed(s) = {len(configs)} cells, {experiment.jobs} job(s)")
    execution = Execution(device=experiment.device, save_weights=experiment.save_weights, plugins=experiment.plugins)
    report = run_grid(configs, ResultStore(results), execution, jobs=experiment.jobs, overwrite=args.overwrite,
                      console=console)
    console.print(summary_table(ResultStore(results), configs))
    n_err = sum(1 for r in report.ran if r["status"] != "ok")
    console.print(f"{len(report.ran)} cell(s) run in {report.seconds:.1f} s, {len(report.skipped)} skipped, "
                  f"{n_err} error(s); records under {results / 'cells'}")
    # Errors are recorded (and shown as missing in tables); the exit code stays 0 so `make table1` still
    # writes its table. --strict turns them into exit code 1.
    return 1 if (n_err and args.strict) else 0
