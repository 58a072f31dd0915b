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
#: ``benchmark.data.labels.RULES``, ``"auto"`` + ``benchmark.data.features.LAYOUTS`` and
#: ``benchmark.data.loader.MISSING_FEATURES``, spelled out for the same reason (tested equal).
BIN_RULE_CHOICES = ("train", "cohort", "cohort-slides")
LAYOUT_CHOICES = ("auto", "default", "trident", "clam", "crossfusion")
MISSING_FEATURES_CHOICES = ("error", "drop")
#: Defaults of the settings an experiment file may also give (the command line wins over the file).
DEFAULTS: dict[str, Any] = {
    "methods": "amil", "datasets": "blca", "backbones": "resnet50", "folds": "all", "seeds": "0", "repeats": 1,
    "repeat": None, "recipe": None,
    "selection": "last", "unit": "patient", "bin_rule": "train", "n_bins": 4, "data_root": None, "signal": "mixed",
    "results": None, "jobs": 1, "device": "auto", "save_weights": "none", "plugins": [], "precision": "fp32",
    "executor": "local", "address": None, "cpus_per_cell": None, "gpus_per_cell": 0.0, "shard": None,
    "clinical": None, "splits": None, "features": None, "layout": "auto", "missing_features": "error",
    "registry": [], "seeding": "per-fold",
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
    _data_source_options(p)
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
    p.add_argument("--seeding", default=None, choices=("per-fold", "shared"),
                   help="per-fold (default): each fold's training seed derived from (seed, repeat, fold); shared: "
                        "--seed for every fold, as the official codes (parity; filed apart, label seeding=shared)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeated cross-validation: R split sets (repeat 0 = the cohort's split files, 1..R-1 "
                        "stratified patient-level folds drawn with seed r; default 1)")
    p.add_argument("--repeat", default=None, help="only these repeats, e.g. 2 or 1-3 (instead of --repeats)")
    p.add_argument("--results", default=None, help="result store root (default results/synthetic or results/real)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes, each with one torch thread (default 1)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override recipe fields, e.g. --set lr=3e-4 epochs=4 (repeatable)")
    p.add_argument("--method-option", action="extend", nargs="+", default=[], metavar="[METHOD.]KEY=VALUE",
                   dest="method_options", help="constructor options, for every selected method or one "
                                               "(amil.dropout=0.1); repeatable")
    p.add_argument("--unit", default=None, choices=("patient", "slide"), help="bag unit (default patient)")
    p.add_argument("--bin-rule", default=None, choices=BIN_RULE_CHOICES,
                   help="bin edges from the training fold (train, default), the whole cohort (MCAT's rule) or its "
                        "slides (CrossFusion's)")
    p.add_argument("--n-bins", type=int, default=None, help="discrete-time bins (default 4)")
    _add_execution_options(p)


def _data_source_options(p: argparse.ArgumentParser) -> None:
    """Where real data are, as the extraction tools and the Mahmood-lab repositories write them (shared with
    ``audit``)."""
    p.add_argument("--clinical", default=None, metavar="FILE",
                   help="clinical table, .csv or MCAT's .csv.zip as shipped (default <cohort dir>/clinical.csv)")
    p.add_argument("--splits", default=None, metavar="DIR", help="folder of MCAT splits_{k}.csv files")
    p.add_argument("--features", nargs="+", action="extend", default=None, metavar="[MAGx=]DIR",
                   help="feature folder(s): one (CLAM FEAT_DIR, TRIDENT job folder, ...) or one per magnification, "
                        "e.g. --features 20x=DIR 10x=DIR 5x=DIR (default: the cohort folder of --data-root)")
    p.add_argument("--layout", default=None, choices=LAYOUT_CHOICES,
                   help="feature layout (default auto: every slide of the table is checked)")
    p.add_argument("--missing-features", default=None, choices=MISSING_FEATURES_CHOICES,
                   help="slides of the table without a feature file: stop (error, default) or leave them out and "
                        "report what each fold loses (drop)")


def _add_execution_options(p) -> None:
    """Where and how the cells run; none of it changes a result except --precision."""
    p.add_argument("--device", default=None, help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="autocast precision of training (default fp32; fp16 with a gradient scaler, CUDA only)")
    p.add_argument("--strict", action="store_true", help="exit with code 1 when any cell failed")
    p.add_argument("--save-weights", default=None, choices=("none", "last"),
                   help="none (default: records only; `plot heatmap` retrains a cell on request) or last (the "
                        "selected model's weights beside each record)")
    p.add_argument("--no-weights", action="store_true", help="same as --save-weights none")
    p.add_argument("--executor", default=None, choices=("local", "ray"),
                   help="local (default: this machine, --jobs processes) or ray (a Ray cluster, see --address)")
    p.add_argument("--address", default=None,
                   help="Ray cluster: auto, host:port or ray://host:port (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--cpus-per-cell", type=float, default=None,
                   help="CPUs (torch threads) per cell (default 1 per worker or Ray task; every core for --jobs 1)")
    p.add_argument("--gpus-per-cell", type=float, default=None,
                   help="GPUs per cell with --executor ray, e.g. 0.5 packs two cells on a GPU (default 0)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N of the grid (0-based; e.g. a Slurm array task, docs/CORE.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells to run and to skip with an estimated time per method; train nothing")


def _method_options(items: list[str], methods: list[str]) -> dict[str, dict]:
    """``--method-option`` items -> ``{method or "*": {name: value}}`` (a name without a method reaches all)."""
    from benchmark.settings.recipes import parse_assignments, parse_option_value

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
    from benchmark.settings.config import read_experiment_file

    merged = dict(DEFAULTS)
    file = read_experiment_file(args.config) if args.config else {}
    merged.update({k: v for k, v in file.items() if k not in ("set", "method_options")})
    merged.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None})
    if isinstance(merged["save_weights"], bool):  # an experiment file may say true / false
        merged["save_weights"] = "last" if merged["save_weights"] else "none"
    if args.no_weights:
        merged["save_weights"] = "none"
    merged["plugins"] = list(file.get("plugins") or []) + list(getattr(args, "plugin", []) or [])
    registry = file.get("registry") or []
    merged["registry"] = [registry] if isinstance(registry, str) else list(registry)
    merged["overrides"] = {**{k: str(v) for k, v in (file.get("set") or {}).items()}}
    merged["file_method_options"] = file.get("method_options") or {}
    return merged


