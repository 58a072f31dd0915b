"""A grid of cells behind ``python -m benchmark run``: which cells run (finished ones are skipped, stale ones
refiled or redone), the cells driven on an executor (``benchmark/execution/executors.py``) with progress bars and
the cost model's ETA, and the summary. A crashed cell becomes an ``error`` record and the grid goes on; SIGINT
stops the grid cleanly (:class:`GridInterrupted`).
"""
from __future__ import annotations

import dataclasses
import signal
import time
import uuid
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmark.store.records import Cell, ResultStore
from benchmark.settings.config import RunConfig, hashed_config
from benchmark.execution.cost import CostModel, Eta, cell_draws, format_seconds
from benchmark.execution.executors import Executor
from benchmark.evaluation.metrics import aggregate
from benchmark.execution.cells import (
    CellTask, CohortLoader, Execution, finished_record, readable_record, expected_config, get_cohort_data,
    make_executor, stale_reason,
)


# -------------------------------------------------------------------------------------------------------
# the grid
# -------------------------------------------------------------------------------------------------------
class GridInterrupted(Exception):
    """SIGINT / SIGTERM stopped the grid; ``finished`` of ``total`` cells have a finished record."""

    def __init__(self, finished: int, total: int) -> None:
        self.finished, self.total = finished, total
        super().__init__(f"{finished} of {total} cells finished; rerun the same command to resume")


@dataclass
class GridReport:
    ran: list[dict]
    skipped: list[RunConfig]
    seconds: float


@dataclass
class GridPlan:
    """Which cells of a grid run, and why the finished ones that run again do."""

    todo: list[RunConfig] = field(default_factory=list)
    skipped: list[RunConfig] = field(default_factory=list)
    rerun_reasons: dict[str, str] = field(default_factory=dict)


def _coordinates(record_or_cell) -> tuple:
    get = record_or_cell.get if isinstance(record_or_cell, dict) else lambda k: getattr(record_or_cell, k)
    return tuple(str(get(k)) for k in ("method", "cohort", "backbone", "fold", "seed", "selection"))


class _RefiledRecords:
    """Finished records filed under another folder name than their configuration has today (stores written
    before folder names depended only on the options that reach the method); read once, on first need."""

    def __init__(self, store: ResultStore) -> None:
        self.store, self._by_coordinates = store, None

    def find(self, config: RunConfig) -> dict | None:
        if self._by_coordinates is None:
            self._by_coordinates = {}
            for record in self.store.load_all()[0]:
                if record.get("status") == "ok":
                    self._by_coordinates.setdefault(_coordinates(record), []).append(record)
        expected = None
        for record in self._by_coordinates.get(_coordinates(config.cell), []):
            if record["recipe"] == config.store_key():
                continue
            expected = expected or hashed_config(expected_config(config, (record.get("config") or {}).get("in_dim")))
            if record.get("config_hash") == expected:
                return self.store.move(record, config.cell, label=config.label(),
                                       config={**record["config"], "overrides": dict(config.overrides),
                                               "signal": config.signal})
        return None


def plan_grid(configs: list[RunConfig], store: ResultStore, overwrite: bool = False) -> GridPlan:
    """Split ``configs`` into cells to run and finished cells to skip (every record is read once)."""
    plan, refiled = GridPlan(), _RefiledRecords(store)
    for config in configs:
        record, why = (None, None) if overwrite else finished_record(store, config.cell)
        if record is None and why is None and not overwrite:
            record = refiled.find(config)
        if record is not None:
            why = stale_reason(record, config)
            if why is None:
                plan.skipped.append(config)
                continue
        plan.todo.append(config)
        if why:
            plan.rerun_reasons[config.cell.label()] = why
    return plan


def _print_plan(console, plan: GridPlan) -> None:
    if plan.skipped:
        console.print(f"[dim]{len(plan.skipped)} finished cell(s) skipped (use --overwrite to redo them)[/dim]")
    reasons: dict[str, list[str]] = {}
    for label, why in plan.rerun_reasons.items():
        reasons.setdefault(why, []).append(label)
    for why, labels in reasons.items():
        console.print(f"[yellow]{len(labels)} finished cell(s) rerun: {why} (first: {labels[0]})[/yellow]")


def _progress(console, show: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[eta]}"), console=console, transient=False, disable=not show)


