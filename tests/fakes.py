"""Toy cohorts, fake stores and grids shared by tests in several folders (plain helpers, no tests).

``ToyCohort`` follows the data contract with bags whose mean feature carries the log hazard; ``write_fake_store``
writes records in the store layout for fake methods of known quality; ``grid`` / ``toy_loader`` make a toy grid
on the ``tiny`` recipe; ``write_untrained_cell`` stores an untrained model (heatmaps need a model, not a good one).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import pandas as pd
import torch
from sksurv.metrics import concordance_index_censored

from benchmark.data.bag import Bag
from benchmark.data.labels import assign_bins, quantile_edges
from benchmark.settings.config import ANY, Experiment, RunConfig
from benchmark.settings.recipes import Recipe, get_recipe, register_recipe


@dataclass
class ToyFold:
    train: list
    val: list


class ToyCohort:
    """A tiny in-memory cohort following the data contract: bags whose mean feature carries the log hazard."""

    def __init__(self, n=60, dim=16, patches=6, seed=0, n_folds=2):
        rng = np.random.default_rng(seed)
        ids = [f"P{i:03d}" for i in range(n)]
        x = rng.normal(size=n)
        t_event = rng.exponential(np.exp(-1.5 * x) * 20)
        t_cens = rng.uniform(10, 60, n)
        time = np.minimum(t_event, t_cens) + 0.1
        event = (t_event <= t_cens).astype(int)
        self.samples = pd.DataFrame(
            {"patient_id": ids, "slide_ids": [(s + "-slide",) for s in ids], "time": time, "event": event,
             "censorship": 1 - event}, index=pd.Index(ids, name="sample_id"))
        self.folds = [ToyFold([s for j, s in enumerate(ids) if j % n_folds != k],
                              [s for j, s in enumerate(ids) if j % n_folds == k]) for k in range(n_folds)]
        self.in_dim = dim
        self.provenance = {"data_root": None, "synthetic": "toy"}
        direction = rng.normal(size=dim)
        self._features = {
            s: torch.tensor(rng.normal(size=(patches, dim)) * 0.5 + x[i] * direction[None, :], dtype=torch.float32)
            for i, s in enumerate(ids)}
        self.bag_calls: list[str] = []

    def bag(self, sample_id, needs):
        self.bag_calls.append(sample_id)
        return Bag(sample_id, (sample_id + "-slide",), {20: self._features[sample_id]})

    def bins(self, fold, rule="train", n_bins=4):
        ref = self.samples.loc[fold.train] if rule == "train" else self.samples
        edges = quantile_edges(ref["time"].to_numpy(), ref["event"].to_numpy(), n_bins)
        return edges, pd.Series(assign_bins(self.samples["time"].to_numpy(), edges), index=self.samples.index)


def scoped_registry(monkeypatch):
    """Register test-only methods in a copy of the registry that is restored after the test, so they never
    reach the contract tests that run on every registered method."""
    from benchmark.api import registry

    registry.load_builtin_methods()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


#: fake methods: how their risk relates to the true risk z
FAKE_METHODS = {
    "good": lambda z, noise: z + 0.3 * noise,   # strongly prognostic
    "twin": lambda z, noise: z + 0.3 * noise,   # identical risks to "good"
    "noise": lambda z, noise: noise,            # random
    "peer": lambda z, noise: z + 0.3 * np.roll(noise, 1),  # as good as "good", its own errors
}


def write_fake_store(
    root: Path,
    methods=("good", "twin", "noise"),
    cohorts=("blca", "luad"),
    n_patients: int = 150,
    n_folds: int = 5,
    backbone: str = "resnet50",
    seed: int = 0,
    slides_per_patient: int = 1,
) -> Path:
    """Write fold records of ``methods x cohorts x folds`` under ``root`` (the store layout) and return root.

    Times are exponential with hazard ``exp(z)``; ``good`` and ``twin`` have identical risks ``z + noise``,
    ``noise`` is random. With ``slides_per_patient > 1`` the unit is ``slide`` (samples = slides).
    """
    for ci, cohort in enumerate(cohorts):
        rng = np.random.default_rng(seed + 100 * ci)
        z = rng.normal(size=n_patients)
        time = rng.exponential(30.0 * np.exp(-z))
        censor_time = rng.uniform(5, 120, size=n_patients)
        event = (time <= censor_time).astype(int)
        time = np.minimum(time, censor_time).round(2) + 0.01
        fold_of = rng.permutation(np.arange(n_patients) % n_folds)
        noise_good = rng.normal(size=n_patients)
        noise_rand = rng.normal(size=n_patients)
        for method in methods:
            noise = noise_rand if method == "noise" else noise_good
            risk = FAKE_METHODS[method](z, noise)
            for k in range(n_folds):
                val = np.flatnonzero(fold_of == k)
                train = np.flatnonzero(fold_of != k)
                preds = []
                for i in val:
                    for s in range(slides_per_patient):
                        sid = f"{cohort}-P{i:03d}" + (f"-S{s}" if slides_per_patient > 1 else "")
                        preds.append({"sample_id": sid, "patient_id": f"{cohort}-P{i:03d}", "time": float(time[i]),
                                      "event": int(event[i]), "risk": float(risk[i] + 0.01 * s)})
                df = pd.DataFrame(preds)
                c = concordance_index_censored(df["event"].astype(bool), df["time"], df["risk"], tied_tol=1e-8)[0]
                record = {
                    "schema": 1, "status": "ok", "method": method, "cohort": cohort, "backbone": backbone,
                    "fold": k, "seed": 0, "recipe": "harmonized", "selection": "last_epoch",
                    "unit": "slide" if slides_per_patient > 1 else "patient",
                    "config": {"lr": 2e-4}, "config_hash": "abc123",
                    "provenance": {"versions": {"torch": "2.13.0", "benchmark": "0.1.0"}, "git_commit": "deadbeef",
                                   "data_root": None, "synthetic": {"preset": "demo", "seed": 0},
                                   "created": "2025-01-01T00:00:00"},
                    "metrics": {"c_index": float(c), "c_index_uno": None, "ibs": None, "mean_auc": None},
                    "selected_epoch": 19, "history": [], "bin_edges": [0, 10, 20, 40, 1e9],
                    "train_risk_median": float(np.median(risk[train])),
                    "predictions": preds, "error": None, "seconds": 1.0, "weights": None,
                }
                cell = root / "cells" / method / cohort / backbone / "harmonized-last_epoch-s0"
                cell.mkdir(parents=True, exist_ok=True)
                (cell / f"fold{k}.json").write_text(json.dumps(record))
    return root


TINY = register_recipe(Recipe("tiny", lr=1e-3, epochs=2, accumulation=4, warmup_epochs=0, max_samples_per_epoch=12))


def grid(methods, folds, **settings):
    """The RunConfigs of a toy grid on cohort blca (the toy loader ignores the name)."""
    shared = RunConfig(ANY, ANY, recipe="tiny", **settings)
    return Experiment(tuple(methods), ("blca",), folds=tuple(folds), shared=shared).configs(5)


def toy_loader(name, data_root=None, backbone="resnet50", unit="patient"):
    return ToyCohort(n=30, seed=1)


def write_untrained_cell(results, cohort, method, data_root, fold=0, weights=True, config_extra=None):
    """A store record with an untrained model's weights (heatmaps need a model, not a good one)."""
    from benchmark.api.registry import create_method
    from benchmark.store.records import ResultStore

    torch.manual_seed(0)
    model = create_method(method, in_dim=cohort.in_dim, n_bins=4)
    val = cohort.folds[fold].val
    preds = [{"sample_id": s, "patient_id": cohort.samples.at[s, "patient_id"], "time": float(cohort.samples.at[s, "time"]),
              "event": int(cohort.samples.at[s, "event"]), "risk": 0.0} for s in val]
    record = {"status": "ok", "method": method, "cohort": cohort.name, "backbone": cohort.backbone.name, "fold": fold,
              "seed": 0, "recipe": "demo", "selection": "last",
              "config": {"recipe": get_recipe("demo").to_dict(), "in_dim": cohort.in_dim, "n_bins": 4,
                         "method_options": {}, "data_root": str(data_root),
                         "unit": "patient", **(config_extra or {})},
              "provenance": {}, "metrics": {"c_index": 0.5}, "train_risk_median": 0.0, "predictions": preds}
    ResultStore(results).write(record, state_dict=model.state_dict() if weights else None)
    return model, val