def _repeats(s: dict[str, Any]) -> tuple[int, ...]:
    from benchmark.execution.runner import parse_folds

    if s["repeat"] is not None:
        return tuple(parse_folds(_as_text_list(s["repeat"])))
    if int(s["repeats"]) < 1:
        raise ValueError(f"--repeats: needs at least 1 repeat, got {s['repeats']}")
    return tuple(range(int(s["repeats"])))


def build_experiment(args: argparse.Namespace):
    """The :class:`~benchmark.settings.config.Experiment` of a ``run`` command line (and its experiment file)."""
    from benchmark.data.backbones import resolve_backbones
    from benchmark.data.cohorts import add_registry_file, resolve_cohorts, user_registry_files
    from benchmark.settings.config import ANY, Experiment, RunConfig, feature_items
    from benchmark.settings.recipes import parse_assignments
    from benchmark.api.registry import check_method_options, load_plugins, resolve_methods
    from benchmark.execution.runner import parse_folds
    from benchmark.execution.shard import parse_shard

    s = settings(args)
    for path in s["registry"]:  # the experiment file's (the command line's were read by the CLI)
        add_registry_file(path)
    load_plugins(s["plugins"])
    methods = resolve_methods(_as_text_list(s["methods"]))
    options = {m: dict(o) for m, o in s["file_method_options"].items()}
    for target, opts in _method_options(args.method_options, methods).items():
        options.setdefault(target, {}).update(opts)
    for method in methods:  # an option no constructor takes fails here, not in every cell
        check_method_options(method, {**options.get("*", {}), **options.get(method, {})})
    folds = None if str(s["folds"]).strip().lower() == "all" else tuple(parse_folds(_as_text_list(s["folds"])))
    real = s["data_root"] is not None or s["clinical"] is not None
    recipe = s["recipe"] or (REAL_DEFAULT_RECIPE if real else SYNTHETIC_DEFAULT_RECIPE)
    shared = RunConfig(
        ANY, ANY, recipe=recipe, overrides={**s["overrides"], **parse_assignments(args.overrides)},
        selection=s["selection"], unit=s["unit"], bin_rule=s["bin_rule"], n_bins=int(s["n_bins"]),
        data_root=s["data_root"], signal=s["signal"], precision=s["precision"], clinical=s["clinical"],
        splits=s["splits"], features=feature_items(s["features"]), layout=s["layout"],
        missing_features=s["missing_features"], registry=tuple(str(p) for p in user_registry_files()),
        seeding=s["seeding"],
    )
    experiment = Experiment(
        methods=tuple(methods), cohorts=tuple(resolve_cohorts(_as_text_list(s["datasets"]))),
        backbones=tuple(resolve_backbones(_as_text_list(s["backbones"]))), folds=folds,
        seeds=tuple(parse_folds(_as_text_list(s["seeds"]))), repeats=_repeats(s), shared=shared,
        method_options=options, results=s["results"], jobs=int(s["jobs"]), device=s["device"],
        save_weights=str(s["save_weights"]), plugins=tuple(s["plugins"]), executor=s["executor"],
        address=s["address"], cpus_per_cell=None if s["cpus_per_cell"] is None else float(s["cpus_per_cell"]),
        gpus_per_cell=float(s["gpus_per_cell"]), shard=parse_shard(s["shard"]),
    )
    experiment.check()
    return experiment


