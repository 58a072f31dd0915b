"""Nested, equal-budget hyper-parameter tuning with Optuna (``python -m benchmark tune``).

For every outer fold of a cell (method x cohort x backbone x seed) one Optuna study searches the method's
space (:mod:`benchmark.training.search_spaces`):

1. each trial trains on an :class:`InnerCohort`, a view of the outer fold's **training patients only**, whose
   folds are an inner cross-validation (or one inner split) by patient; the trial's score is the mean inner
   C-index. The view holds no outer-validation sample, so a trial cannot read one (``bag`` refuses it too);
2. a pruner (median or Hyperband) receives the inner C-index of every epoch through the trainer's epoch
   callback and stops poor trials (``optuna.TrialPruned``);
3. the best setting is retrained once on the whole outer training fold and evaluated on the outer validation
   fold (``runner.run_cell`` with a tuned :class:`~benchmark.training.config.RunConfig`); the record keeps the
   chosen setting and the trial history (``record["tuning"]``).

Every method gets the same budget (trials, or seconds) and the same sampler seed. Studies live in one storage,
a ``JournalStorage`` file by default (several worker processes share a study) or an RDB URL. The TPE sampler
is re-seeded before each trial from (sampler seed, finished trials, worker), so a sequential study is a
function of its history alone: a killed ``tune`` resumes (trials left RUNNING are marked FAIL and redone
with the same setting) and ends with the same choice as an uninterrupted run.
"""
from __future__ import annotations

import fcntl
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import pandas as pd
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from benchmark.data.labels import assign_bins, quantile_edges
from benchmark.data.loader import Fold
from benchmark.data.splits import stratified_patient_folds
from benchmark.store.records import config_hash
from benchmark.training.config import RunConfig
from benchmark.training.search_spaces import SearchSpace, split_setting
from benchmark.training.trainer import patient_inner_split, train_fold

BUDGETS = ("trials", "time")
PRUNERS = ("median", "hyperband", "none")
#: Trial states that count towards a trial budget (a FAIL trial is redone, not counted).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DEFAULT_STORAGE_NAME = "optuna.journal"


class NestingError(RuntimeError):
    """A trial asked for a sample outside its outer training fold."""