def snapshot(*folders: Path, skip: Path | None = None, recursive: bool = True) -> dict[str, float]:
    """``{file: mtime}`` of the files under ``folders`` (or only in them), ``skip`` and what lies under it left out."""
    seen = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in (folder.rglob("*") if recursive else folder.iterdir()):
            if skip is not None and (path == skip or skip in path.parents):
                continue
            if path.is_symlink():  # pytest's "<name>current" links follow the newest folder
                continue
            if path.is_file() or not recursive:
                seen[str(path)] = path.stat().st_mtime
    return seen


class Confinement:
    """What a case opened and changed; :meth:`check` asserts it all stayed inside the given roots.

    Watched for writes: the shared synthetic cohort and the repository's caches (every file), and the entries of
    the folders above the case's temporary folder (where an escaping path would land).
    """

    def __init__(self, tmp_path: Path, shared: Path):
        self.tmp_path = tmp_path
        self.opened: list[Path] = []
        self.deep = (shared, REPO / "data_cache", REPO / "results")
        self.shallow = (tmp_path.parent,)  # further up, other sessions of the shared machine come and go
        self.before = self._state()

    def _state(self) -> dict[str, float]:
        return {**snapshot(*self.deep), **snapshot(*self.shallow, skip=self.tmp_path, recursive=False)}

    def check(self, *roots: Path) -> None:
        allowed = [Path(r).resolve() for r in (self.tmp_path, *roots)]
        for path in self.opened:
            resolved = path.resolve()
            assert any(resolved == r or r in resolved.parents for r in allowed), f"read outside the roots: {path}"
        after = self._state()
        changed = {p for p, t in after.items() if self.before.get(p) != t}
        assert not changed, f"written outside the roots: {sorted(changed)[:5]}"
