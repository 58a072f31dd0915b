"""The tuner: spaces checked before any trial, nesting (no outer-validation access), determinism, pruning,
resume after kill -9, tuned configurations, ``run --tuned``."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import psutil
import pytest
from optuna.trial import TrialState
from torch import nn

from benchmark.cli import main as cli_main
from benchmark.store.records import ResultStore
from benchmark.settings.config import RunConfig, hashed_config
from benchmark.settings.recipes import register_recipe, Recipe
from benchmark.api.registry import method_names, register_method
from benchmark.execution.cells import Execution, expected_config
from benchmark.tuning.search_spaces import SpaceError, method_space, parse_param, tunable
from benchmark.fitting.trainer import train_fold
from benchmark.tuning.study import (
    InnerCohort, NestingError, StudyTask, TunedCell, TuningSettings, find_tuned, inner_folds, open_storage, retrain,
    run_study, seeded_sampler,
)
from fakes import ToyCohort, scoped_registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)

#: Three short epochs of a few windows: a trial of two inner folds takes a fraction of a second.
TOY_RECIPE = register_recipe(Recipe("tune-toy", lr=1e-3, weight_decay=1e-5, epochs=3, accumulation=4, alpha=0.2,
                                    warmup_epochs=0, schedule="cosine", max_samples_per_epoch=16))
SMALL_SPACE = {"amil": {"lr": {"low": 1e-5, "high": 1e-1, "log": True}, "dropout": False, "weight_decay": False,
                        "accumulation": {"choices": [2, 4]}, "attention_dim": {"choices": [8, 16]},
                        "hidden": {"choices": [16, 32]}}}


class RecordingCohort(ToyCohort):
    """A toy cohort that records every bag asked for, and whether the asker was a trial or the retrain."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.phase = "trials"
        self.asked: dict[str, set] = {"trials": set(), "retrain": set()}

    def bag(self, sample_id, needs):
        self.asked[self.phase].add(sample_id)
        return super().bag(sample_id, needs)


def toy_task(tmp_path, cohort, settings=None, fold=0, storage=None) -> StudyTask:
    config = RunConfig("amil", "toy", fold=fold, recipe="tune-toy")
    space = method_space("amil", SMALL_SPACE)
    settings = settings or TuningSettings(trials=6, inner_folds=2, sampler_seed=3)
    return StudyTask(config, space, settings, storage or str(tmp_path / "study.journal"), str(tmp_path / "results"),
                     len(cohort.folds))


def loader_of(cohort):
    return lambda *args, **kwargs: cohort


def settings_in_run_order(study) -> list[dict]:
    """The settings of the finished trials in the order they ran (trial numbers are given when a trial is queued:
    a redone trial, queued last, runs first)."""
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    return [t.params for t in sorted(finished, key=lambda t: t.datetime_start)]


# ---------------------------------------------------------------------------------------------------------
# spaces
# ---------------------------------------------------------------------------------------------------------
def test_every_registered_method_declares_a_valid_space():
    for name in method_names():
        if tunable(name):
            space = method_space(name)
            assert {"lr", "weight_decay", "accumulation"} <= {p.name for p in space.params}
            assert len(space.params) - 4 <= 4  # 1-4 method-specific entries besides the shared ones
    assert not tunable("random")


