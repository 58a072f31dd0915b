"""Nested, equal-budget hyper-parameter tuning with Optuna (``python -m benchmark tune``).

For every outer fold of a cell (method x cohort x backbone x seed) one Optuna study searches the method's
space (:mod:`benchmark.tuning.search_spaces`):

1. each trial trains on an :class:`InnerCohort`, a view of the outer fold's **training patients only**, whose
   folds are an inner cross-validation (or one inner split) by patient; the trial's score is the mean inner
   C-index. The view holds no outer-validation sample, so a trial cannot read one (``bag`` refuses it too);
2. a pruner (median or Hyperband) receives the inner C-index of every epoch through the trainer's epoch
   callback and stops poor trials (``optuna.TrialPruned``);
3. the best setting is retrained once on the whole outer training fold and evaluated on the outer validation
   fold (``benchmark.execution.cells.run_cell`` with a tuned :class:`~benchmark.settings.config.RunConfig`); the record keeps the
   chosen setting and the trial history (``record["tuning"]``).

Every method gets the same budget (trials, or seconds) and the same sampler seed. Studies live in one storage,
a ``JournalStorage`` file by default or an RDB URL. :class:`StudyScheduler` runs each study's workers (and then
its retrain) on the executor cells use (:mod:`benchmark.execution.executors`: this process, local worker
processes or Ray tasks); the workers share the study through its storage and only run the trials queued for
its budget (:func:`add_slots`, :func:`next_trial`), so it never runs past it. The TPE sampler is re-seeded
before each trial from (sampler seed, finished trials, worker), so a sequential study is a function of its
history alone: a killed ``tune`` resumes (trials left RUNNING are marked FAIL and redone with the same setting)
and ends with the same choice as an uninterrupted run.
"""
from __future__ import annotations

import fcntl
import gc
import math
import os
import socket
import time
import uuid
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
from benchmark.store.records import ResultStore, config_hash
from benchmark.settings.config import RunConfig
from benchmark.tuning.search_spaces import SearchSpace, split_setting
from benchmark.fitting.trainer import patient_inner_split, train_fold

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
        setting = space.suggest(trial)
        scores = []
        for j in range(len(view.folds)):
            config = trial_config(base, setting, j)
            on_epoch = _pruning_callback(trial, j, config.resolved_recipe().epochs, prune)
            result = train_fold(view, config, device=device, on_epoch=on_epoch, score_val_each_epoch=prune)
            scores.append(float(result.metrics["c_index"]))
        trial.set_user_attr("inner_c_index", scores)
        finite = [s for s in scores if math.isfinite(s)]
        return float(np.mean(finite)) if finite else float("nan")  # NaN: recorded as a FAIL

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


