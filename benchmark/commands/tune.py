"""``python -m benchmark tune``: nested, equal-budget hyper-parameter tuning with Optuna (docs/TUNING.md)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers) -> None:
    from benchmark.commands._options import add_grid_arguments
    from benchmark.settings.options import TUNE_SETTINGS, add_arguments

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
    add_arguments(p, TUNE_SETTINGS, ("tune",))
    p.add_argument("--overwrite", action="store_true", help="retrain tuned cells already in the store")
    p.set_defaults(func=main)


def build_tasks(args: argparse.Namespace, experiment, results: Path, console) -> list:
    """Every outer fold to tune (the shard's, with ``--shard``); every space checked before any trial runs."""
    from benchmark.execution.executors import get_executor_kind
    from benchmark.execution.session import load_cohorts
    from benchmark.settings.options import run_settings
    from benchmark.tuning.search_spaces import check_override_scopes, method_space, tunable
    from benchmark.execution.shard import shard_of
    from benchmark.tuning.study import StudyTask, TuningSettings

    options = run_settings(args)["tune"]
    space_overrides = dict(options["space"])
    if experiment.shared.selection == "paper-max":
        raise ValueError("tune: --selection paper-max picks epochs on the reported fold; tune with last or inner")
    settings = TuningSettings(**{k: options[k] for k in ("budget", "trials", "timeout_per_method", "sampler_seed",
                                                         "pruner", "inner_folds")})
    methods = [m for m in experiment.methods if tunable(m)]
    for m in sorted(set(experiment.methods) - set(methods)):
        console.print(f"[dim]{m}: nothing to tune (no trainable parameter); run it with `benchmark run`[/dim]")
    check_override_scopes(space_overrides, list(experiment.methods))
    spaces = {m: method_space(m, space_overrides) for m in methods}
    n_folds = min(len(c.folds) for c in load_cohorts(experiment))
    storage = options["storage"]
    if get_executor_kind(experiment.executor).absolute_paths:  # workers run in another folder
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
    from benchmark.execution.executors import get_executor_kind

    where = get_executor_kind(experiment.executor).where(experiment)
    console.print(f"[bold]tuning[/bold] {len({t.config.method for t in tasks})} method(s), {len(tasks)} outer "
                  f"fold(s): {first.settings.describe()}; {experiment.jobs} worker(s) per study, as {where}")
    for method in dict.fromkeys(t.config.method for t in tasks):
        space = next(t.space for t in tasks if t.config.method == method)
        console.print(f"  {method}: " + ", ".join(f"{p.name} {p.to_dict()}" for p in space.params))


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    import optuna

    from benchmark.execution.session import build_experiment, check_execution, interrupt_on_sigterm, \
        results_dir, start_executor
    from benchmark.store.records import ResultStore
    from benchmark.tuning.study import StudyScheduler, TuningInterrupted, run_study_job

    console = Console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    experiment = build_experiment(args)
    if args.dry_run:
        raise ValueError("tune: --dry-run is not available (a trial costs about one cell: see `run --dry-run`)")
    check_execution(experiment)  # device, precision, Ray installed and reachable: one line, in seconds
    results = results_dir(experiment)
    store = ResultStore(results)
    store.prepare("--results" if experiment.results else "results folder")
    tasks = build_tasks(args, experiment, results, console)
    if not tasks:
        raise ValueError("tune: none of the selected methods has anything to tune")
    _print_plan(console, tasks, experiment)
    executor, execution = start_executor(experiment, store, run_study_job, _journal_folder(tasks[0]))
    interrupt_on_sigterm()
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