class _EpochBars:
    """One progress bar per running cell, updated from the executors' epoch events."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.bars = progress, {}

    def update(self, label: str, epoch: int, epochs: int) -> None:
        if label not in self.bars:
            self.bars[label] = self.progress.add_task(f"  {label}", total=epochs, eta="")
        self.progress.update(self.bars[label], completed=epoch, total=epochs)

    def done(self, label: str) -> None:
        task = self.bars.pop(label, None)
        if task is not None:
            self.progress.remove_task(task)


def estimate_cells(configs: list[RunConfig], store: ResultStore, loader: CohortLoader | None = None,
                   model: CostModel | None = None) -> dict[str, float]:
    """Estimated seconds of each cell (cost model from the store's finished records; fold sizes from the data)."""
    model = model or CostModel.from_records(store.load_all()[0])
    out = {}
    for config in configs:
        recipe = config.resolved_recipe()
        try:
            fold = get_cohort_data(config, loader).folds[config.fold]
            n_train, n_val = len(fold.train), len(fold.val)
        except Exception:  # noqa: BLE001 (a cell that cannot load fails at run time; estimate it as empty)
            n_train = n_val = 0
        n_fit = int(n_train * (1 - recipe.inner_fraction)) if config.selection == "inner" else n_train
        draws_per_epoch = n_fit if recipe.max_samples_per_epoch is None else min(n_fit, recipe.max_samples_per_epoch)
        monitored = {"inner": n_train - n_fit, "paper-max": n_val}.get(config.selection, 0)
        draws = cell_draws(recipe.epochs, draws_per_epoch, n_train, n_val, monitored)
        out[config.cell.label()] = model.estimate(config.method, draws, cohort=config.cohort, backbone=config.backbone)
    return out


def _drive(executor: Executor, tasks: list[CellTask], ran: list[dict], progress: Progress, grid_task, bars,
           console, eta: Eta) -> None:
    """Submit every task, then report cells as they finish (``ran`` grows as they do)."""
    for task in tasks:
        executor.submit(task.config.cell.label(), task)
    while executor.pending:
        for key, summary in executor.results(timeout=0.25):
            bars.done(key)
            ran.append(summary)
            _report(console, summary)
            eta.finished(key, summary["seconds"] if summary["status"] == "ok" else None)
            progress.advance(grid_task)
        progress.update(grid_task, eta=f"ETA {format_seconds(eta.remaining_seconds())}")


def stop_executor(executor: Executor) -> None:
    """Cancel the executor's tasks (a grid's cells, a tuner's study workers); a second Ctrl-C during the clean-up
    is ignored (it would leave workers behind)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        executor.cancel()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_grid(
    configs: list[RunConfig],
    store: ResultStore,
    execution: Execution = Execution(),
    jobs: int = 1,
    overwrite: bool = False,
    console=None,
    loader: CohortLoader | None = None,
    show_progress: bool = True,
    executor: Executor | None = None,
) -> GridReport:
    """Run every unfinished cell (all of them with ``overwrite``) on ``executor`` (default: this process for
    ``jobs=1``, else ``jobs`` worker processes).

    Raises
    ------
    GridInterrupted
        On SIGINT (and SIGTERM, which the ``run`` command turns into SIGINT's KeyboardInterrupt): queued cells are
        cancelled and running ones stopped first; finished records stay, a rerun resumes.
    """
    console = console or Console()
    plan = plan_grid(configs, store, overwrite)
    _print_plan(console, plan)
    if loader is not None and jobs > 1 and len(plan.todo) > 1:
        raise ValueError("a custom cohort loader only works with jobs=1")
    if execution.token is None:
        execution = dataclasses.replace(execution, token=uuid.uuid4().hex)
    executor = executor or make_executor("local", jobs, execution, loader=loader)
    tasks = [CellTask(c, str(store.root), execution, skip_if_finished=not overwrite) for c in plan.todo]
    ran: list[dict] = []
    started = time.perf_counter()
    try:
        executor.start()
        eta = Eta(estimate_cells(plan.todo, store, loader), executor.parallelism)
        with _progress(console, show_progress) as progress:
            grid_task = progress.add_task("cells", total=len(plan.todo), eta="")
            bars = _EpochBars(progress)
            executor.on_progress = bars.update
            _drive(executor, tasks, ran, progress, grid_task, bars, console, eta)
    except KeyboardInterrupt:
        stop_executor(executor)
        finished = len(plan.skipped) + sum(1 for r in ran if r["status"] in ("ok", "skipped"))
        raise GridInterrupted(finished, len(configs)) from None
    finally:
        executor.close()
    return GridReport(ran=ran, skipped=plan.skipped, seconds=time.perf_counter() - started)


def _report(console, summary: dict) -> None:
    if summary["status"] == "ok":
        c = summary["c_index"]
        c_text = ("; ".join(summary.get("notes") or []) or "nan") if c is None else f"{c:.3f}"
        console.print(f"  [green]ok[/green]    {summary['cell']}  C-index {c_text}  ({summary['seconds']:.1f} s)")
    elif summary["status"] in ("busy", "skipped"):  # another run holds or finished the cell
        console.print(f"  [yellow]{summary['status']}[/yellow]  {summary['cell']}  {summary['error']}")
    else:
        console.print(f"  [red]error[/red] {summary['cell']}  {summary['error']}")


def summary_table(store: ResultStore, configs: list[RunConfig]):
    """A rich table: one row per (method, cohort, backbone) of the grid, mean ± population std of the C-index."""
    groups: dict[tuple, list[Cell]] = {}
    for c in (config.cell for config in configs):
        groups.setdefault((c.method, c.cohort, c.backbone), []).append(c)
    table = Table(title="C-index over folds (mean ± population std)")
    for col in ("method", "cohort", "backbone", "folds ok", "C-index", "errors", "s / cell"):
        table.add_column(col, justify="right" if col in ("folds ok", "C-index", "errors", "s / cell") else "left")
    for (m, co, b), group in groups.items():
        records = [readable_record(store, c) for c in group]
        ok = [r for r in records if r and r.get("status") == "ok"]
        errors = [r for r in records if r and r.get("status") == "error"]
        mean, std = aggregate([(r.get("metrics") or {}).get("c_index") for r in ok])
        secs = [r["seconds"] for r in ok if r.get("seconds") is not None]
        c_text = "missing" if not ok else f"{mean:.3f} ± {std:.3f}"
        table.add_row(m, co, b, f"{len(ok)}/{len(group)}", c_text, str(len(errors)),
                      f"{sum(secs) / len(secs):.1f}" if secs else "-")
    return table