def failed_trials(study: optuna.Study) -> int:
    """Trials that failed by themselves (an exception, no finite score); those a stopped or killed worker left
    (``interrupted``) are not counted."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
               if not t.user_attrs.get("interrupted"))


def seeded_sampler(settings: TuningSettings, study: optuna.Study, worker: int = 0) -> optuna.samplers.TPESampler:
    """A TPE sampler seeded from (sampler seed, finished trials, worker, and the trials that failed by themselves
    when there are any): the next setting depends only on the study's history, so a resumed study continues
    exactly as an uninterrupted one, and a setting that failed is not drawn again."""
    n_finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    n_failed = failed_trials(study)
    entropy = [settings.sampler_seed, n_finished, worker] + ([n_failed] if n_failed else [])
    seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
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


def requeue(study: optuna.Study, number: int, params: dict[str, Any], space: SearchSpace) -> None:
    """Queue the redo of trial ``number``: its setting when it was drawn whole, else an empty trial whose setting
    the re-seeded sampler draws (the same one: fixing the part drawn would shift the draws of the rest)."""
    whole = set(params) == {p.name for p in space.params}
    study.enqueue_trial(dict(params) if whole else {}, user_attrs={"redo_of": number})


def recover_interrupted(study: optuna.Study, storage, space: SearchSpace, run_token: str | None = None) -> list[int]:
    """Mark the trials that dead workers left RUNNING as FAIL (``interrupted``) and queue their redo.

    A trial is left alone while its worker process is alive on this machine, unless it belongs to the run
    ``run_token`` (whose workers have all returned when this is called). A trial of a worker on another machine
    counts as dead: one ``tune`` works on a study at a time. Returns the trial numbers redone.
    (``set_trial_state_values`` is the call Optuna's own ``fail_stale_trials`` makes.)
    """
    redone = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ours = run_token is not None and (trial.user_attrs.get("worker") or {}).get("run") == run_token
        if not ours and _worker_alive(trial):
            continue
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        requeue(study, trial.number, trial.params, space)
        redone.append(trial.number)
    return redone


def add_slots(study: optuna.Study, settings: TuningSettings) -> int:
    """With a trial budget, queue empty WAITING trials until finished + running + queued trials equal it.

    Workers only run queued trials (:func:`next_trial`), each taken by exactly one worker, so however many
    workers share the study, it never runs past its budget. Returns the trials queued.
    """
    if settings.budget != "trials":
        return 0
    counted = len(study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING, TrialState.WAITING)))
    for _ in range(settings.trials - counted):
        study.enqueue_trial({})
    return max(0, settings.trials - counted)


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


def study_failing(study: optuna.Study, settings: TuningSettings) -> bool:
    """Trials keep failing by themselves: the study gives up (its workers stop)."""
    return failed_trials(study) >= max(5, settings.trials)


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

    def load_study(self) -> tuple[optuna.Study, Any]:
        """The study (it must exist) and its storage."""
        storage = open_storage(self.storage, self.results)
        return optuna.load_study(study_name=self.name, storage=storage), storage


def trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """One line per ended trial, for the console."""
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else 0.0
    steps = len(trial.intermediate_values)
    if trial.state == TrialState.PRUNED:  # Optuna keeps the last reported value as a pruned trial's value
        value = f"at step {steps} (inner C-index {trial.value:.3f} there)" if trial.value is not None else ""
    else:
        value = f"inner C-index {trial.value:.3f}" if trial.value is not None else f"{steps} step(s)"
    state = trial.state.name.lower()
    return f"    trial {trial.number:3d} {state:8s} {value} ({seconds:.1f} s)  {setting_text(trial.params)}"


def setting_text(setting) -> str:
    """``lr=0.0003, hidden=256`` (a dict or (name, value) pairs)."""
    items = setting.items() if isinstance(setting, dict) else setting
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def next_trial(study: optuna.Study, settings: TuningSettings) -> optuna.Trial | None:
    """The next trial for this worker: a queued one (redone trials first), or None when none is left.

    The storage hands each queued trial to one worker only (the WAITING -> RUNNING change succeeds once, as in
    Optuna's own ``Study.ask``; ``study._storage`` is the storage the study writes through). With a time budget
    a worker starts a new trial when nothing is queued.
    """
    queued = sorted(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)),
                    key=lambda t: ("redo_of" not in t.user_attrs, t.number))
    for frozen in queued:
        try:
            if study._storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker took and finished it meanwhile
            continue
    return study.ask() if settings.budget == "time" else None


def run_trial(study: optuna.Study, trial: optuna.Trial, objective: Callable, space: SearchSpace,
              log: Callable[[str], None] | None = None) -> optuna.trial.FrozenTrial:
    """Run one trial and record how it ended: complete, pruned, or failed (an exception or no finite score).

    A stop request (Ctrl-C, or the SIGTERM of a stopping executor) marks the trial FAIL (``interrupted``), queues
    its redo and goes on stopping, so the study stays consistent.
    """
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED)
    except Exception as exc:  # noqa: BLE001 (one failed trial must not stop the study)
        if log is not None:
            log(f"    trial {trial.number} failed: {_first_line(exc)}")
        return study.tell(trial, state=TrialState.FAIL)
    except BaseException:
        _abandon(study, trial, space)
        raise
    if not math.isfinite(value):
        if log is not None:
            log(f"    trial {trial.number} failed: no finite inner C-index")
        return study.tell(trial, state=TrialState.FAIL)
    return study.tell(trial, value)


def _abandon(study: optuna.Study, trial: optuna.Trial, space: SearchSpace) -> None:
    try:
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        requeue(study, trial.number, trial.params, space)
    except Exception:  # noqa: BLE001 (the next run recovers a trial left RUNNING)
        pass


def optimize(task: StudyTask, worker: int = 0, log: Callable[[str], None] | None = None, loader=None,
             run_token: str | None = None) -> int:
    """Run trials of ``task``'s study in this process until none is queued (trial budget), the time is spent
    (time budget) or trials keep failing; returns the number of trials run here."""
    from benchmark.execution.cells import get_cohort_data

    storage = open_storage(task.storage, task.results)
    study = open_study(task.name, storage, task.settings, task.max_steps, worker)
    if study_done(study, task.settings, task.n_outer_folds) or study_failing(study, task.settings):
        return 0
    cohort = get_cohort_data(task.config, loader)
    recipe = task.config.resolved_recipe()
    view = InnerCohort(cohort, task.config.fold, task.settings.inner_folds, task.config.seed, recipe.inner_fraction)
    objective = make_objective(view, task.config, task.space, task.settings.pruner != "none", task.device)
    ran = 0
    while not (study_done(study, task.settings, task.n_outer_folds) or study_failing(study, task.settings)):
        trial = next_trial(study, task.settings)
        if trial is None:
            break
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "run": run_token})
        frozen = run_trial(study, trial, objective, task.space, log)
        ran += 1
        if log is not None:
            log(trial_line(frozen))
        failed = frozen.state == TrialState.FAIL and task.settings.budget == "trials"
        if failed and not study_failing(study, task.settings):
            study.enqueue_trial({}, user_attrs={"redo_of": frozen.number})  # a finished trial in its place
        study.sampler = seeded_sampler(task.settings, study, worker)
        gc.collect()
    return ran


def prepare_study(task: StudyTask) -> tuple[optuna.Study, list[int]]:
    """Create or load the study, record how it was set up, recover what a killed run left RUNNING and queue
    the trials still to run (:func:`add_slots`)."""
    storage = open_storage(task.storage, task.results)
    study = open_study(task.name, storage, task.settings, task.max_steps)
    for key, value in task.user_attrs().items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    redone = recover_interrupted(study, storage, task.space)
    add_slots(study, task.settings)
    return study, redone


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
    (skipped when the store already holds that exact tuned cell), under the cell's lock like every cell."""
    from benchmark.execution.cells import CellTask, execute_cell
    from benchmark.execution.grid import plan_grid

    plan = plan_grid([cell.config], store, overwrite)
    if plan.skipped:
        return {"cell": cell.config.cell.label(), "status": "skipped", "c_index": None, "seconds": 0.0, "error": None}
    task = CellTask(cell.config, str(store.root), execution, skip_if_finished=not overwrite,
                    annotations=cell.annotations())
    return execute_cell(task, loader=loader)


# -------------------------------------------------------------------------------------------------------
# study workers and retrains on an executor
# -------------------------------------------------------------------------------------------------------
#: Rounds of workers a study gets in one ``tune`` (a round ends when all its workers have returned).
MAX_ROUNDS = 3


@dataclass(frozen=True)
class StudyJob:
    """What an executor runs for the tuner: a study worker (``worker`` >= 0), or the retrain of the study's
    choice (``worker`` None) with ``execution``."""

    task: StudyTask
    worker: int | None = None
    run_token: str | None = None
    round: int = 1
    execution: Any = None
    overwrite: bool = False

    @property
    def key(self) -> str:
        what = "retrain" if self.worker is None else f"worker {self.round}.{self.worker}"
        return f"{self.task.name} {what}"


def _print_line(line: str) -> None:
    print(line, flush=True)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def run_study_job(job: StudyJob, on_epoch=None, loader=None, log: Callable[[str], None] | None = _print_line) -> dict:
    """The work of the tuner's executor (module level: pickled to worker processes and Ray tasks): run trials of
    the study as worker ``job.worker`` until none is left, or retrain its choice. Returns a summary; never
    raises on a failure (its summary says it)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if job.worker is None:
        return _retrain_job(job, loader)
    started = time.perf_counter()
    try:
        ran = optimize(job.task, job.worker, log, loader, job.run_token)
    except Exception as exc:  # noqa: BLE001 (reported by the scheduler; the study is redone or resumed)
        return {"cell": job.key, "status": "error", "c_index": None, "seconds": time.perf_counter() - started,
                "error": _first_line(exc), "trials": 0}
    return {"cell": job.key, "status": "ok", "c_index": None, "seconds": time.perf_counter() - started,
            "error": None, "trials": ran}


def _retrain_job(job: StudyJob, loader=None) -> dict:
    label = job.task.config.cell.label()
    try:
        study, _ = job.task.load_study()
        cell = TunedCell(job.task, study)
        summary = retrain(cell, ResultStore(job.task.results), job.execution, job.overwrite, loader)
    except Exception as exc:  # noqa: BLE001 (e.g. no trial completed)
        return {"cell": label, "status": "error", "c_index": None, "seconds": None, "setting": "",
                "error": _first_line(exc)}
    return {**summary, "setting": setting_text(cell.config.tuned)}


class TuningInterrupted(Exception):
    """SIGINT / SIGTERM stopped the tuner; ``tuned`` of ``total`` outer folds were finished."""

    def __init__(self, tuned: int, total: int) -> None:
        self.tuned, self.total = tuned, total
        super().__init__(f"{tuned} of {total} outer fold(s) tuned; finished trials are kept: rerun the same command "
                         "to resume")


@dataclass
class _StudyRun:
    task: StudyTask
    started: float
    workers: int = 0
    rounds: int = 0
    errors: list[str] = field(default_factory=list)


def study_line(study: optuna.Study) -> str:
    """How a study stands, in one line."""
    count = lambda state: len(study.get_trials(deepcopy=False, states=(state,)))  # noqa: E731
    best = study.best_trial if count(TrialState.COMPLETE) else None
    choice = f"; best inner C-index {best.value:.3f} (trial {best.number})" if best is not None else ""
    return (f"    {count(TrialState.COMPLETE)} complete, {count(TrialState.PRUNED)} pruned, {count(TrialState.FAIL)} "
            f"failed trial(s){choice}")


class StudyScheduler:
    """Runs the studies of a ``tune`` on an executor (:mod:`benchmark.execution.executors`, the one cells use).

    Each study gets ``jobs`` workers (:class:`StudyJob`, each :func:`optimize` on the shared study storage); when
    they have all returned, the study is either done (its retrain is queued, ahead of other work) or short
    (a worker died: the trials it left RUNNING are marked FAIL and redone by another round of workers, up to
    :data:`MAX_ROUNDS`). Jobs are submitted while the executor has room (its ``parallelism``), so a cluster runs
    several studies at once. Without an ``execution`` the studies are tuned and nothing is retrained.
    """

    def __init__(self, executor, jobs: int = 1, execution=None, overwrite: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.executor, self.jobs, self.execution, self.overwrite = executor, max(1, int(jobs)), execution, overwrite
        self.log = log or (lambda line: None)
        self.run_token = uuid.uuid4().hex
        self.todo: list[StudyTask] = []
        self.ready: list[StudyJob] = []
        self.runs: dict[str, _StudyRun] = {}
        self.submitted: dict[str, StudyJob] = {}
        self.summaries: list[dict] = []

    def run(self, tasks: list[StudyTask]) -> list[dict]:
        """Tune (and retrain) every task; one summary per task.

        Raises
        ------
        TuningInterrupted
            On KeyboardInterrupt (SIGINT, or SIGTERM turned into it): workers are stopped, the trials they left
            are marked FAIL and queued again, finished trials stay; a rerun resumes.
        """
        self.todo = list(tasks)
        try:
            self.executor.start()
            while self.todo or self.ready or self.executor.pending:
                self._fill()
                for key, summary in self.executor.results(timeout=0.25):
                    self._reported(self.submitted.pop(key), summary)
        except KeyboardInterrupt:
            self._stop()
            raise TuningInterrupted(sum(1 for s in self.summaries if s["status"] != "error"), len(tasks)) from None
        finally:
            self.executor.close()
        return self.summaries

    def _fill(self) -> None:
        """Submit ready jobs while the executor has room, starting the next study when none is ready."""
        room = max(1, int(self.executor.parallelism))
        while self.executor.pending < room and (self.ready or self.todo):
            if not self.ready:
                self._start(self.todo.pop(0))
                continue
            job = self.ready.pop(0)
            self.submitted[job.key] = job
            self.executor.submit(job.key, job)

    def _start(self, task: StudyTask) -> None:
        study, redone = prepare_study(task)
        run = self.runs[task.name] = _StudyRun(task, time.perf_counter())
        self.log(f"{task.config.cell.label()}  study {task.protocol}")
        if redone:
            self.log(f"    resumed: trial(s) {redone} were left RUNNING by a killed run; marked FAIL and queued again")
        if study_done(study, task.settings, task.n_outer_folds):
            self._finish(run)
        else:
            self._queue_workers(run)

    def _queue_workers(self, run: _StudyRun) -> None:
        run.rounds += 1
        run.workers += self.jobs
        self.ready.extend(StudyJob(run.task, w, self.run_token, run.rounds) for w in range(self.jobs))

    def _finish(self, run: _StudyRun) -> None:
        """A done study: queue its retrain ahead of other work (or, without an execution, report it)."""
        if self.execution is None:
            self.summaries.append({"cell": run.task.config.cell.label(), "status": "tuned", "c_index": None,
                                   "seconds": time.perf_counter() - run.started, "error": None})
            return
        self.ready.insert(0, StudyJob(run.task, None, self.run_token, execution=self.execution,
                                      overwrite=self.overwrite))

    def _reported(self, job: StudyJob, summary: dict) -> None:
        run = self.runs[job.task.name]
        if job.worker is None:
            self.summaries.append({**summary, "tuning_seconds": time.perf_counter() - run.started})
            self.log(_retrain_line(run.task, summary))
            return
        run.workers -= 1
        if summary["status"] != "ok":
            run.errors.append(summary["error"])
            self.log(f"    {job.key}: {summary['error']}")
        if run.workers == 0:
            self._round_ended(run)

    def _round_ended(self, run: _StudyRun) -> None:
        """All workers of a study returned: retrain, give up, or redo what dead workers left in another round."""
        task = run.task
        study, storage = task.load_study()
        self.log(f"{task.config.cell.label()}:" + study_line(study))
        if study_done(study, task.settings, task.n_outer_folds):
            return self._finish(run)
        if study_failing(study, task.settings) or run.rounds >= MAX_ROUNDS:
            why = "trials keep failing" if study_failing(study, task.settings) else f"{run.rounds} rounds of workers"
            last = f"; last worker error: {run.errors[-1]}" if run.errors else ""
            error = f"study unfinished after {why}{last}; rerun the same command to resume"
            self.summaries.append({"cell": task.config.cell.label(), "status": "error", "c_index": None,
                                   "seconds": None, "error": error})
            return self.log(f"  error {error}")
        redone = recover_interrupted(study, storage, task.space, self.run_token)
        add_slots(study, task.settings)
        self.log(f"    trial(s) {redone} left RUNNING by a dead worker: marked FAIL and queued again; another round")
        self._queue_workers(run)

    def _stop(self) -> None:
        """Stop every worker (a second Ctrl-C meanwhile is ignored), then make the studies consistent."""
        from benchmark.execution.grid import stop_executor

        stop_executor(self.executor)
        for run in self.runs.values():
            if run.workers > 0:
                study, storage = run.task.load_study()
                recover_interrupted(study, storage, run.task.space, self.run_token)


def _retrain_line(task: StudyTask, summary: dict) -> str:
    label = task.config.cell.label()
    if summary["status"] == "ok":
        return f"  ok    {label}  outer C-index {summary['c_index']:.3f} with {summary.get('setting', '')}"
    if summary["status"] == "skipped":
        return f"  skipped  {label}  already in the store with {summary.get('setting', '')}"
    return f"  error {label}  {summary['error']}"


def run_study(task: StudyTask, jobs: int = 1, log: Callable[[str], None] | None = None, loader=None,
              executor=None) -> optuna.Study:
    """Tune one outer fold (no retrain) with ``jobs`` workers on ``executor`` (default: this process, where a
    test's cohort ``loader`` reaches) and return the finished study."""
    from benchmark.execution.executors import InlineExecutor

    executor = executor or InlineExecutor(run_study_job, loader=loader, log=log)
    StudyScheduler(executor, jobs, log=log).run([task])
    return task.load_study()[0]


# -------------------------------------------------------------------------------------------------------
# finding a finished tuning (``run --tuned``)
# -------------------------------------------------------------------------------------------------------
def task_from_study(study: optuna.Study, config: RunConfig, storage: str | None, results: str,
                    device: str = "auto", plugins: tuple[str, ...] = ()) -> StudyTask:
    """Rebuild the task of a study from what :func:`prepare_study` recorded in it."""
    from benchmark.tuning.search_spaces import parse_param

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
