"""The grid runner behind ``python -m benchmark run``: expands methods x cohorts x backbones x folds into
cells, skips finished ones, trains the rest (serially or in worker processes), records every cell (an
exception becomes an ``error`` record and the grid goes on) and prints a summary.
"""
from __future__ import annotations

import multiprocessing
import queue as queue_module
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmark.training.metrics import aggregate
from benchmark.training.recipes import Recipe
from benchmark.store.records import Cell, ResultStore, config_hash, now_iso, software_provenance

#: ``load_cohort(name, data_root=..., backbone=..., unit=...)``; injectable for tests.
CohortLoader = Callable[..., Any]


@dataclass(frozen=True)
class RunSpec:
    """Settings shared by every cell of one ``run`` invocation."""

    recipe: Recipe
    recipe_label: str
    selection: str = "last"
    seed: int = 0
    data_root: str | None = None
    unit: str = "patient"
    bin_rule: str = "train"
    n_bins: int = 4
    device: str = "auto"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    save_weights: bool = True
    plugins: tuple[str, ...] = ()


def recipe_label(recipe_name: str, variant: dict[str, Any]) -> str:
    """Recipe name as stored in records and paths: the plain name, or ``name+<hash>`` when anything was
    changed from the defaults (``--set``, method options, unit, bin rule), so variants never overwrite
    each other's cells."""
    changed = {k: v for k, v in variant.items() if v}
    return recipe_name if not changed else f"{recipe_name}+{config_hash(changed)[:6]}"


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


def expand_grid(methods: list[str], cohorts: list[str], backbones: list[str], folds: list[int], spec: RunSpec) -> list[Cell]:
    """Every cell, ordered cohort -> backbone -> method -> fold (cohort data are reused by consecutive cells)."""
    return [
        Cell(m, c, b, k, spec.seed, spec.recipe_label, spec.selection)
        for c in cohorts
        for b in backbones
        for m in methods
        for k in folds
    ]


# -------------------------------------------------------------------------------------------------------
# one cell
# -------------------------------------------------------------------------------------------------------
_COHORT_CACHE: dict[tuple, Any] = {}


def default_loader(name: str, data_root: str | None, backbone: str, unit: str):
    from benchmark.data.loader import load_cohort

    return load_cohort(name, data_root=data_root, backbone=backbone, unit=unit)


def get_cohort_data(cell: Cell, spec: RunSpec, loader: CohortLoader | None = None):
    """The cohort of ``cell``, cached in this process."""
    key = (cell.cohort, cell.backbone, spec.data_root, spec.unit, id(loader))
    if key not in _COHORT_CACHE:
        _COHORT_CACHE[key] = (loader or default_loader)(cell.cohort, data_root=spec.data_root, backbone=cell.backbone,
                                                        unit=spec.unit)
    return _COHORT_CACHE[key]


def cell_config(cell: Cell, spec: RunSpec, in_dim: int | None = None) -> dict[str, Any]:
    """What determines a cell's result besides its coordinates (hashed into ``config_hash``).

    A rerun compares it with a finished record's to tell a finished cell from a stale one (other recipe
    fields, method options or synthetic-data version); ``in_dim`` defaults to the backbone's registered dim.
    """
    from benchmark.data.backbones import get_backbone
    from benchmark.data.synth import SCHEMA as SYNTHETIC_SCHEMA, synthetic_parameters

    backbone = get_backbone(cell.backbone)
    if in_dim is None:
        in_dim = backbone.dim
    config = {
        "recipe": spec.recipe.to_dict(),
        "method_options": dict(spec.method_options.get(cell.method, {})),
        "unit": spec.unit,
        "bin_rule": spec.bin_rule,
        "n_bins": spec.n_bins,
        "in_dim": int(in_dim),
        "data_root": spec.data_root,
        # the embedded synthetic data changes with the generator's version; real data is named by its root
        "synthetic_version": SYNTHETIC_SCHEMA if spec.data_root is None else None,
    }
    if spec.data_root is None:  # and with the backbone's generator parameters (datasets/backbones.toml)
        config["synthetic_backbone"] = synthetic_parameters(backbone)
    return config


