"""A run session, shared by ``run`` and ``tune``: the :class:`~benchmark.settings.config.Experiment` built from the
merged settings, its results folder, its cohorts loaded and checked once, and its executor started.

Nothing here parses text: the values come from :func:`benchmark.settings.options.run_settings` (defaults <
experiment file < command line), and each is checked once, before any cell, as one line naming its option.
"""
from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from benchmark.api.registry import check_method_options, load_plugins, resolve_methods
from benchmark.data.cohorts import add_registry_file, resolve_backbones, resolve_cohorts, user_registry_files
from benchmark.execution.executors import InlineExecutor, get_executor_kind
from benchmark.execution.cells import Execution, default_results_dir, execute_cell, get_cohort_data, make_executor
from benchmark.settings.config import ANY, Experiment, RunConfig, feature_items
from benchmark.data.clinical import parse_columns
from benchmark.data.loader import infer_backbone
from benchmark.settings.options import (
    parse_assignments, parse_indices, parse_option_value, parse_shard, run_settings,
)

SYNTHETIC_DEFAULT_RECIPE = "demo"
REAL_DEFAULT_RECIPE = "paper"


def _names(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def method_options(file_options: dict, items: list[str], methods: list[str]) -> dict[str, dict]:
    """The experiment file's ``[method_options.<method>]`` tables, then ``--method-option`` items
    (``{method or "*": {name: value}}``; a name without a method reaches every method)."""
    out = {m: dict(o) for m, o in file_options.items()}
    for key, value in parse_assignments(items, "--method-option").items():
        target, dot, name = key.rpartition(".")
        target = target.lower() if dot else "*"
        if dot and target not in methods:
            raise ValueError(f"--method-option {key}: method {target!r} is not among the selected methods {methods}")
        out.setdefault(target, {})[name] = parse_option_value(value)
    for method in methods:  # an option no constructor takes fails here, not in every cell
        check_method_options(method, {**out.get("*", {}), **out.get(method, {})})
    return out


def _repeats(s: dict[str, Any]) -> tuple[int, ...]:
    if s["repeat"] is not None:
        return tuple(parse_indices(s["repeat"], "--repeat"))
    if int(s["repeats"]) < 1:
        raise ValueError(f"--repeats: needs at least 1 repeat, got {s['repeats']}")
    return tuple(range(int(s["repeats"])))


def _shared_config(s: dict[str, Any]) -> RunConfig:
    """The settings every cell has in common."""
    real = s["data_root"] is not None or s["clinical"] is not None
    recipe = s["recipe"] or (REAL_DEFAULT_RECIPE if real else SYNTHETIC_DEFAULT_RECIPE)
    return RunConfig(
        ANY, ANY, recipe=recipe, overrides=s["set"], selection=s["selection"], unit=s["unit"],
        bin_rule=s["bin_rule"], n_bins=int(s["n_bins"]), data_root=s["data_root"], signal=s["signal"],
        precision=s["precision"], seeding=s["seeding"], clinical=s["clinical"], splits=s["splits"], features=feature_items(s["features"]),
        layout=s["layout"], missing_features=s["missing_features"],
        registry=tuple(str(p) for p in user_registry_files()), columns=canonical_columns(s["columns"]),
    )


def canonical_columns(spec) -> str | None:
    """``--columns`` (or the experiment file's ``columns``) as the canonical mapping text; None when not given."""
    return None if spec is None else parse_columns(spec).spec()


def features_backbone(s: dict[str, Any]):
    """The backbones of the run: as given, or with ``--features`` and no backbone named anywhere, the one
    inferred from the feature files (printed), else an error asking for ``--backbone``."""
    if "backbones" in s["given"] or not s.get("features"):
        return s["backbones"]
    name, how = infer_backbone([v if k == "any" else f"{k}={v}" for k, v in feature_items(s["features"])])
    print(how)
    return name


def build_experiment(args: argparse.Namespace) -> Experiment:
    """The experiment of a ``run`` / ``tune`` command line and its experiment file, checked before any cell."""
    s = run_settings(args)
    for path in s["registry"]:  # the experiment file's (the command line's were read by the CLI)
        add_registry_file(path)
    s["backbones"] = features_backbone(s)
    load_plugins(s["plugins"])
    methods = resolve_methods(_names(s["methods"]))
    get_executor_kind(s["executor"])  # an unknown executor from an experiment file: one line
    folds = None if str(s["folds"]).strip().lower() == "all" else tuple(parse_indices(s["folds"], "--folds"))
    experiment = Experiment(
        methods=tuple(methods), cohorts=tuple(resolve_cohorts(_names(s["datasets"]))),
        backbones=tuple(resolve_backbones(_names(s["backbones"]))), folds=folds,
        seeds=tuple(parse_indices(s["seeds"], "--seed")), repeats=_repeats(s), shared=_shared_config(s),
        method_options=method_options(s["method_options"], getattr(args, "method_options", []), methods),
        results=s["results"], jobs=int(s["jobs"]), device=s["device"], save_weights=str(s["save_weights"]),
        plugins=tuple(s["plugins"]), executor=s["executor"], address=s["address"],
        cpus_per_cell=None if s["cpus_per_cell"] is None else float(s["cpus_per_cell"]),
        gpus_per_cell=float(s["gpus_per_cell"]), shard=parse_shard(s["shard"]),
    )
    experiment.check()
    return experiment


def results_dir(experiment: Experiment) -> Path:
    """``--results``, else results/synthetic (results/synthetic-<signal> for a control) or results/real."""
    if experiment.results:
        return Path(experiment.results)
    shared = experiment.shared
    default = default_results_dir(shared.data_root, shared.clinical)
    if shared.data_root is None and shared.clinical is None and shared.signal != "mixed":  # a control
        default = default.with_name(f"synthetic-{shared.signal}")
    return default


def load_cohorts(experiment: Experiment) -> list:
    """Load every cohort once (validates names and paths, generates synthetic data before workers start)."""
    return [get_cohort_data(experiment.cell_config(experiment.methods[0], c, b, repeat=r))
            for c in experiment.cohorts for b in experiment.backbones for r in experiment.repeats]


def check_bins(experiment: Experiment, cohorts: list) -> None:
    """Fit every fold's time bins once before any cell: degenerate labels (repeated bin edges, no event to fit
    on) are one error naming the cohort and the fold, not a failed cell per method."""
    for cohort in cohorts:
        folds = experiment.folds if experiment.folds is not None else range(len(cohort.folds))
        for k in folds:
            cohort.bins(k, rule=experiment.shared.bin_rule, n_bins=experiment.shared.n_bins)


def check_execution(experiment: Experiment) -> None:
    """Device, precision and resources that cannot work here: one line naming the option, before any cell."""
    get_executor_kind(experiment.executor).check(experiment)


def start_executor(experiment: Experiment, store, work=None, shared_roots: tuple[str, ...] = ()):
    """The grid's executor (or, with ``work``, the tuner's), connected and validated (Ray: reachable, resources
    present, store and ``shared_roots`` writable from every node)."""
    execution = Execution(device=experiment.device, save_weights=experiment.save_weights == "last",
                          plugins=experiment.plugins)
    executor = make_executor(experiment.executor, experiment.jobs, execution, address=experiment.address,
                             cpus_per_cell=experiment.cpus_per_cell, gpus_per_cell=experiment.gpus_per_cell,
                             store_root=str(store.root.resolve()), work=work or execute_cell,
                             shared_roots=shared_roots)
    if isinstance(executor, InlineExecutor) and experiment.cpus_per_cell:
        import torch

        torch.set_num_threads(max(1, int(experiment.cpus_per_cell)))  # cells run in this process
    executor.start()
    return executor, execution


def interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler stopping the job) stops the grid the way Ctrl-C does."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
