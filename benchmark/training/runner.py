"""The grid runner behind ``python -m benchmark run``: expands methods x cohorts x backbones x folds into
cells, skips finished ones, trains the rest (serially or in worker processes), records every cell (an
exception becomes an ``error`` record and the grid goes on) and prints a summary.
"""
from __future__ import annotations

import copy
import multiprocessing
import queue as queue_module
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from benchmark.data.backbones import get_backbone
from benchmark.data.loader import Fold, load_cohort
from benchmark.data.splits import repeated_folds, straddling_patients
from benchmark.data.synth import SCHEMA as SYNTHETIC_SCHEMA, ensure_synthetic, synthetic_parameters
from benchmark.store.records import SCHEMA, Cell, ResultStore, now_iso, software_provenance
from benchmark.training.config import RunConfig, hashed_config
from benchmark.training.metrics import aggregate
from benchmark.training.registry import create_method, get_method_spec, load_builtin_methods, load_plugins
from benchmark.training.trainer import train_fold

#: ``load_cohort(name, data_root=..., backbone=..., unit=...)``; injectable for tests.
CohortLoader = Callable[..., Any]


@dataclass(frozen=True)
class Execution:
    """How cells are executed; none of it changes a cell's result, so none of it is in the configuration."""

    device: str = "auto"
    save_weights: bool = True
    plugins: tuple[str, ...] = ()


def parse_folds(text: str | None, n_folds: int | None = None) -> list[int]:
    """``"0-4"``, ``"0,2,3"`` or ``"all"``/None (every fold) -> sorted fold indices."""
    if text is None or text.strip().lower() == "all":
        if n_folds is None:
            raise ValueError("parse_folds: 'all' needs the number of folds")
        return list(range(n_folds))
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition("-")
        try:
            out.update(range(int(a), int(b) + 1) if sep else [int(a)])
        except ValueError:
            raise ValueError(f"--folds: cannot parse {text!r} (expected e.g. 0-4 or 0,2,3)") from None
    if not out or min(out) < 0:
        raise ValueError(f"--folds: no valid fold in {text!r}")
    return sorted(out)


# -------------------------------------------------------------------------------------------------------
# one cell
# -------------------------------------------------------------------------------------------------------
_COHORT_CACHE: dict[tuple, Any] = {}


def resolved_data_root(config: RunConfig) -> str | None:
    """The folder a cell reads: its real data root, the generated folder of a synthetic control signal, or
    None for the default embedded synthetic cohorts."""
    if config.data_root is not None or config.signal == "mixed":
        return config.data_root
    return str(ensure_synthetic("demo", seed=0, signal=config.signal, cohorts=[config.cohort],
                                backbones=[config.backbone]))


def synthetic_facts(config: RunConfig, data_root: str | None) -> dict[str, Any] | None:
    """Generator version and backbone parameters of the embedded synthetic data (None for any data root)."""
    if data_root is not None:
        return None
    return {"version": SYNTHETIC_SCHEMA, "backbone": synthetic_parameters(get_backbone(config.backbone))}


def get_cohort_data(config: RunConfig, loader: CohortLoader | None = None):
    """The cohort of a cell with the folds of its repeat, cached in this process.

    Raises ValueError when a fold puts one patient's samples on both sides (slide-level units), whatever the
    split files say: such a split leaks.
    """
    data_root = resolved_data_root(config)
    key = (config.cohort, config.backbone, data_root, config.unit, id(loader), config.repeat)
    if key not in _COHORT_CACHE:
        base_key = key[:-1] + (0,)
        if base_key not in _COHORT_CACHE:
            _COHORT_CACHE[base_key] = (loader or load_cohort)(config.cohort, data_root=data_root,
                                                              backbone=config.backbone, unit=config.unit)
        data = _COHORT_CACHE[base_key]
        if config.repeat:
            data = with_folds(data, repeated_folds(data.samples, len(data.folds), config.repeat))
        _check_no_patient_straddles(data)
        _COHORT_CACHE[key] = data
    return _COHORT_CACHE[key]


def with_folds(data, folds: list[tuple[list[str], list[str]]]):
    """The cohort with other folds (same labels and bag cache)."""
    other = copy.copy(data)
    other.folds = [Fold(k, train, val) for k, (train, val) in enumerate(folds)]
    return other


def _check_no_patient_straddles(data) -> None:
    if "patient_id" not in data.samples.columns:
        return
    for fold in data.folds:
        leaks = straddling_patients(data.samples, fold.train, fold.val)
        if leaks:
            source = (getattr(data, "provenance", None) or {}).get("splits", "the split files")
            raise ValueError(f"{source}: fold {fold.k} puts {len(leaks)} patient(s) in both train and val "
                             f"(patient leak across slides), e.g. {leaks[:3]}; `benchmark audit` lists them")


def expected_config(config: RunConfig, in_dim: int | None = None) -> dict[str, Any]:
    """The ``config`` a record of this cell gets (``in_dim`` defaults to the backbone's registered dim)."""
    data_root = resolved_data_root(config)
    dim = get_backbone(config.backbone).dim if in_dim is None else in_dim
    return config.record_config(dim, data_root, synthetic_facts(config, data_root))


