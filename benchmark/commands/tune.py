"""``python -m benchmark tune``: nested, equal-budget hyper-parameter tuning with Optuna (docs/TUNING.md)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

#: ``[tune]`` keys of an experiment file, with their types (``space`` holds ``[tune.space.<method>]`` tables).
TUNE_KEYS: dict[str, type | tuple[type, ...]] = {
    "trials": int, "budget": str, "timeout_per_method": (int, float), "sampler_seed": int, "pruner": str,
    "inner_folds": int, "storage": str, "space": dict,
}
TUNE_DEFAULTS: dict[str, Any] = {"trials": 30, "budget": "trials", "timeout_per_method": None, "sampler_seed": 0,
                                 "pruner": "median", "inner_folds": 3, "storage": None}


def register(subparsers) -> None:
    from benchmark.commands.run import add_grid_arguments

    p = subparsers.add_parser(
        "tune",
        help="tune every method's hyper-parameters the same way (nested, equal budgets), then train the choice",
        description=(
            "For each outer fold, an Optuna study (seeded TPE, a pruner fed every epoch) scores settings by an "
            "inner cross-validation of that fold's training patients only; the best setting is then trained on "
            "the whole outer training fold and evaluated once on its validation fold. Every method gets the same "
            "budget and sampler seed. Studies are kept in a journal file (or an RDB URL) and a killed run "
            "resumes. --jobs N runs N workers per study, sharing it through that storage, on the executor cells use "
            "(--executor local: worker processes; ray: Ray tasks). Tables show the tuned cells with `table 1 --tuned`."
        ),
    )
    add_grid_arguments(p)
    p.add_argument("--trials", type=int, default=None, help="finished trials per outer fold (default 30)")
    p.add_argument("--budget", choices=("trials", "time"), default=None,
                   help="equal number of trials (default) or equal wall-clock time per method")
    p.add_argument("--timeout-per-method", type=float, default=None, metavar="S",
                   help="seconds of trials per method with --budget time (split over its outer folds)")
    p.add_argument("--sampler-seed", type=int, default=None, help="TPE sampler seed, the same for every method (0)")
    p.add_argument("--pruner", choices=("median", "hyperband", "none"), default=None, help="default median")
    p.add_argument("--inner-folds", type=int, default=None,
                   help="inner CV folds of each outer training fold (default 3; 1 = one inner split)")
    p.add_argument("--storage", default=None,
                   help="journal file or RDB URL (sqlite:///tune.db); default <results>/tuning/optuna.journal")
    p.add_argument("--overwrite", action="store_true", help="retrain tuned cells already in the store")
    p.set_defaults(func=main)


def tune_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tuning options, space overrides): the defaults, then the experiment file's ``[tune]``, then the flags."""
    from benchmark.naming import did_you_mean
    from benchmark.settings.config import read_experiment_file

    file = dict((read_experiment_file(args.config) if args.config else {}).get("tune") or {})
    for key, value in file.items():
        if key not in TUNE_KEYS:
            raise ValueError(f"--config {args.config}: [tune] {did_you_mean(key, list(TUNE_KEYS), 'setting')}")
        if not isinstance(value, TUNE_KEYS[key]) or isinstance(value, bool):
            raise ValueError(f"--config {args.config}: [tune] {key} has the wrong type ({type(value).__name__})")
    merged = {**TUNE_DEFAULTS, **{k: v for k, v in file.items() if k != "space"}}
    merged.update({k: getattr(args, k) for k in TUNE_DEFAULTS if getattr(args, k, None) is not None})
    return merged, dict(file.get("space") or {})


def build_tasks(args: argparse.Namespace, experiment, results: Path, console) -> list:
    """Every outer fold to tune (the shard's, with ``--shard``); every space checked before any trial runs."""
    from benchmark.commands.run import _cohorts
    from benchmark.tuning.search_spaces import check_override_scopes, method_space, tunable
    from benchmark.execution.shard import shard_of
    from benchmark.tuning.study import StudyTask, TuningSettings

    options, space_overrides = tune_settings(args)
    if experiment.shared.selection == "paper-max":
        raise ValueError("tune: --selection paper-max picks epochs on the reported fold; tune with last or inner")
    settings = TuningSettings(**{k: options[k] for k in ("budget", "trials", "timeout_per_method", "sampler_seed",
                                                         "pruner", "inner_folds")})
    methods = [m for m in experiment.methods if tunable(m)]
    for m in sorted(set(experiment.methods) - set(methods)):
        console.print(f"[dim]{m}: nothing to tune (no trainable parameter); run it with `benchmark run`[/dim]")
    check_override_scopes(space_overrides, list(experiment.methods))
    spaces = {m: method_space(m, space_overrides) for m in methods}
    n_folds = min(len(c.folds) for c in _cohorts(experiment))
    storage = options["storage"]
    if experiment.executor == "ray":  # Ray workers do not run in this folder: every path absolute
        results = results.resolve()
        storage = storage if storage is None or "://" in storage else str(Path(storage).resolve())
    configs = shard_of(experiment.configs(n_folds), experiment.shard)
    return [StudyTask(c, spaces[c.method], settings, storage, str(results), n_folds, experiment.device,
                      experiment.plugins)
            for c in configs if c.method in spaces]