def _results_dir(experiment) -> Path:
    from benchmark.execution.runner import default_results_dir

    if experiment.results:
        return Path(experiment.results)
    shared = experiment.shared
    default = default_results_dir(shared.data_root, shared.clinical)
    if shared.data_root is None and shared.clinical is None and shared.signal != "mixed":  # a control
        default = default.with_name(f"synthetic-{shared.signal}")
    return default


def _cohorts(experiment) -> list:
    """Load every cohort once (validates names and paths, generates synthetic data before workers start)."""
    from benchmark.execution.runner import get_cohort_data

    return [get_cohort_data(experiment.cell_config(experiment.methods[0], c, b, repeat=r))
            for c in experiment.cohorts for b in experiment.backbones for r in experiment.repeats]


def check_bins(experiment, cohorts) -> None:
    """Fit every fold's time bins once before any cell: degenerate labels (repeated bin edges, no event to fit
    on) are one error naming the cohort and the fold, not a failed cell per method."""
    for cohort in cohorts:
        folds = experiment.folds if experiment.folds is not None else range(len(cohort.folds))
        for k in folds:
            cohort.bins(k, rule=experiment.shared.bin_rule, n_bins=experiment.shared.n_bins)


def print_data_notes(console, cohort) -> None:
    """What the data layer decided about a cohort: the feature layout, split IDs missing from the table, and
    (``--missing-features drop``) what each fold of the split files lost."""
    source = cohort.provenance
    name = f"{cohort.name}/{cohort.backbone.name}"
    console.print(f"{name}: {len(cohort.samples)} samples, features: {source.get('layout_detection')}")
    missing = source.get("missing_split_ids") or []
    if missing:
        console.print(f"[yellow]{name}: {len(missing)} split ID(s) are not in the table and are left out, e.g. "
                      f"{', '.join(missing[:3])}[/yellow]")
    dropped = source.get("missing_features")
    if not dropped:
        return
    console.print(f"[yellow]{name}: {dropped['slides_dropped']} slide(s) without a feature file left out "
                  f"(--missing-features drop), {dropped['samples_dropped']} sample(s) lost[/yellow]")
    for row in dropped["folds"]:
        console.print(f"  fold {row['fold']}: dropped {row['train_dropped']} train / {row['val_dropped']} val; "
                      f"now {row['train']} train / {row['val']} val")


