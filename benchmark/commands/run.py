"""``python -m benchmark run``: train and evaluate a grid of cells into the result store."""
from __future__ import annotations

import argparse
from pathlib import Path


from benchmark.commands._options import add_grid_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="train + evaluate methods x cohorts x backbones x folds into the result store",
        description=(
            "Train and evaluate every cell of the grid. Finished cells are skipped (--overwrite redoes them); a "
            "crashed cell is recorded as an error and the grid goes on. Without --data-root the embedded synthetic "
            "cohorts are used (generated on first use) and the default recipe is 'demo'; with "
            "--data-root it is 'paper' (the paper's shared hyper-parameters). Settings can also "
            "come from an experiment file (--config FILE.toml, every key in docs/SETTINGS.md); options given here "
            "override it."
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


def print_data_notes(console, cohort) -> None:
    """What the data layer decided about a cohort: the feature layout, split IDs missing from the table, and
    (``--missing-features drop``) what each fold of the split files lost."""
    source = cohort.provenance
    name = f"{cohort.name}/{cohort.backbone.name}"
    console.print(f"{name}: {len(cohort.samples)} samples, features: {source.get('layout_detection')}")
    print_source_notes(console, name, source)
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


def print_source_notes(console, name: str, source: dict) -> None:
    """Where the folds came from, the column mapping (when one is used) and its warnings."""
    if source.get("splits_origin"):
        console.print(f"{name}: splits {source['splits_origin']}")
    if source.get("columns"):
        console.print(f"{name}: columns {source.get('column_mapping')}")
    for warning in source.get("column_warnings") or []:
        console.print(f"[yellow]warning: {name}: {warning}[/yellow]")


def print_dry_run(console, configs, store, overwrite: bool, parallelism: float) -> None:
    """Cells to run and to skip per method, with the cost model's estimate."""
    from rich.table import Table

    from benchmark.execution.cost import CostModel, format_seconds
    from benchmark.execution.grid import estimate_cells, plan_grid

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


def _print_header(console, experiment, grid: list, configs: list, results: Path) -> None:
    """The recipe, the data source and the grid's size, before any cell."""
    from benchmark.execution.executors import get_executor_kind

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
                  + f" ({get_executor_kind(experiment.executor).where(experiment)})")


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

    from benchmark.execution.session import check_bins, load_cohorts

    cohorts = load_cohorts(experiment)
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

    from benchmark.execution.executors import get_executor_kind
    from benchmark.execution.grid import GridInterrupted, run_grid, summary_table
    from benchmark.execution.session import build_experiment, check_execution, interrupt_on_sigterm, \
        results_dir, start_executor
    from benchmark.execution.shard import shard_of
    from benchmark.store.records import ResultStore

    console = Console()
    experiment = build_experiment(args)
    check_execution(experiment)  # device, precision, Ray installed and reachable: one line, in seconds
    results = results_dir(experiment)
    store = ResultStore(results)
    if not args.dry_run:  # writable, and temporary files of interrupted writes removed
        store.prepare("--results" if experiment.results else "results folder")
    grid = _checked_grid(console, experiment)
    configs = shard_of(grid, experiment.shard)
    if args.tuned:
        return retrain_tuned(configs, experiment, results, args.storage, args.tuning, args.overwrite, console)
    _print_header(console, experiment, grid, configs, results)
    if args.dry_run:
        print_dry_run(console, configs, store, args.overwrite,
                      get_executor_kind(experiment.executor).cells_at_a_time(experiment))
        return 0
    executor, execution = start_executor(experiment, store)
    interrupt_on_sigterm()
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
    from benchmark.execution.cells import Execution
    from benchmark.tuning.study import find_tuned, retrain

    cells = [find_tuned(c, storage, str(results), protocol, experiment.device, experiment.plugins) for c in configs]
    store, execution = ResultStore(results), Execution(experiment.device, experiment.save_weights, experiment.plugins)
    for cell in cells:
        console.print(f"[bold]{cell.config.cell.label()}[/bold]  tuned {cell.task.protocol}")
        _report(console, cell, retrain(cell, store, execution, overwrite=overwrite))
    return 0