# -------------------------------------------------------------------------------------------------------
# the protocol
# -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuningSettings:
    """How every method is tuned (one protocol for a whole comparison).

    Attributes
    ----------
    budget : {"trials", "time"}
        Finish each study after ``trials`` finished trials, or after ``timeout_per_method`` seconds of trials
        per method (split evenly over its outer folds).
    trials : int
        Finished (complete or pruned) trials per outer fold with ``budget="trials"``.
    timeout_per_method : float or None
        Seconds per method with ``budget="time"``.
    sampler_seed : int
        Seed of the TPE sampler, the same for every method.
    pruner : {"median", "hyperband", "none"}
    inner_folds : int
        Inner cross-validation folds of each outer training fold (1 = one stratified inner split of
        ``recipe.inner_fraction``).
    """

    budget: str = "trials"
    trials: int = 30
    timeout_per_method: float | None = None
    sampler_seed: int = 0
    pruner: str = "median"
    inner_folds: int = 3

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"--budget: {self.budget!r} is not one of {', '.join(BUDGETS)}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"--pruner: {self.pruner!r} is not one of {', '.join(PRUNERS)}")
        if self.budget == "trials" and self.trials < 1:
            raise ValueError("--trials must be >= 1")
        if self.budget == "time" and not (self.timeout_per_method and self.timeout_per_method > 0):
            raise ValueError("--budget time needs --timeout-per-method SECONDS (> 0)")
        if self.inner_folds < 1:
            raise ValueError("--inner-folds must be >= 1")

    @property
    def startup_trials(self) -> int:
        """Random trials before TPE models the history (Optuna's 10, fewer for small budgets)."""
        return 10 if self.budget == "time" else min(10, max(3, self.trials // 3))

    def describe(self) -> str:
        """The budget in words, for table footers."""
        amount = (f"{self.trials} trials per outer fold" if self.budget == "trials"
                  else f"{self.timeout_per_method:g} s per method")
        inner = "one inner split" if self.inner_folds == 1 else f"inner {self.inner_folds}-fold CV"
        return (f"TPE sampler (seed {self.sampler_seed}), {amount}, {inner} of each outer training fold by "
                f"patient, {self.pruner} pruner")

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "trials": self.trials if self.budget == "trials" else None,
                "timeout_per_method": self.timeout_per_method if self.budget == "time" else None,
                "sampler": "TPESampler", "sampler_seed": self.sampler_seed, "pruner": self.pruner,
                "inner_folds": self.inner_folds, "startup_trials": self.startup_trials}

    def protocol_id(self, space: SearchSpace) -> str:
        """Readable id of this protocol on one method's space, e.g. ``30t-s0-1a2b3c``."""
        amount = f"{self.trials}t" if self.budget == "trials" else f"{self.timeout_per_method:g}s"
        digest = config_hash({**self.to_dict(), "space": space.to_dict()})[:6]
        return f"{amount}-s{self.sampler_seed}-{digest}"


# -------------------------------------------------------------------------------------------------------
# the nested view
# -------------------------------------------------------------------------------------------------------
class InnerCohort:
    """The training patients of one outer fold, seen as a cohort whose folds are inner folds.

    It follows the data contract the trainer uses (``samples``, ``folds``, ``in_dim``, ``bag``, ``bins``), holds
    the labels of the outer training samples only, and refuses a bag outside them (:class:`NestingError`).
    Bin edges are fitted on the inner training fold (``rule="train"``) or on the outer training fold
    (any other rule): never on an outer-validation label.
    """

    def __init__(self, cohort, outer_fold: int, n_folds: int, seed: int, fraction: float) -> None:
        fold = cohort.folds[outer_fold]
        self._cohort, self._allowed = cohort, set(fold.train)
        self.samples = cohort.samples.loc[list(fold.train)].copy()
        self.in_dim = cohort.in_dim
        self.name = f"{getattr(cohort, 'name', 'cohort')} fold {outer_fold} training patients"
        self.provenance = dict(getattr(cohort, "provenance", {}) or {})
        self.folds = inner_folds(self.samples, n_folds, seed, fraction)

    def bag(self, sample_id: str, needs):
        if sample_id not in self._allowed:
            raise NestingError(f"{self.name}: a trial asked for {sample_id!r}, outside the outer training fold")
        return self._cohort.bag(sample_id, needs)

    def bins(self, fold: Fold | int, rule: str | None = "train", n_bins: int = 4) -> tuple[np.ndarray, pd.Series]:
        fold = self.folds[fold] if isinstance(fold, int) else fold
        ref = self.samples.loc[list(fold.train)] if rule in (None, "train") else self.samples
        edges = _patient_edges(ref, n_bins, self.name)
        return edges, pd.Series(assign_bins(self.samples["time"], edges), index=self.samples.index, name="bin")


def _patient_edges(samples: pd.DataFrame, n_bins: int, source: str) -> np.ndarray:
    """Bin edges from one row per patient."""
    per_patient = samples.drop_duplicates("patient_id") if "patient_id" in samples.columns else samples
    return quantile_edges(per_patient["time"], per_patient["event"], n_bins, source=source)


def inner_folds(samples: pd.DataFrame, n_folds: int, seed: int, fraction: float) -> list[Fold]:
    """Inner folds of the samples of one outer training fold, by patient.

    ``n_folds`` >= 2: a patient-level K-fold stratified by event and time (the splitter of the outer folds);
    1: one inner split holding out ``fraction`` of the patients, stratified by (time bin, censorship).
    """
    ids = [str(s) for s in samples.index]
    patient_of = samples["patient_id"].astype(str) if "patient_id" in samples.columns else pd.Series(ids, ids)
    if n_folds == 1:
        bins = assign_bins(samples["time"], _patient_edges(samples, 4, "inner split"))
        strata = list(zip(bins.tolist(), samples["censorship"].astype(int).tolist()))
        fit, held = patient_inner_split(samples, ids, strata, fraction, seed)
        return [Fold(0, fit, held)]
    patients = samples.assign(_p=patient_of.values).drop_duplicates("_p").set_index("_p")[["time", "event"]]
    folds = []
    for k, (train_patients, val_patients) in enumerate(stratified_patient_folds(patients, n_folds, seed)):
        train_set, val_set = set(train_patients), set(val_patients)
        folds.append(Fold(k, [s for s in ids if patient_of[s] in train_set], [s for s in ids if patient_of[s] in val_set]))
    return folds


# -------------------------------------------------------------------------------------------------------
# one trial
# -------------------------------------------------------------------------------------------------------
def trial_config(base: RunConfig, setting: dict[str, Any], inner_fold: int) -> RunConfig:
    """The configuration of one trial on one inner fold: the outer cell's settings with the trial's setting."""
    recipe_part, options = split_setting(setting)
    return base.with_(fold=inner_fold, tuning=None, tuned=(),
                      overrides={**dict(base.overrides), **recipe_part},
                      method_options={**dict(base.method_options), **options})


def _pruning_callback(trial: optuna.Trial, inner_fold: int, epochs: int, enabled: bool) -> Callable:
    """The trainer's ``on_epoch``: report the inner C-index at step ``inner_fold * epochs + epoch``, prune."""

    def on_epoch(epoch: int, _epochs: int, info: dict) -> None:
        value = info.get("val_c_index")
        if not enabled or value is None or not math.isfinite(value):
            return
        trial.report(float(value), inner_fold * epochs + epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"inner fold {inner_fold}, epoch {epoch}: inner C-index {value:.3f}")

    return on_epoch


def make_objective(view: InnerCohort, base: RunConfig, space: SearchSpace, prune: bool,
                   device: str = "auto") -> Callable[[optuna.Trial], float]:
    """The objective of one outer fold's study: mean inner C-index of a setting over the inner folds."""

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        setting = space.suggest(trial)
        scores = []
        for j in range(len(view.folds)):
            config = trial_config(base, setting, j)
            on_epoch = _pruning_callback(trial, j, config.resolved_recipe().epochs, prune)
            result = train_fold(view, config, device=device, on_epoch=on_epoch, score_val_each_epoch=prune)
            scores.append(float(result.metrics["c_index"]))
        trial.set_user_attr("inner_c_index", scores)
        finite = [s for s in scores if math.isfinite(s)]
        return float(np.mean(finite)) if finite else float("nan")  # NaN: Optuna records a FAIL

    return objective


# -------------------------------------------------------------------------------------------------------
# studies
# -------------------------------------------------------------------------------------------------------
class ProcessFileLock(JournalFileOpenLock):
    """Journal-file lock held through ``fcntl.flock``: the operating system releases it when its holder dies.

    (It subclasses Optuna's public ``JournalFileOpenLock`` for the lock interface and replaces its mechanism.)

    Optuna's default symlink lock, left behind by a worker killed while appending, blocks every other process
    for its 30-s grace period; a killed ``tune`` must not. (``flock`` is local to one machine: share a study
    across machines through an RDB URL.)
    """

    def __init__(self, journal_path: str) -> None:  # noqa: super().__init__ not called: another mechanism
        self._path, self._fd = journal_path + ".flock", None

    def acquire(self) -> bool:
        self._fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def open_storage(spec: str | None, results_root) -> Any:
    """The study storage: an RDB URL (``sqlite:///...``, ``postgresql://...``) or a journal file (default
    ``<results>/tuning/optuna.journal``), which several worker processes can share."""
    if spec and "://" in spec:
        return optuna.storages.RDBStorage(spec)
    path = Path(spec) if spec else Path(results_root) / "tuning" / DEFAULT_STORAGE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=ProcessFileLock(str(path))))