def check_execution(experiment) -> None:
    """Device, precision and resources that cannot work here: one line naming the option, before any cell."""
    import torch

    from benchmark.fitting.precision import check_precision, resolve_device

    if experiment.executor == "ray":  # the workers' devices are checked against the cluster's resources
        from benchmark.execution.executors import check_reachable, import_ray

        import_ray()
        check_reachable(experiment.address)
        check_precision(experiment.shared.precision, "cuda" if experiment.gpus_per_cell > 0 else None)
        return
    device = resolve_device(experiment.device)
    check_precision(experiment.shared.precision, device)
    if experiment.gpus_per_cell > 0 and not torch.cuda.is_available():
        raise ValueError(f"--gpus-per-cell {experiment.gpus_per_cell:g}: this machine has no CUDA GPU")


def start_executor(experiment, store, work=None, shared_roots: tuple[str, ...] = ()):
    """The grid's executor (or, with ``work``, the tuner's), connected and validated (Ray: reachable, resources
    present, store and ``shared_roots`` writable from every node)."""
    from benchmark.execution.runner import Execution, execute_cell, make_executor

    execution = Execution(device=experiment.device, save_weights=experiment.save_weights == "last",
                          plugins=experiment.plugins)
    executor = make_executor(experiment.executor, experiment.jobs, execution, address=experiment.address,
                             cpus_per_cell=experiment.cpus_per_cell, gpus_per_cell=experiment.gpus_per_cell,
                             store_root=str(store.root.resolve()), work=work or execute_cell,
                             shared_roots=shared_roots)
    if experiment.executor == "local" and experiment.jobs <= 1 and experiment.cpus_per_cell:
        import torch

        torch.set_num_threads(max(1, int(experiment.cpus_per_cell)))  # cells run in this process
    executor.start()
    return executor, execution


def print_dry_run(console, configs, store, overwrite: bool, parallelism: float) -> None:
    """Cells to run and to skip per method, with the cost model's estimate."""
    from rich.table import Table

    from benchmark.execution.cost import CostModel, format_seconds
    from benchmark.execution.runner import estimate_cells, plan_grid

    plan = plan_grid(configs, store, overwrite)
    model = CostModel.from_records(store.load_all()[0])
    estimates = estimate_cells(plan.todo, store, model=model)
    table = Table(title="dry run: nothing is trained")
    for col in ("method", "to run", "to skip", "est. s / cell", "est. total", "cost source"):
        table.add_column(col, justify="left" if col in ("method", "cost source") else "right")
    for method in dict.fromkeys(c.method for c in configs):
        todo = [c for c in plan.todo if c.method == method]
        seconds = [estimates[c.cell.label()] for c in todo]
        skipped = sum(1 for c in plan.skipped if c.method == method)
        table.add_row(method, str(len(todo)), str(skipped), f"{sum(seconds) / len(seconds):.1f}" if seconds else "-",
                      format_seconds(sum(seconds)) if seconds else "-",
                      model.seconds_per_draw(method, *((todo[0].cohort, todo[0].backbone) if todo else ()))[1])
    console.print(table)
    for config in plan.todo:
        console.print(f"  run   {config.cell.label()}  ~{format_seconds(estimates[config.cell.label()])}")
    for config in plan.skipped:
        console.print(f"  skip  {config.cell.label()}  (finished)")
    total = sum(estimates.values())
    console.print(f"{len(plan.todo)} cell(s) to run, {len(plan.skipped)} to skip; estimated "
                  f"{format_seconds(total / max(1.0, parallelism))} with {parallelism:g} cell(s) at a time")


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler stopping the job) stops the grid the way Ctrl-C does."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _print_header(console, experiment, grid: list, configs: list, results: Path) -> None:
    """The recipe, the data source and the grid's size, before any cell."""
    first = grid[0]
    demo_note = " [yellow](a DEMO recipe sized for the synthetic data, not a result recipe)[/yellow]" \
        if first.recipe == "demo" else ""
    console.print(f"[bold]recipe {first.label()}[/bold]{demo_note}: " + ", ".join(
        f"{k}={v}" for k, v in first.resolved_recipe().to_dict().items() if k != "name"))
    shared = experiment.shared
    source = "embedded synthetic cohorts" if shared.data_root is None else f"data root {shared.data_root}"
    if shared.clinical is not None:
        source = f"clinical table {shared.clinical}"
    if shared.data_root is None and shared.signal != "mixed":
        source += f" with a '{shared.signal}' signal"
    console.print(f"selection {shared.selection}, seed(s) {list(experiment.seeds)}, device {experiment.device}, "
                  f"precision {shared.precision}, {source}, results -> {results}")
    n_folds = len(grid) // (len(experiment.methods) * len(experiment.cohorts) * len(experiment.backbones)
                            * len(experiment.seeds) * len(experiment.repeats))
    shard = "" if experiment.shard is None else f", shard {experiment.shard[0]}/{experiment.shard[1]}: {len(configs)}"
    console.print(f"{len(experiment.methods)} method(s) x {len(experiment.cohorts)} cohort(s) x "
                  f"{len(experiment.backbones)} backbone(s) x {len(experiment.repeats)} repeat(s) x {n_folds} fold(s) x "
                  f"{len(experiment.seeds)} seed(s) = {len(grid)} cells{shard}, executor {experiment.executor}"
                  + (f", {experiment.jobs} job(s)" if experiment.executor == "local" else ""))