def _new_record(config: RunConfig) -> dict[str, Any]:
    return {
        **asdict(config.cell), "schema": SCHEMA, "label": config.label(),
        "provenance": {**software_provenance(), "created": now_iso()},
        "config": None, "config_hash": None, "metrics": None, "selected_epoch": None, "history": None,
        "bin_edges": None, "train_risk_median": None, "predictions": None, "error": None, "weights": None,
    }


def run_cell(
    config: RunConfig,
    store: ResultStore,
    execution: Execution = Execution(),
    on_epoch: Callable[[int, int, dict], None] | None = None,
    loader: CohortLoader | None = None,
    annotations: dict[str, Any] | None = None,
) -> dict:
    """Train and record one cell. Never raises on a training error: it writes an ``error`` record instead.

    ``annotations`` are extra record fields (the tuner stores its trial history under ``tuning``).
    Returns a short summary: ``cell`` label, ``status``, ``c_index``, ``seconds``, ``error``.
    """
    started = time.perf_counter()
    record, state = {**_new_record(config), **(annotations or {})}, None
    try:
        cohort = get_cohort_data(config, loader)
        record["config"] = expected_config(config, cohort.in_dim)
        record["config_hash"] = hashed_config(record["config"])
        record["n_folds"] = len(cohort.folds)  # so tables know a cell is incomplete even when every row is
        record["provenance"]["data"] = dict(getattr(cohort, "provenance", {}) or {})
        result = train_fold(cohort, config, device=execution.device, on_epoch=on_epoch)
        record.update(
            status="ok", metrics=result.metrics, selected_epoch=result.selected_epoch, history=result.history,
            bin_edges=result.bin_edges, train_risk_median=result.train_risk_median, predictions=result.predictions,
            n_parameters=result.n_parameters, data_sizes=result.extra,
        )
        if result.metric_errors:
            record["metric_errors"] = result.metric_errors
        if execution.save_weights:
            state = result.model.state_dict()
    except Exception as exc:  # one crashed cell must not stop the grid
        record.update(status="error", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
    record["seconds"] = time.perf_counter() - started
    store.write(record, state_dict=state)
    c = (record.get("metrics") or {}).get("c_index")
    return {"cell": config.cell.label(), "status": record["status"], "c_index": c, "seconds": record["seconds"],
            "error": (record["error"] or "").splitlines()[0] if record["error"] else None}


# -------------------------------------------------------------------------------------------------------
# worker processes
# -------------------------------------------------------------------------------------------------------
def _worker_init(plugins: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    load_builtin_methods()
    load_plugins(plugins)


def _worker_run(config: RunConfig, execution: Execution, root: str, progress_queue) -> dict:
    def on_epoch(epoch: int, epochs: int, info: dict) -> None:
        progress_queue.put((config.cell.label(), epoch, epochs))

    return run_cell(config, ResultStore(root), execution, on_epoch=on_epoch)


# -------------------------------------------------------------------------------------------------------
# the grid
# -------------------------------------------------------------------------------------------------------
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


def _finished_record(store: ResultStore, cell: Cell) -> tuple[dict | None, str | None]:
    """The ``ok`` record of ``cell`` and None, or None and why the cell must run (absent, failed, unreadable)."""
    try:
        record = store.read(cell)
    except ValueError as exc:
        return None, f"unreadable record ({exc})"
    if record is None:
        return None, None
    if record.get("status") != "ok":
        return None, None
    return record, None


def stale_reason(record: dict, config: RunConfig) -> str | None:
    """Why the finished ``record`` does not hold ``config``'s result (None when it does).

    A configuration that cannot be evaluated (e.g. an unknown backbone) is a reason too: the cell reruns and
    its error record says what is wrong, rather than a finished cell being kept on a guess.
    """
    try:  # the input dim is the data's, not part of the run's settings
        expected = expected_config(config, (record.get("config") or {}).get("in_dim"))
    except Exception as exc:  # noqa: BLE001 (any failure here means the record cannot be trusted)
        return f"its configuration could not be checked ({type(exc).__name__}: {exc})"
    if record.get("config_hash") != hashed_config(expected):
        return "finished under another configuration or data version"
    if get_method_spec(config.method).needs.tissue_types and "tissue_types" not in (record.get("data_sizes") or {}):
        return "trained before the tissue-type source was chosen and recorded (the synthetic truth was read)"
    return None


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
        record, why = (None, None) if overwrite else _finished_record(store, config.cell)
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
                    TimeRemainingColumn(), console=console, transient=False, disable=not show)


def _run_serial(todo: list[RunConfig], store: ResultStore, execution: Execution, progress: Progress, grid_task,
                console, loader: CohortLoader | None) -> list[dict]:
    ran = []
    for config in todo:
        epoch_task = progress.add_task(f"  {config.cell.label()}", total=config.resolved_recipe().epochs)

        def on_epoch(epoch: int, epochs: int, info: dict, _task=epoch_task) -> None:
            progress.update(_task, completed=epoch, total=epochs)

        summary = run_cell(config, store, execution, on_epoch=on_epoch, loader=loader)
        progress.remove_task(epoch_task)
        ran.append(summary)
        _report(console, summary)
        progress.advance(grid_task)
    return ran


def _run_pool(todo: list[RunConfig], store: ResultStore, execution: Execution, jobs: int, progress: Progress,
              grid_task, console) -> list[dict]:
    ran: list[dict] = []
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        progress_queue = manager.Queue()
        epoch_tasks: dict[str, Any] = {}
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                                 initargs=(execution.plugins,)) as pool:
            futures = {pool.submit(_worker_run, c, execution, str(store.root), progress_queue): c for c in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(progress_queue, progress, epoch_tasks)
                for future in done:
                    summary = _pool_summary(future, futures[future])
                    task = epoch_tasks.pop(summary["cell"], None)
                    if task is not None:
                        progress.remove_task(task)
                    ran.append(summary)
                    _report(console, summary)
                    progress.advance(grid_task)
    return ran


def _pool_summary(future, config: RunConfig) -> dict:
    try:
        return future.result()
    except Exception as exc:  # a worker died (e.g. killed for memory)
        return {"cell": config.cell.label(), "status": "error", "c_index": None, "seconds": None,
                "error": f"worker failed: {type(exc).__name__}: {exc}"}


def run_grid(
    configs: list[RunConfig],
    store: ResultStore,
    execution: Execution = Execution(),
    jobs: int = 1,
    overwrite: bool = False,
    console=None,
    loader: CohortLoader | None = None,
    show_progress: bool = True,
) -> GridReport:
    """Run every unfinished cell (all of them with ``overwrite``); ``jobs > 1`` uses worker processes."""
    console = console or Console()
    plan = plan_grid(configs, store, overwrite)
    _print_plan(console, plan)
    if loader is not None and jobs > 1 and len(plan.todo) > 1:
        raise ValueError("a custom cohort loader only works with jobs=1")
    started = time.perf_counter()
    with _progress(console, show_progress) as progress:
        grid_task = progress.add_task("cells", total=len(plan.todo))
        if jobs <= 1 or len(plan.todo) <= 1:
            ran = _run_serial(plan.todo, store, execution, progress, grid_task, console, loader)
        else:
            ran = _run_pool(plan.todo, store, execution, jobs, progress, grid_task, console)
    return GridReport(ran=ran, skipped=plan.skipped, seconds=time.perf_counter() - started)


def _drain(progress_queue, progress, epoch_tasks: dict) -> None:
    while True:
        try:
            label, epoch, epochs = progress_queue.get_nowait()
        except (queue_module.Empty, EOFError, OSError):
            return
        if label not in epoch_tasks:
            epoch_tasks[label] = progress.add_task(f"  {label}", total=epochs)
        progress.update(epoch_tasks[label], completed=epoch, total=epochs)


def _report(console, summary: dict) -> None:
    if summary["status"] == "ok":
        c = summary["c_index"]
        c_text = "nan" if c is None else f"{c:.3f}"
        console.print(f"  [green]ok[/green]    {summary['cell']}  C-index {c_text}  ({summary['seconds']:.1f} s)")
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
        records = [_readable(store, c) for c in group]
        ok = [r for r in records if r and r.get("status") == "ok"]
        errors = [r for r in records if r and r.get("status") == "error"]
        mean, std = aggregate([(r.get("metrics") or {}).get("c_index") for r in ok])
        secs = [r["seconds"] for r in ok if r.get("seconds") is not None]
        c_text = "missing" if not ok else f"{mean:.3f} ± {std:.3f}"
        table.add_row(m, co, b, f"{len(ok)}/{len(group)}", c_text, str(len(errors)),
                      f"{sum(secs) / len(secs):.1f}" if secs else "-")
    return table


def load_trained_model(store: ResultStore, record: dict, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a record's method (its stored in-dim, bins and options) with the cell's saved weights, in eval mode.

    Raises FileNotFoundError when the cell's weights were not saved (``--no-weights``) or are missing.
    """
    where = record.get("_path", "record")
    if record.get("status") != "ok":
        raise ValueError(f"{where}: status {record.get('status')!r}, no model to load")
    config = record.get("config") or {}
    path = store.weights_path(Cell.of(record))
    if not record.get("weights"):
        raise FileNotFoundError(f"{where}: no weights were saved for this cell")
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file missing")
    model = create_method(record["method"], in_dim=int(config["in_dim"]), n_bins=int(config["n_bins"]),
                          **(config.get("method_options") or {}))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 (corrupt, pickled or mismatched weights: one clear message)
        raise ValueError(f"{path}: unreadable weights ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return model.eval()


def _readable(store: ResultStore, cell: Cell) -> dict | None:
    try:
        return store.read(cell)
    except ValueError:
        return None


def default_results_dir(data_root: str | None) -> Path:
    """``results/synthetic`` for the embedded synthetic cohorts, ``results/real`` otherwise."""
    return Path("results") / ("synthetic" if data_root is None else "real")
