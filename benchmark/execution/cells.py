"""One cell: its cohort (loaded once per process), its training into one record under its lock (in this process,
a local worker or a Ray task), the executor that runs cells, and the trained model a record describes.
"""
from __future__ import annotations

import contextlib
import copy
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from benchmark.data.cohorts import add_registry_file, get_backbone
from benchmark.data.loader import Fold, load_cohort
from benchmark.data.splits import repeated_folds, straddling_patients
from benchmark.data.synth import SCHEMA as SYNTHETIC_SCHEMA, ensure_synthetic, synthetic_parameters
from benchmark.store.lock import CellLock, LockBusy, describe_owner
from benchmark.store.records import SCHEMA, Cell, ResultStore, now_iso, software_provenance
from benchmark.settings.config import RunConfig, hashed_config
from benchmark.execution.executors import Executor, ExecutorRequest, Work, get_executor_kind
from benchmark.evaluation.metrics import NO_EVENTS_NOTE
from benchmark.api.registry import create_method, get_method_spec, load_builtin_methods, load_plugins
from benchmark.fitting.trainer import train_fold

#: ``load_cohort(name, data_root=..., backbone=..., unit=...)``; injectable for tests.
CohortLoader = Callable[..., Any]


@dataclass(frozen=True)
class Execution:
    """How cells are executed; none of it changes a cell's result, so none of it is in the configuration.

    ``token`` identifies one run of a grid in the cell locks (a retried task of the same run takes its own
    stale lock over at once); :func:`run_grid` draws one when it is None.
    """

    device: str = "auto"
    save_weights: bool = True
    plugins: tuple[str, ...] = ()
    token: str | None = None


# -------------------------------------------------------------------------------------------------------
# one cell
# -------------------------------------------------------------------------------------------------------
_COHORT_CACHE: dict[tuple, Any] = {}


def resolved_data_root(config: RunConfig) -> str | None:
    """The folder a cell reads: its real data root, the generated folder of a synthetic control signal, or
    None for the default embedded synthetic cohorts."""
    if config.data_root is not None or config.signal == "mixed" or config.clinical is not None:
        return config.data_root
    return str(ensure_synthetic("demo", seed=0, signal=config.signal, cohorts=[config.cohort],
                                backbones=[config.backbone]))


def synthetic_facts(config: RunConfig, data_root: str | None) -> dict[str, Any] | None:
    """Generator version and backbone parameters of the embedded synthetic data (None for any data root)."""
    if data_root is not None or config.clinical is not None:
        return None
    return {"version": SYNTHETIC_SCHEMA, "backbone": synthetic_parameters(get_backbone(config.backbone))}


def get_cohort_data(config: RunConfig, loader: CohortLoader | None = None):
    """The cohort of a cell (its data root or explicit data source) with the folds of its repeat, cached in this
    process.

    Raises ValueError when a fold puts one patient's samples on both sides (slide-level units), whatever the
    split files say: such a split leaks.
    """
    for path in config.registry:  # the cell's cohort or backbone may be declared there
        add_registry_file(path)
    data_root = resolved_data_root(config)
    source = config.loader_arguments()
    key = (config.cohort, config.backbone, data_root, config.unit, repr(sorted(source.items())), id(loader),
           config.repeat)
    if key not in _COHORT_CACHE:
        base_key = key[:-1] + (0,)
        if base_key not in _COHORT_CACHE:
            _COHORT_CACHE[base_key] = (loader or load_cohort)(config.cohort, data_root=data_root,
                                                              backbone=config.backbone, unit=config.unit, **source)
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
    return registry_columns(config, config.record_config(dim, data_root, synthetic_facts(config, data_root)))