def run_cell(
    cell: Cell,
    spec: RunSpec,
    store: ResultStore,
    on_epoch: Callable[[int, int, dict], None] | None = None,
    loader: CohortLoader | None = None,
) -> dict:
    """Train and record one cell. Never raises on a training error: it writes an ``error`` record instead.

    Returns a short summary: ``cell`` label, ``status``, ``c_index``, ``seconds``, ``error``.
    """
    from benchmark.training.trainer import train_fold

    started = time.perf_counter()
    record: dict[str, Any] = {
        **asdict(cell),
        "schema": 1,
        "unit": spec.unit,
        "provenance": {**software_provenance(), "created": now_iso()},
        "metrics": None,
        "selected_epoch": None,
        "history": None,
        "bin_edges": None,
        "train_risk_median": None,
        "predictions": None,
        "error": None,
        "weights": None,
    }
    state = None
    try:
        cohort = get_cohort_data(cell, spec, loader)
        config = cell_config(cell, spec, cohort.in_dim)
        record["config"], record["config_hash"] = config, config_hash(config)
        record["n_folds"] = len(cohort.folds)  # so tables know a cell is incomplete even when every row is
        record["provenance"].update({"data": dict(getattr(cohort, "provenance", {}) or {}), "data_root": spec.data_root})
        result = train_fold(
            cohort, cell.fold, cell.method, spec.recipe, selection=spec.selection, seed=cell.seed, device=spec.device,
            method_options=config["method_options"], bin_rule=spec.bin_rule, n_bins=spec.n_bins, on_epoch=on_epoch,
        )
        record.update(
            status="ok", metrics=result.metrics, selected_epoch=result.selected_epoch, history=result.history,
            bin_edges=result.bin_edges, train_risk_median=result.train_risk_median, predictions=result.predictions,
            n_parameters=result.n_parameters, data_sizes=result.extra,
        )
        if not any(p["event"] for p in result.predictions):  # every validation sample censored
            from benchmark.analysis.tables import NO_EVENTS_NOTE

            record["notes"] = [NO_EVENTS_NOTE]
        if spec.save_weights:
            state = result.model.state_dict()
    except Exception as exc:  # one crashed cell must not stop the grid
        record.setdefault("config", None)
        record.setdefault("config_hash", None)
        record.update(status="error", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
    record["seconds"] = time.perf_counter() - started
    store.write(record, state_dict=state)
    c = (record.get("metrics") or {}).get("c_index")
    return {"cell": cell.label(), "status": record["status"], "c_index": c, "seconds": record["seconds"],
            "error": (record["error"] or "").splitlines()[0] if record["error"] else None,
            "notes": record.get("notes") or []}


# -------------------------------------------------------------------------------------------------------
# worker processes
# -------------------------------------------------------------------------------------------------------
def _worker_init(plugins: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    from benchmark.training.registry import load_builtin_methods, load_plugins

    load_builtin_methods()
    load_plugins(plugins)


def _worker_run(cell: Cell, spec: RunSpec, root: str, progress_queue) -> dict:
    def on_epoch(epoch: int, epochs: int, info: dict) -> None:
        progress_queue.put((cell.label(), epoch, epochs))

    return run_cell(cell, spec, ResultStore(root), on_epoch=on_epoch)


# -------------------------------------------------------------------------------------------------------
# the grid
# -------------------------------------------------------------------------------------------------------
@dataclass
class GridReport:
    ran: list[dict]
    skipped: list[Cell]
    seconds: float


def _finished_record(store: ResultStore, cell: Cell) -> dict | None:
    """The ``ok`` record of ``cell`` (read once), or None when absent, failed, or its record or weights are
    unreadable (then the cell is redone)."""
    return store.finished(cell)


def _is_stale(record: dict, cell: Cell, spec: RunSpec) -> bool:
    """Whether the finished ``record`` of ``cell`` was made under another configuration than ``spec``'s."""
    try:  # the input dim is the data's, not part of the run's settings
        expected = config_hash(cell_config(cell, spec, (record.get("config") or {}).get("in_dim")))
    except Exception:  # an unknown backbone fails later, inside the cell, with a clear error record
        return False
    return record.get("config_hash") != expected


def run_grid(
    cells: list[Cell],
    spec: RunSpec,
    store: ResultStore,
    jobs: int = 1,
    overwrite: bool = False,
    console=None,
    loader: CohortLoader | None = None,
    show_progress: bool = True,
) -> GridReport:
    """Run every unfinished cell (all of them with ``overwrite``); ``jobs > 1`` uses worker processes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or Console()
    todo, skipped, stale = [], [], 0
    for c in cells:
        record = None if overwrite else _finished_record(store, c)
        if record is None:
            todo.append(c)
        elif _is_stale(record, c, spec):
            todo.append(c)  # finished under another configuration or data version: redo, never mix
            stale += 1
        else:
            skipped.append(c)
    if skipped:
        console.print(f"[dim]{len(skipped)} finished cell(s) skipped (use --overwrite to redo them)[/dim]")
    if stale:
        console.print(f"[yellow]{stale} cell(s) finished under another configuration or data version: rerunning[/yellow]")
    started = time.perf_counter()
    ran: list[dict] = []
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not show_progress,
    )
    with progress:
        grid_task = progress.add_task("cells", total=len(todo))
        if jobs <= 1 or len(todo) <= 1:
            for cell in todo:
                epoch_task = progress.add_task(f"  {cell.label()}", total=spec.recipe.epochs)

                def on_epoch(epoch: int, epochs: int, info: dict, _task=epoch_task) -> None:
                    progress.update(_task, completed=epoch, total=epochs)

                summary = run_cell(cell, spec, store, on_epoch=on_epoch, loader=loader)
                progress.remove_task(epoch_task)
                ran.append(summary)
                _report(console, summary)
                progress.advance(grid_task)
        else:
            if loader is not None:
                raise ValueError("a custom cohort loader only works with jobs=1")
            context = multiprocessing.get_context("spawn")
            with context.Manager() as manager:
                progress_queue = manager.Queue()
                epoch_tasks: dict[str, Any] = {}
                with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                                         initargs=(spec.plugins,)) as pool:
                    futures = {pool.submit(_worker_run, c, spec, str(store.root), progress_queue): c for c in todo}
                    pending = set(futures)
                    while pending:
                        done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                        _drain(progress_queue, progress, epoch_tasks)
                        for future in done:
                            cell = futures[future]
                            try:
                                summary = future.result()
                            except Exception as exc:  # a worker died (e.g. killed for memory)
                                summary = {"cell": cell.label(), "status": "error", "c_index": None, "seconds": None,
                                           "error": f"worker failed: {type(exc).__name__}: {exc}"}
                            task = epoch_tasks.pop(cell.label(), None)
                            if task is not None:
                                progress.remove_task(task)
                            ran.append(summary)
                            _report(console, summary)
                            progress.advance(grid_task)
    return GridReport(ran=ran, skipped=skipped, seconds=time.perf_counter() - started)


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
        c_text = "; ".join(summary.get("notes") or []) or "nan" if c is None else f"{c:.3f}"
        console.print(f"  [green]ok[/green]    {summary['cell']}  C-index {c_text}  ({summary['seconds']:.1f} s)")
    else:
        console.print(f"  [red]error[/red] {summary['cell']}  {summary['error']}")


def summary_table(store: ResultStore, cells: list[Cell]):
    """A rich table: one row per (method, cohort, backbone) of ``cells``, mean ± population std of the C-index."""
    from rich.table import Table

    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.method, c.cohort, c.backbone), []).append(c)
    table = Table(title="C-index over folds (mean ± population std)")
    for col in ("method", "cohort", "backbone", "folds ok", "C-index", "errors", "s / cell"):
        table.add_column(col, justify="right" if col in ("folds ok", "C-index", "errors", "s / cell") else "left")
    for (m, co, b), group in groups.items():
        records = [store.read(c) for c in group]
        ok = [r for r in records if r and r.get("status") == "ok"]
        errors = [r for r in records if r and r.get("status") == "error"]
        mean, std = aggregate([(r.get("metrics") or {}).get("c_index") for r in ok])
        secs = [r["seconds"] for r in ok if r.get("seconds") is not None]
        c_text = "missing" if not ok else f"{mean:.3f} ± {std:.3f}"
        table.add_row(m, co, b, f"{len(ok)}/{len(group)}", c_text, str(len(errors)),
                      f"{sum(secs) / len(secs):.1f}" if secs else "-")
    return table


def default_results_dir(data_root: str | None) -> Path:
    """``results/synthetic`` for the embedded synthetic cohorts, ``results/real`` otherwise."""
    return Path("results") / ("synthetic" if data_root is None else "real")