@pytest.mark.parametrize("overrides, message", [
    ({"amil": {"lrr": {"low": 1e-4, "high": 1e-3}}}, "unknown parameter 'lrr' (did you mean 'lr'?)"),
    ({"amil": {"num_landmarks": {"choices": [64]}}}, "neither a recipe field nor an option of amil"),
    ({"amil": {"lr": {"low": 1e-3, "high": 1e-4, "log": True}}}, "is reversed"),
    ({"amil": {"dropout": {"low": 0.2, "high": 0.2}}}, "is empty"),
    ({"amil": {"hidden": {"choices": []}}}, "has no choices"),
    ({"*": {"weight_decay": {"low": 0.0, "high": 1e-3, "log": True}}}, "reaches 0"),
    ({"amil": {"lr": {"low": 1e-4, "hi": 1e-3}}}, "unknown key(s) ['hi']"),
    ({"amil": {"accumulation": {"choices": [0, 4]}}}, "accumulation=0 is not a valid recipe value"),
])
def test_bad_spaces_are_refused_with_one_line(overrides, message):
    with pytest.raises(SpaceError) as info:
        method_space("amil", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_experiment_space_narrows_and_removes_entries():
    space = method_space("amil", {"*": {"dropout": False}, "amil": {"lr": {"low": 1e-4, "high": 2e-4, "log": True}}})
    names = {p.name: p for p in space.params}
    assert "dropout" not in names and (names["lr"].low, names["lr"].high) == (1e-4, 2e-4)
    assert space.digest() != method_space("amil").digest()


def test_plugin_method_declares_its_own_space(monkeypatch):
    scoped_registry(monkeypatch)

    @register_method("toy_tunable", search_space={"width": {"low": 4, "high": 16}, "dropout": None})
    class ToyTunable(nn.Module):
        def __init__(self, in_dim, n_bins=4, width=8):
            super().__init__()
            self.linear = nn.Linear(in_dim, n_bins)

    assert {p.name: p.kind for p in method_space("toy_tunable").params}["width"] == "int"

    @register_method("toy_misfit", search_space={"depth": {"low": 1, "high": 3}})
    class ToyMisfit(ToyTunable):
        pass

    with pytest.raises(SpaceError, match="unknown parameter 'depth'"):
        method_space("toy_misfit")


def test_tune_command_refuses_a_bad_space_before_any_trial(tmp_path, capsys):
    config = tmp_path / "tune.toml"
    config.write_text('methods = "amil"\n[tune]\ntrials = 2\n[tune.space.amil]\nlr = {low = 1e-2, high = 1e-4}\n')
    code = cli_main(["tune", "--config", str(config), "--dataset", "blca", "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: search space of amil: lr range") and "reversed" in err
    assert not (tmp_path / "r" / "tuning").exists()


def test_parse_param_kinds():
    assert parse_param("k", {"low": 1, "high": 4}, "x").kind == "int"
    assert parse_param("lr", {"low": 1e-5, "high": 1e-3, "log": True}, "x").log
    assert parse_param("gate", {"choices": [True]}, "x").kind == "categorical"


# ---------------------------------------------------------------------------------------------------------
# nesting
# ---------------------------------------------------------------------------------------------------------
def test_inner_view_holds_only_the_outer_training_fold():
    cohort = ToyCohort(n=40, n_folds=4)
    view = InnerCohort(cohort, outer_fold=1, n_folds=3, seed=0, fraction=0.25)
    outer = cohort.folds[1]
    assert set(view.samples.index) == set(outer.train)
    for fold in view.folds:
        assert set(fold.train) | set(fold.val) == set(outer.train) and not set(fold.train) & set(fold.val)
    with pytest.raises(NestingError, match="outside the outer training fold"):
        view.bag(outer.val[0], None)


def test_inner_folds_keep_a_patients_slides_together():
    ids = [f"P{i:02d}-{s}" for i in range(24) for s in "ab"]
    patient = [i // 2 for i in range(48)]
    samples = pd.DataFrame({"patient_id": [f"P{p:02d}" for p in patient], "time": [p % 13 + 1.0 for p in patient],
                            "event": [p % 2 for p in patient], "censorship": [1 - p % 2 for p in patient]}, index=ids)
    for n_folds in (1, 3):
        for fold in inner_folds(samples, n_folds, seed=0, fraction=0.25):
            train_patients = {s.split("-")[0] for s in fold.train}
            assert train_patients.isdisjoint({s.split("-")[0] for s in fold.val}) and fold.val


def test_no_trial_touches_an_outer_validation_patient(tmp_path):
    cohort = RecordingCohort(n=48, n_folds=3)
    task = toy_task(tmp_path, cohort, fold=2)
    study = run_study(task, loader=loader_of(cohort))
    outer = cohort.folds[2]
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 6
    assert cohort.asked["trials"] and cohort.asked["trials"].isdisjoint(outer.val)
    cohort.phase = "retrain"
    summary = retrain(TunedCell(task, study), ResultStore(tmp_path / "results"), Execution(save_weights=False),
                      loader=loader_of(cohort))
    assert summary["status"] == "ok" and set(outer.val) <= cohort.asked["retrain"]  # evaluated once, on the outer fold
    record = ResultStore(tmp_path / "results").read(TunedCell(task, study).config.cell)
    assert record["tuning"]["best"]["params"] == record["config"]["tuning"]["params"]
    assert len(record["tuning"]["trials"]) == 6 and record["label"].startswith("tune-toy, tuned 6t-s3-")


def test_the_tuned_retrain_takes_the_cell_lock(tmp_path):
    """Two tuners finishing the same study never train the tuned cell at once: the retrain holds the cell's
    lock like every cell, and a live holder makes it report ``busy`` instead of training."""
    from benchmark.store.lock import CellLock

    cohort = RecordingCohort(n=48, n_folds=3)
    task = toy_task(tmp_path, cohort, fold=2)
    study = run_study(task, loader=loader_of(cohort))
    store, cell = ResultStore(tmp_path / "results"), TunedCell(task, study)
    held = CellLock(store.lock_path(cell.config.cell), token="other-run").acquire()
    try:
        busy = retrain(cell, store, Execution(save_weights=False), loader=loader_of(cohort))
    finally:
        held.release()
    assert busy["status"] == "busy" and store.read(cell.config.cell) is None
    done = retrain(cell, store, Execution(save_weights=False), loader=loader_of(cohort))
    assert done["status"] == "ok" and store.read(cell.config.cell)["tuning"]["best"]


# ---------------------------------------------------------------------------------------------------------
# determinism and pruning
# ---------------------------------------------------------------------------------------------------------
def test_same_seed_same_choice(tmp_path):
    cohort = ToyCohort(n=48, n_folds=3)
    studies = [run_study(toy_task(tmp_path / name, cohort), loader=loader_of(cohort)) for name in ("a", "b")]
    assert [t.params for t in studies[0].trials] == [t.params for t in studies[1].trials]
    assert studies[0].best_trial.params == studies[1].best_trial.params
    other = run_study(toy_task(tmp_path / "c", cohort, TuningSettings(trials=6, inner_folds=2, sampler_seed=4)),
                      loader=loader_of(cohort))
    assert [t.params for t in other.trials] != [t.params for t in studies[0].trials]


def test_pruning_stops_poor_trials_early(tmp_path):
    cohort = ToyCohort(n=48, n_folds=3)
    task = toy_task(tmp_path, cohort, TuningSettings(trials=12, inner_folds=2, sampler_seed=0))
    study = run_study(task, loader=loader_of(cohort))
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "the median pruner stopped no trial"
    assert all(len(t.intermediate_values) < task.max_steps for t in pruned)
    assert all(len(t.intermediate_values) == task.max_steps for t in study.get_trials(states=(TrialState.COMPLETE,)))


def test_resume_redoes_a_running_trial_with_its_setting(tmp_path):
    """A trial left RUNNING by a dead worker (setting drawn) is marked FAIL and its setting enqueued again."""
    import socket

    from benchmark.tuning.study import prepare_study

    cohort = ToyCohort(n=48, n_folds=3)
    settings = TuningSettings(trials=4, inner_folds=2, sampler_seed=3)
    clean = run_study(toy_task(tmp_path / "clean", cohort, settings), loader=loader_of(cohort))
    task = toy_task(tmp_path / "killed", cohort, settings)
    study, _ = prepare_study(task)
    for _ in range(2):  # two trials drawn and left RUNNING by a worker that no longer exists
        trial = study.ask()
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": 2**22 + 1})
        task.space.suggest(trial)
        study.sampler = seeded_sampler(settings, study)
    resumed = run_study(task, loader=loader_of(cohort))
    assert [t.state for t in resumed.trials[:2]] == [TrialState.FAIL] * 2
    redo = [t for t in resumed.trials if t.user_attrs.get("redo_of") is not None]
    assert [t.user_attrs["redo_of"] for t in redo] == [0, 1] and redo[0].params == clean.trials[0].params
    assert resumed.best_trial.params == clean.best_trial.params


def test_time_budget_counts_the_seconds_spent_in_trials(tmp_path):
    from benchmark.tuning.study import study_done, trials_spent_seconds

    cohort = ToyCohort(n=48, n_folds=3)
    settings = TuningSettings(budget="time", timeout_per_method=1.5, inner_folds=1)  # 0.5 s per outer fold
    task = toy_task(tmp_path, cohort, settings)
    study = run_study(task, loader=loader_of(cohort))
    assert study.trials and trials_spent_seconds(study) >= 0.5 and study_done(study, settings, 3)
    assert len(run_study(task, loader=loader_of(cohort)).trials) == len(study.trials)  # spent: nothing reruns
    assert task.protocol.startswith("1.5s-s0-")


def test_trainer_reports_the_validation_c_index_each_epoch_without_selecting_on_it():
    cohort = ToyCohort(n=40, n_folds=2)
    seen = []
    result = train_fold(cohort, RunConfig("amil", "toy", recipe="tune-toy"), score_val_each_epoch=True,
                        on_epoch=lambda e, n, info: seen.append(info["val_c_index"]))
    assert len(seen) == 3 and result.selected_epoch == 3


# ---------------------------------------------------------------------------------------------------------
# tuned configurations
# ---------------------------------------------------------------------------------------------------------
def test_tuned_config_label_store_key_and_round_trip():
    base = RunConfig("amil", "blca", recipe="demo")
    a = base.with_(tuning="30t-s0-abc123", tuned={"lr": 3e-4, "dropout": 0.1})
    b = base.with_(fold=1, tuning="30t-s0-abc123", tuned={"lr": 1e-4, "hidden": 256})
    assert a.label() == "demo, tuned 30t-s0-abc123" and a.store_key() == b.store_key() != base.store_key()
    assert a.resolved_recipe().lr == 3e-4 and a.options == {"dropout": 0.1}
    record = {**dataclasses.asdict(a.cell), "config": expected_config(a)}
    assert RunConfig.from_record(record) == a
    plain = base.with_(overrides={"lr": 3e-4}, method_options={"dropout": 0.1})
    assert hashed_config(expected_config(plain)) == hashed_config(expected_config(a))
    assert "--set=lr=0.0003" in a.to_cli() and "--method-option=amil.dropout=0.1" in a.to_cli()


# ---------------------------------------------------------------------------------------------------------
# resume after kill -9 (the real command, in a subprocess)
# ---------------------------------------------------------------------------------------------------------
def _tune_args(data_root, results, storage, *extra, trials=4, epochs=1):
    return ["tune", "--methods", "amil", "--dataset", "blca", "--folds", "0", "--data-root", str(data_root),
            "--recipe", "demo", "--set", f"epochs={epochs}", "max_samples_per_epoch=24", "--trials", str(trials),
            "--inner-folds", "2", "--results", str(results), "--storage", str(storage), "--no-weights", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _wait_for_running_trial(storage: Path, process, min_complete: int = 2, limit_s: float = 120) -> optuna.Study:
    """The study once ``min_complete`` trials are complete and one runs (with its worker recorded)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and process.poll() is None:
        if storage.exists():
            backend = open_storage(str(storage), None)
            for name in optuna.get_all_study_names(backend):
                study = optuna.load_study(study_name=name, storage=backend)
                states = [t.state for t in study.trials]
                running = study.get_trials(states=(TrialState.RUNNING,))
                if states.count(TrialState.COMPLETE) >= min_complete and any("worker" in t.user_attrs for t in running):
                    return study
        time.sleep(0.05)
    raise AssertionError(f"the tune process never reached a running trial after {min_complete} complete one(s)")


def _only_study(storage: Path) -> optuna.Study:
    backend = open_storage(str(storage), None)
    (name,) = optuna.get_all_study_names(backend)
    return optuna.load_study(study_name=name, storage=backend)


def test_killed_tune_resumes_to_the_same_choice(tiny_root, tmp_path, capsys):
    """``tune`` killed with SIGKILL in a subprocess mid-trial, then run again (here, in-process, one torch
    thread as the subprocess): the same trials and the same choice as an uninterrupted run."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    process = subprocess.Popen([sys.executable, "-m", "benchmark", *_tune_args(tiny_root, killed, killed / "s.journal")],
                               env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_running_trial(killed / "s.journal", process)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert cli_main(_tune_args(tiny_root, killed, killed / "s.journal")) == 0
    assert "marked FAIL and queued again" in " ".join(capsys.readouterr().out.split())
    assert cli_main(_tune_args(tiny_root, clean, clean / "s.journal")) == 0
    a, b = _only_study(killed / "s.journal"), _only_study(clean / "s.journal")
    assert len(a.get_trials(states=(TrialState.FAIL,))) == 1
    assert settings_in_run_order(a) == settings_in_run_order(b)
    assert a.best_trial.params == b.best_trial.params
    records = [json.loads(p.read_text()) for p in sorted((killed / "cells").rglob("fold0.json"))]
    assert len(records) == 1 and records[0]["tuning"]["n_failed"] == 1
    # run --tuned finds the finished study and the record already holding its choice
    assert cli_main(["run", "--tuned", "--methods", "amil", "--dataset", "blca", "--folds", "0", "--data-root",
                     str(tiny_root), "--recipe", "demo", "--set", "epochs=1", "max_samples_per_epoch=24",
                     "--results", str(killed), "--storage", str(killed / "s.journal")]) == 0
    assert find_tuned(RunConfig.from_record(records[0]).with_(tuning=None, tuned=()), str(killed / "s.journal"),
                      str(killed)).config.tuned == RunConfig.from_record(records[0]).tuned


# ---------------------------------------------------------------------------------------------------------
# several workers on one study (the executors cells use)
# ---------------------------------------------------------------------------------------------------------
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def assert_budget_met_exactly(study: optuna.Study, trials: int) -> None:
    """Exactly ``trials`` finished trials, nothing left running or queued, no trial number twice, every trial
    that failed redone, and the best trial the best of the complete ones."""
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == numbers[-1] + 1
    assert len(study.get_trials(states=FINISHED_STATES)) == trials
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    redone = {t.user_attrs["redo_of"] for t in study.trials if "redo_of" in t.user_attrs}
    assert {t.number for t in study.get_trials(states=(TrialState.FAIL,))} <= redone
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert study.best_trial.number == max(complete, key=lambda t: t.value).number


def _tuned_record(results: Path) -> dict:
    (path,) = sorted((results / "cells").rglob("fold0.json"))
    return json.loads(path.read_text())


def test_two_workers_share_one_study_and_meet_the_budget_exactly(tiny_root, tmp_path, capsys):
    """``tune --jobs 2``: two worker processes (the local executor) take trials of one study from its journal;
    the study ends with exactly the budget, and the retrained setting is the best complete trial's."""
    assert cli_main(_tune_args(tiny_root, tmp_path, tmp_path / "s.journal", "--jobs", "2", trials=6)) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "2 worker(s) per study, as local worker processes" in out and "1 outer fold(s) tuned" in out
    study = _only_study(tmp_path / "s.journal")
    assert_budget_met_exactly(study, 6)
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # trials ran in the worker processes only
    record = _tuned_record(tmp_path)
    assert record["status"] == "ok" and record["tuning"]["best"]["number"] == study.best_trial.number
    assert record["config"]["tuning"]["params"] == study.best_trial.params
    assert record["tuning"]["n_complete"] + record["tuning"]["n_pruned"] == 6


def _start_tune(args: list[str], new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmark", *args], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=new_session)


def test_a_dead_study_worker_is_redone_and_the_budget_met(tiny_root, tmp_path):
    """One of two workers is killed (SIGKILL) mid-trial: the local executor reports it, the trial it left RUNNING
    is marked FAIL and redone by another round, and the command still ends with the budget met."""
    storage = tmp_path / "s.journal"
    process = _start_tune(_tune_args(tiny_root, tmp_path, storage, "--jobs", "2", trials=6))
    try:
        study = _wait_for_running_trial(storage, process, min_complete=1)
        victim = next(t for t in study.get_trials(states=(TrialState.RUNNING,)) if "worker" in t.user_attrs)
        os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, out[-2000:] + err[-2000:]
    assert "worker died" in out and "marked FAIL and queued again; another round" in " ".join(out.split())
    study = _only_study(storage)
    assert_budget_met_exactly(study, 6)
    killed = study.trials[victim.number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["interrupted"]
    assert _tuned_record(tmp_path)["status"] == "ok"


def test_killed_tune_with_two_workers_resumes_to_the_budget(tiny_root, tmp_path, capsys):
    """kill -9 of ``tune --jobs 2`` and of its workers at once, mid-trial (as a crash or the OOM killer would):
    the rerun keeps the finished trials, marks the ones left RUNNING as FAIL, redoes them, and ends with exactly
    the budget."""
    storage = tmp_path / "s.journal"
    process = _start_tune(_tune_args(tiny_root, tmp_path, storage, "--jobs", "2", trials=6), new_session=True)
    try:
        _wait_for_running_trial(storage, process, min_complete=2)
        workers = psutil.Process(process.pid).children(recursive=True)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the command and its workers (one process group)
        process.communicate()
    assert workers and not psutil.wait_procs(workers, timeout=30)[1]
    before = _only_study(storage)
    kept = {t.number: (t.state, t.params, t.value) for t in before.get_trials(states=FINISHED_STATES)}
    left = {t.number for t in before.get_trials(states=(TrialState.RUNNING,))}
    assert kept and left
    assert cli_main(_tune_args(tiny_root, tmp_path, storage, "--jobs", "2", trials=6)) == 0
    assert "marked FAIL and queued again" in " ".join(capsys.readouterr().out.split())
    after = _only_study(storage)
    assert {n: (after.trials[n].state, after.trials[n].params, after.trials[n].value) for n in kept} == kept
    assert all(after.trials[n].state == TrialState.FAIL and after.trials[n].user_attrs["interrupted"] for n in left)
    assert_budget_met_exactly(after, 6)
    assert _tuned_record(tmp_path)["tuning"]["n_failed"] == len(left)


def test_ctrl_c_stops_the_workers_and_leaves_the_study_consistent(tiny_root, tmp_path):
    """SIGINT to ``tune --jobs 2``: exit 130 within seconds with the resume hint and no traceback, no worker left,
    no trial left RUNNING (the interrupted ones are FAIL and queued again), finished trials kept."""
    storage = tmp_path / "s.journal"
    process = _start_tune(_tune_args(tiny_root, tmp_path, storage, "--jobs", "2", trials=20, epochs=4))
    try:
        _wait_for_running_trial(storage, process, min_complete=1)
        workers = psutil.Process(process.pid).children(recursive=True)
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and time.monotonic() - sent < 20, out[-2000:] + err[-2000:]
    assert "rerun the same command to resume" in out and "Traceback" not in out + err
    assert not psutil.wait_procs(workers, timeout=10)[1], "a worker outlived the interrupted tune"
    study = _only_study(storage)
    assert study.get_trials(states=(TrialState.COMPLETE,)) and not study.get_trials(states=(TrialState.RUNNING,))
    interrupted = [t.number for t in study.get_trials(states=(TrialState.FAIL,)) if t.user_attrs.get("interrupted")]
    queued = {t.user_attrs.get("redo_of") for t in study.get_trials(states=(TrialState.WAITING,))}
    assert set(interrupted) <= queued
    assert len(study.get_trials(states=FINISHED_STATES + (TrialState.WAITING,))) == 20  # the rest of the budget


# ---------------------------------------------------------------------------------------------------------
# tables and plots
# ---------------------------------------------------------------------------------------------------------
def _record(method, fold, c, tuned=None, budget="TPE sampler (seed 0), 10 trials per outer fold"):
    record = {"method": method, "cohort": "blca", "backbone": "resnet50", "fold": fold, "seed": 0,
              "recipe": "demo" if tuned is None else "demo+aaaaaa", "selection": "last", "status": "ok",
              "metrics": {"c_index": c}, "config_hash": f"h{method}{fold}{tuned}", "label": "demo", "n_folds": 2}
    if tuned is not None:
        record["config"] = {"tuning": {"id": tuned, "params": {"lr": 1e-4 * (fold + 1)}}}
        record["tuning"] = {"budget": budget}
        record["label"] = f"demo, tuned {tuned}"
    return record


def test_tables_never_rank_tuned_and_untuned_cells_of_one_method_together():
    from benchmark.analysis.tables import render, table1

    records = [_record("amil", k, 0.60) for k in (0, 1)] + [_record("amil", k, 0.70, "10t-s0-a") for k in (0, 1)]
    records += [_record("dsmil", k, 0.65) for k in (0, 1)] + [_record("random", k, 0.5) for k in (0, 1)]
    default = table1(records)
    assert default.rows == ["amil", "dsmil", "random"] and default.value("amil", "blca") == pytest.approx(0.60)
    assert any("2 tuned fold record(s) not shown" in n for n in default.notes)
    tuned = table1(records, tuned=True)
    assert tuned.rows == ["amil ‡", "dsmil", "random"] and tuned.value("amil ‡", "blca") == pytest.approx(0.70)
    assert not tuned.cells[("amil ‡", "blca")].mixed_configs  # one protocol, a setting per fold
    md = render(tuned, "md")
    assert "10 trials per outer fold" in md and "Rows without ‡ run the recipe's defaults (not tuned): dsmil, random" in md
    other_budget = records + [_record("dsmil", k, 0.66, "20t-s0-b", budget="20 trials") for k in (0, 1)]
    assert "DIFFERENT budgets" in render(table1(other_budget, tuned=True), "md")


def test_plot_tuning_draws_history_and_importances(tmp_path):
    from benchmark.analysis.plots import plot_tuning

    cohort = ToyCohort(n=48, n_folds=3)
    study = run_study(toy_task(tmp_path, cohort, TuningSettings(trials=4, inner_folds=1, pruner="none")),
                      loader=loader_of(cohort))
    paths = plot_tuning(study, tmp_path / "fig" / "amil")
    assert sorted(p.name for p in paths) == ["amil_history.pdf", "amil_history.png", "amil_importances.pdf",
                                            "amil_importances.png"]