def _print_outcome(console, report, results: Path) -> int:
    """The last lines of a finished grid; returns the number of failed cells."""
    n_err = sum(1 for r in report.ran if r["status"] == "error")
    busy = [r["cell"] for r in report.ran if r["status"] == "busy"]
    if busy:  # another run or shard holds them: not done here, not failed either
        console.print(f"[yellow]{len(busy)} cell(s) were being computed by another run (first: {busy[0]}); rerun the "
                      "same command after it to collect them[/yellow]")
    console.print(f"{len(report.ran)} cell(s) run in {report.seconds:.1f} s, {len(report.skipped)} skipped, "
                  f"{n_err} error(s); records under {results / 'cells'}")
    return n_err


def _checked_grid(console, experiment) -> list:
    """Every cell, after loading each cohort once: the data layer's notes printed, every fold's time bins and the
    recipe checked before any cell runs."""
    from benchmark.settings.recipes import get_recipe

    cohorts = _cohorts(experiment)
    for cohort in cohorts[::len(experiment.repeats)]:  # once per cohort x backbone (repeats share the data)
        print_data_notes(console, cohort)
    grid = experiment.configs(min(len(c.folds) for c in cohorts))
    check_bins(experiment, cohorts)
    recipe_notes: list[str] = []
    get_recipe(grid[0].recipe, dict(experiment.shared.overrides), notes=recipe_notes)
    for note in recipe_notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    return grid


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from benchmark.store.records import ResultStore
    from benchmark.execution.runner import GridInterrupted, run_grid, summary_table
    from benchmark.execution.shard import shard_of

    console = Console()
    experiment = build_experiment(args)
    check_execution(experiment)  # device, precision, Ray installed and reachable: one line, in seconds
    results = _results_dir(experiment)
    store = ResultStore(results)
    if not args.dry_run:  # writable, and temporary files of interrupted writes removed
        store.prepare("--results" if experiment.results else "results folder")
    grid = _checked_grid(console, experiment)
    configs = shard_of(grid, experiment.shard)
    if args.tuned:
        from benchmark.commands.tune import retrain_tuned

        return retrain_tuned(configs, experiment, results, args.storage, args.tuning, args.overwrite, console)
    _print_header(console, experiment, grid, configs, results)
    if args.dry_run:
        print_dry_run(console, configs, store, args.overwrite, experiment.jobs if experiment.executor == "local" else 1)
        return 0
    executor, execution = start_executor(experiment, store)
    _interrupt_on_sigterm()
    try:
        report = run_grid(configs, store, execution, jobs=experiment.jobs, overwrite=args.overwrite,
                          console=console, executor=executor)
    except GridInterrupted as stop:
        console.print(f"[yellow]interrupted: {stop}[/yellow]")
        return 130
    console.print(summary_table(ResultStore(results), configs))
    n_err = _print_outcome(console, report, results)
    # Errors are recorded (and shown as missing in tables); the exit code stays 0 so `make table1` still
    # writes its table. --strict turns them into exit code 1.
    return 1 if (n_err and args.strict) else 0