def _journal_folder(task) -> tuple[str, ...]:
    """The folder of the study journal, which every Ray node must write (none for an RDB URL)."""
    from benchmark.tuning.study import DEFAULT_STORAGE_NAME

    if task.storage is not None and "://" in task.storage:
        return ()
    path = Path(task.storage) if task.storage else Path(task.results) / "tuning" / DEFAULT_STORAGE_NAME
    return (str(path.resolve().parent),)


def _print_plan(console, tasks: list, experiment) -> None:
    first = tasks[0]
    where = (f"Ray tasks ({experiment.address or 'RAY_ADDRESS or a local Ray'})" if experiment.executor == "ray"
             else "this process" if experiment.jobs <= 1 else "local worker processes")
    console.print(f"[bold]tuning[/bold] {len({t.config.method for t in tasks})} method(s), {len(tasks)} outer "
                  f"fold(s): {first.settings.describe()}; {experiment.jobs} worker(s) per study, as {where}")
    for method in dict.fromkeys(t.config.method for t in tasks):
        space = next(t.space for t in tasks if t.config.method == method)
        console.print(f"  {method}: " + ", ".join(f"{p.name} {p.to_dict()}" for p in space.params))


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    import optuna

    from benchmark.commands.run import _interrupt_on_sigterm, _results_dir, build_experiment, check_execution, \
        start_executor
    from benchmark.store.records import ResultStore
    from benchmark.tuning.study import StudyScheduler, TuningInterrupted, run_study_job

    console = Console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    experiment = build_experiment(args)
    if args.dry_run:
        raise ValueError("tune: --dry-run is not available (a trial costs about one cell: see `run --dry-run`)")
    check_execution(experiment)  # device, precision, Ray installed and reachable: one line, in seconds
    results = _results_dir(experiment)
    store = ResultStore(results)
    store.prepare("--results" if experiment.results else "results folder")
    tasks = build_tasks(args, experiment, results, console)
    if not tasks:
        raise ValueError("tune: none of the selected methods has anything to tune")
    _print_plan(console, tasks, experiment)
    executor, execution = start_executor(experiment, store, run_study_job, _journal_folder(tasks[0]))
    _interrupt_on_sigterm()
    started = time.perf_counter()
    scheduler = StudyScheduler(executor, experiment.jobs, execution, args.overwrite,
                               log=lambda line: console.print(line, markup=False, highlight=False))
    try:
        summaries = scheduler.run(tasks)
    except TuningInterrupted as stop:
        console.print(f"[yellow]interrupted: {stop}[/yellow]")
        return 130
    n_err = sum(1 for s in summaries if s["status"] == "error")
    console.print(f"{len(tasks)} outer fold(s) tuned in {time.perf_counter() - started:.1f} s, {n_err} error(s); "
                  f"records under {results / 'cells'}; `python -m benchmark table 1 --tuned --results {results}`")
    return 1 if (n_err and args.strict) else 0


def _report(console, cell, summary: dict) -> None:
    from benchmark.tuning.study import setting_text

    setting = setting_text(cell.config.tuned)
    if summary["status"] == "ok":
        console.print(f"  [green]ok[/green] outer C-index {summary['c_index']:.3f} with {setting}")
    elif summary["status"] == "skipped":
        console.print(f"  [dim]already in the store with {setting}[/dim]")
    else:
        console.print(f"  [red]error[/red] {summary['error']}")


def retrain_tuned(configs: list, experiment, results: Path, storage: str | None, protocol: str | None,
                  overwrite: bool, console) -> int:
    """``run --tuned``: train every cell with the setting its finished study chose (serially)."""
    from benchmark.store.records import ResultStore
    from benchmark.execution.runner import Execution
    from benchmark.tuning.study import find_tuned, retrain

    cells = [find_tuned(c, storage, str(results), protocol, experiment.device, experiment.plugins) for c in configs]
    store, execution = ResultStore(results), Execution(experiment.device, experiment.save_weights, experiment.plugins)
    for cell in cells:
        console.print(f"[bold]{cell.config.cell.label()}[/bold]  tuned {cell.task.protocol}")
        _report(console, cell, retrain(cell, store, execution, overwrite=overwrite))
    return 0