def registry_columns(config: RunConfig, record_config: dict[str, Any]) -> dict[str, Any]:
    """A cohort's registry column mapping (``[cohorts.<name>.columns]``) is part of its cells' configuration
    (recorded and hashed) when no ``--columns`` is given; cohorts without one keep their config unchanged."""
    from benchmark.data.clinical import parse_columns
    from benchmark.data.cohorts import cohort_names, get_cohort

    registered = config.columns is None and config.cohort in cohort_names()  # a test's toy cohort is not
    mapping = dict(get_cohort(config.cohort).columns) if registered else None
    if mapping:
        record_config["columns"] = parse_columns(mapping).spec()
    return record_config


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT / SIGTERM back until the block ends (main thread only); a signal that arrived meanwhile is
    raised again right after, to the handlers that were in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


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
        record.update(_data_notes(cohort, config, result.predictions))
        if execution.save_weights:
            state = result.model.state_dict()
    except Exception as exc:  # one crashed cell must not stop the grid
        record.update(status="error", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
    record["seconds"] = time.perf_counter() - started
    with signals_deferred():  # a stop request lands after the record, never between its .pt and its .json
        store.write(record, state_dict=state)
    c = (record.get("metrics") or {}).get("c_index")
    return {"cell": config.cell.label(), "status": record["status"], "c_index": c, "seconds": record["seconds"],
            "error": (record["error"] or "").splitlines()[0] if record["error"] else None,
            "notes": record.get("notes") or []}


def _data_notes(cohort, config: RunConfig, predictions: list[dict]) -> dict[str, Any]:
    """Record fields about the fold's data: ``notes`` (a validation fold without events has no C-index) and
    ``missing_features`` (what this fold lost to slides without feature files, with ``--missing-features drop``)."""
    out: dict[str, Any] = {}
    if predictions and not any(p["event"] for p in predictions):
        out["notes"] = [NO_EVENTS_NOTE]
    dropped = (getattr(cohort, "provenance", None) or {}).get("missing_features")
    if dropped:  # the per-fold counts are those of the split files' folds (repeat 0)
        fold_row = next((r for r in dropped["folds"] if r["fold"] == config.fold), None) if not config.repeat else None
        out["missing_features"] = {"slides_dropped": dropped["slides_dropped"], "fold": fold_row}
    return out


# -------------------------------------------------------------------------------------------------------
# one cell under its lock (in this process, a local worker or a Ray task)
# -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellTask:
    """What an executor runs: one cell, the store it writes to, how it runs."""

    config: RunConfig
    root: str
    execution: Execution
    #: a cell another run finished since the grid was planned is not trained again (False with --overwrite)
    skip_if_finished: bool = True
    #: extra record fields (a tuned cell's study, ``benchmark.tuning.study``)
    annotations: dict[str, Any] | None = None


def _quiet_summary(config: RunConfig, status: str, why: str) -> dict:
    return {"cell": config.cell.label(), "status": status, "c_index": None, "seconds": None, "error": why}


def execute_cell(task: CellTask, on_epoch: Callable | None = None, loader: CohortLoader | None = None) -> dict:
    """Train and record one cell while holding its lock (``benchmark.store.lock``).

    A cell whose lock a live process holds is not computed (status ``busy``); one that another run finished
    meanwhile is not computed again (status ``skipped``).
    """
    store, config = ResultStore(task.root), task.config
    try:
        lock = CellLock(store.lock_path(config.cell), token=task.execution.token).acquire()
    except LockBusy as busy:
        return _quiet_summary(config, "busy", f"being computed by {describe_owner(busy.owner)}")
    try:
        if task.skip_if_finished:
            record, _ = finished_record(store, config.cell)
            if record is not None and stale_reason(record, config) is None:
                return _quiet_summary(config, "skipped", "finished by another run meanwhile")
        return run_cell(config, store, task.execution, on_epoch=on_epoch, loader=loader,
                        annotations=task.annotations)
    finally:
        lock.release()


def _worker_init(plugins: tuple[str, ...], threads: int = 1) -> None:
    """Once per worker process or Ray task: torch threads and the registered methods."""
    torch.set_num_threads(max(1, int(threads)))
    load_builtin_methods()
    load_plugins(plugins)


def make_executor(kind: str = "local", jobs: int = 1, execution: "Execution" = None, *, address: str | None = None,
                  cpus_per_cell: float | None = None, gpus_per_cell: float = 0.0, store_root: str | None = None,
                  loader: CohortLoader | None = None, work: Work = execute_cell,
                  shared_roots: tuple[str, ...] = ()) -> Executor:
    """The executor of a grid (``work`` = :func:`execute_cell`) or of a tuner (its study workers), built by its
    registered kind (``benchmark.execution.executors.EXECUTORS``)."""
    execution = execution or Execution()
    cpus_per_cell = cpus_per_cell or 1.0
    request = ExecutorRequest(work, jobs, _worker_init, (execution.plugins, max(1, int(cpus_per_cell))), address,
                              cpus_per_cell, gpus_per_cell, store_root, tuple(shared_roots), loader)
    return get_executor_kind(kind).build(request)


def finished_record(store: ResultStore, cell: Cell) -> tuple[dict | None, str | None]:
    """The ``ok`` record of ``cell`` and None, or None and why the cell must run (absent, failed, unreadable)."""
    try:
        record = store.read(cell)
    except ValueError as exc:
        return None, f"unreadable record ({exc})"
    if record is None:
        return None, None
    if record.get("status") != "ok":
        return None, None
    problem = store.weights_problem(record)
    if problem:  # a finished record whose weights cannot be loaded is redone, not kept
        return None, problem
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


def readable_record(store: ResultStore, cell: Cell) -> dict | None:
    try:
        return store.read(cell)
    except ValueError:
        return None


def default_results_dir(data_root: str | None, clinical: str | None = None) -> Path:
    """``results/synthetic`` for the embedded synthetic cohorts, ``results/real`` for a data root or a clinical
    table given apart."""
    return Path("results") / ("synthetic" if data_root is None and clinical is None else "real")