def study_name(config: RunConfig, protocol: str) -> str:
    """One study per outer fold of a cell and protocol (the base configuration's store key included)."""
    c = config.cell
    repeat = f"|r{config.repeat}" if config.repeat else ""
    return f"{c.method}|{c.cohort}|{c.backbone}|{c.recipe}|{c.selection}|s{c.seed}{repeat}|fold{c.fold}|{protocol}"


def make_pruner(settings: TuningSettings, max_steps: int) -> optuna.pruners.BasePruner:
    """Median (after the startup trials, from the second step) or Hyperband over inner-fold x epoch steps."""
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials, n_warmup_steps=1)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, max_steps), reduction_factor=3)
    return optuna.pruners.NopPruner()


def seeded_sampler(settings: TuningSettings, study: optuna.Study, worker: int = 0) -> optuna.samplers.TPESampler:
    """A TPE sampler seeded from (sampler seed, finished trials, worker): the next setting depends only on
    the study's history, so a resumed study continues exactly as an uninterrupted one."""
    n_finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    seed = int(np.random.SeedSequence([settings.sampler_seed, n_finished, worker]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials)


def open_study(name: str, storage, settings: TuningSettings, max_steps: int, worker: int = 0) -> optuna.Study:
    """Create or load a study (maximising the inner C-index) with the seeded sampler and the pruner."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=make_pruner(settings, max_steps))
    study.sampler = seeded_sampler(settings, study, worker)
    return study


def _worker_alive(trial: optuna.trial.FrozenTrial) -> bool:
    worker = trial.user_attrs.get("worker") or {}
    if worker.get("host") != socket.gethostname() or not worker.get("pid") or worker["pid"] == os.getpid():
        return False
    try:
        os.kill(int(worker["pid"]), 0)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    return True


def recover_interrupted(study: optuna.Study, storage, space: SearchSpace) -> list[int]:
    """Mark the trials a killed run left RUNNING as FAIL and enqueue their settings again.

    A trial whose worker process is still alive on this machine is left alone. A trial killed before its
    whole setting was drawn is not enqueued: the re-seeded sampler draws that same setting again, whereas
    fixing the part drawn would shift the draws of the rest. Returns the trial numbers redone.
    (``set_trial_state_values`` is the call Optuna's own ``fail_stale_trials`` makes.)
    """
    redone = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _worker_alive(trial):
            continue
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        if set(trial.params) == {p.name for p in space.params}:
            study.enqueue_trial(dict(trial.params), user_attrs={"redo_of": trial.number})
        redone.append(trial.number)
    return redone


def trials_spent_seconds(study: optuna.Study) -> float:
    """Seconds spent in the study's ended trials (a time budget resumes from here)."""
    total = 0.0
    for t in study.get_trials(deepcopy=False, states=FINISHED + (TrialState.FAIL,)):
        if t.datetime_start and t.datetime_complete:
            total += (t.datetime_complete - t.datetime_start).total_seconds()
    return total


def budget_left(study: optuna.Study, settings: TuningSettings, n_outer_folds: int) -> tuple[int | None, float | None]:
    """(finished trials still to run, seconds still to spend); None where the budget does not limit."""
    if settings.budget == "trials":
        return max(0, settings.trials - len(study.get_trials(deepcopy=False, states=FINISHED))), None
    per_study = float(settings.timeout_per_method) / max(1, n_outer_folds)
    return None, max(0.0, per_study - trials_spent_seconds(study))


def study_done(study: optuna.Study, settings: TuningSettings, n_outer_folds: int) -> bool:
    trials_left, seconds_left = budget_left(study, settings, n_outer_folds)
    return (trials_left == 0) if settings.budget == "trials" else (seconds_left is not None and seconds_left <= 0)


# -------------------------------------------------------------------------------------------------------
# running a study
# -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyTask:
    """One outer fold of one cell to tune: everything a worker process needs (picklable).

    Attributes
    ----------
    config : RunConfig
        The untuned outer cell (its fold is the outer fold).
    space : SearchSpace
    settings : TuningSettings
    storage : str or None
        Journal file or RDB URL (None: ``<results>/tuning/optuna.journal``).
    results : str
        Result-store root.
    n_outer_folds : int
        Outer folds of the cohort (a time budget is split over them).
    """

    config: RunConfig
    space: SearchSpace
    settings: TuningSettings
    storage: str | None
    results: str
    n_outer_folds: int
    device: str = "auto"
    plugins: tuple[str, ...] = ()

    @property
    def protocol(self) -> str:
        return self.settings.protocol_id(self.space)

    @property
    def name(self) -> str:
        return study_name(self.config, self.protocol)

    @property
    def max_steps(self) -> int:
        """Pruning steps of one trial: inner folds x epochs."""
        return self.settings.inner_folds * self.config.resolved_recipe().epochs

    def user_attrs(self) -> dict[str, Any]:
        """What ``run --tuned`` needs to rebuild this task from the study alone."""
        return {"protocol": self.settings.to_dict(), "protocol_id": self.protocol, "space": self.space.to_dict(),
                "method": self.space.method, "n_outer_folds": self.n_outer_folds, "config": self.config.to_dict()}


def _budget_callbacks(task: StudyTask, worker: int, log: Callable[[str], None] | None) -> list[Callable]:
    """After each trial: report it, stop at the budget (or when trials keep failing), re-seed the sampler."""
    settings = task.settings

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if log is not None:
            log(trial_line(trial))
        failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        if study_done(study, settings, task.n_outer_folds) or failed >= max(5, settings.trials):
            study.stop()
        study.sampler = seeded_sampler(settings, study, worker)

    return [after_trial]


def trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """One line per ended trial, for the console."""
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else 0.0
    steps = len(trial.intermediate_values)
    if trial.state == TrialState.PRUNED:  # Optuna keeps the last reported value as a pruned trial's value
        value = f"at step {steps} (inner C-index {trial.value:.3f} there)" if trial.value is not None else ""
    else:
        value = f"inner C-index {trial.value:.3f}" if trial.value is not None else f"{steps} step(s)"
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"    trial {trial.number:3d} {trial.state.name.lower():8s} {value} ({seconds:.1f} s)  {params}"


def optimize(task: StudyTask, worker: int = 0, log: Callable[[str], None] | None = None, loader=None) -> None:
    """Run trials of ``task``'s study in this process until its budget is spent (resuming where it stopped)."""
    from benchmark.training.runner import get_cohort_data

    storage = open_storage(task.storage, task.results)
    study = open_study(task.name, storage, task.settings, task.max_steps, worker)
    if study_done(study, task.settings, task.n_outer_folds):
        return
    cohort = get_cohort_data(task.config, loader)
    recipe = task.config.resolved_recipe()
    view = InnerCohort(cohort, task.config.fold, task.settings.inner_folds, task.config.seed, recipe.inner_fraction)
    objective = make_objective(view, task.config, task.space, task.settings.pruner != "none", task.device)
    # No ``timeout``: a time budget counts the seconds spent in trials (what a resumed run can add up from the
    # storage), checked after every trial by the budget callback.
    study.optimize(objective, callbacks=_budget_callbacks(task, worker, log), catch=(Exception,), gc_after_trial=True)


def prepare_study(task: StudyTask) -> tuple[optuna.Study, list[int]]:
    """Create or load the study, record how it was set up, and recover what a killed run left RUNNING."""
    storage = open_storage(task.storage, task.results)
    study = open_study(task.name, storage, task.settings, task.max_steps)
    for key, value in task.user_attrs().items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    return study, recover_interrupted(study, storage, task.space)


def _worker_optimize(task: StudyTask, worker: int) -> None:
    import torch

    from benchmark.training.registry import load_builtin_methods, load_plugins

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_builtin_methods()
    load_plugins(task.plugins)
    optimize(task, worker, log=lambda line: print(line, flush=True))


def run_study(task: StudyTask, jobs: int = 1, log: Callable[[str], None] | None = None, loader=None) -> optuna.Study:
    """Tune one outer fold: prepare (and resume) the study, then run trials in this process (``jobs=1``,
    reproducible) or in ``jobs`` worker processes sharing the study through its storage."""
    study, redone = prepare_study(task)
    if redone and log is not None:
        log(f"    resumed: trial(s) {redone} were left RUNNING by a killed run; marked FAIL and queued again")
    if jobs <= 1:
        optimize(task, 0, log, loader)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            for future in [pool.submit(_worker_optimize, task, w) for w in range(jobs)]:
                future.result()
    return optuna.load_study(study_name=task.name, storage=open_storage(task.storage, task.results))


# -------------------------------------------------------------------------------------------------------
# the chosen setting
# -------------------------------------------------------------------------------------------------------
def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The complete trial with the best inner C-index (a clear error when none completed)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        raise RuntimeError(f"study {study.study_name}: no trial completed ({len(states)} trial(s): "
                           f"{', '.join(sorted(set(states))) or 'none'}); see the trial warnings above")
    return study.best_trial


def tuned_config(config: RunConfig, study: optuna.Study, protocol: str) -> RunConfig:
    """The outer cell with the study's best setting: what is retrained on the whole outer training fold."""
    return config.with_(tuning=protocol, tuned=dict(best_trial(study).params))


def trial_history(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial of the study: number, state, setting, inner C-index (mean and per inner fold), steps."""
    out = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        out.append({"number": t.number, "state": t.state.name, "params": dict(t.params), "value": t.value,
                    "inner_c_index": t.user_attrs.get("inner_c_index"), "steps": len(t.intermediate_values),
                    "seconds": seconds, "redo_of": t.user_attrs.get("redo_of")})
    return out


def tuning_record(task: StudyTask, study: optuna.Study) -> dict[str, Any]:
    """What a tuned cell's record stores under ``tuning``: protocol, budget, choice and trial history."""
    best = best_trial(study)
    history = trial_history(study)
    count = lambda state: sum(1 for t in history if t["state"] == state)  # noqa: E731
    return {
        "id": task.protocol, "study": task.name, "storage": task.storage or f"{task.results}/tuning/{DEFAULT_STORAGE_NAME}",
        "protocol": task.settings.to_dict(), "budget": task.settings.describe(), "space": task.space.to_dict(),
        "best": {"number": best.number, "params": dict(best.params), "inner_c_index": best.value},
        "n_complete": count("COMPLETE"), "n_pruned": count("PRUNED"), "n_failed": count("FAIL"),
        "trial_seconds": trials_spent_seconds(study), "trials": history,
    }


@dataclass
class TunedCell:
    """A finished study and the tuned configuration of its outer fold."""

    task: StudyTask
    study: optuna.Study
    config: RunConfig = field(init=False)

    def __post_init__(self) -> None:
        self.config = tuned_config(self.task.config, self.study, self.task.protocol)

    def annotations(self) -> dict[str, Any]:
        return {"tuning": tuning_record(self.task, self.study)}


def retrain(cell: TunedCell, store, execution, overwrite: bool = False, loader=None) -> dict:
    """Train the chosen setting on the whole outer training fold and evaluate it on the outer validation fold
    (skipped when the store already holds that exact tuned cell)."""
    from benchmark.training.runner import plan_grid, run_cell

    plan = plan_grid([cell.config], store, overwrite)
    if plan.skipped:
        return {"cell": cell.config.cell.label(), "status": "skipped", "c_index": None, "seconds": 0.0, "error": None}
    return run_cell(cell.config, store, execution, loader=loader, annotations=cell.annotations())


# -------------------------------------------------------------------------------------------------------
# finding a finished tuning (``run --tuned``)
# -------------------------------------------------------------------------------------------------------
def task_from_study(study: optuna.Study, config: RunConfig, storage: str | None, results: str,
                    device: str = "auto", plugins: tuple[str, ...] = ()) -> StudyTask:
    """Rebuild the task of a study from what :func:`prepare_study` recorded in it."""
    from benchmark.training.search_spaces import parse_param

    attrs = study.user_attrs
    p = attrs["protocol"]
    settings = TuningSettings(budget=p["budget"], trials=p["trials"] or 1, timeout_per_method=p["timeout_per_method"],
                              sampler_seed=p["sampler_seed"], pruner=p["pruner"], inner_folds=p["inner_folds"])
    params = tuple(parse_param(n, spec, "stored search space") for n, spec in sorted(attrs["space"].items()))
    return StudyTask(config, SearchSpace(attrs["method"], params), settings, storage, results,
                     int(attrs["n_outer_folds"]), device, plugins)


def find_tuned(config: RunConfig, storage: str | None, results: str, protocol: str | None = None,
               device: str = "auto", plugins: tuple[str, ...] = ()) -> TunedCell:
    """The finished tuning of an outer cell in ``storage``.

    Raises
    ------
    ValueError
        No study for the cell, several protocols and no ``protocol`` chosen, or a study whose budget is not
        spent yet (resume it with ``tune``).
    """
    backend = open_storage(storage, results)
    prefix = study_name(config, "")
    names = [n for n in optuna.get_all_study_names(backend) if n.startswith(prefix)]
    if protocol is not None:
        names = [n for n in names if n == prefix + protocol]
    where = storage or f"{results}/tuning/{DEFAULT_STORAGE_NAME}"
    if not names:
        raise ValueError(f"no tuning of {config.cell.label()} in {where}: run `python -m benchmark tune` first")
    if len(names) > 1:
        ids = ", ".join(n[len(prefix):] for n in names)
        raise ValueError(f"{config.cell.label()} was tuned under several protocols ({ids}); choose one with --tuning")
    study = optuna.load_study(study_name=names[0], storage=backend)
    task = task_from_study(study, config, storage, results, device, plugins)
    if not study_done(study, task.settings, task.n_outer_folds):
        n = len(study.get_trials(deepcopy=False, states=FINISHED))
        raise ValueError(f"the tuning of {config.cell.label()} is unfinished ({n} trial(s) done; "
                         f"{task.settings.describe()}): resume it with `python -m benchmark tune`")
    return TunedCell(task, study)
