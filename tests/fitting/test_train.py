"""The trainer: windows, schedule, sampler, determinism, selection rules, Cox windows, learning a planted signal."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from benchmark.data.bag import Needs
from benchmark.api.output import SurvivalOutput
from benchmark.settings.config import RunConfig
from benchmark.settings.options import parse_assignments
from benchmark.settings.recipes import Recipe, get_recipe, register_recipe
from benchmark.api.registry import register_method
from benchmark.fitting.trainer import (
    balanced_weights, draw_epoch, inner_split, lr_factor, plan_windows, resolve_device, train_fold,
)
from fakes import ToyCohort, scoped_registry


class ToyCoxMean(nn.Module):
    """Linear log-risk of the mean patch feature (test-only Cox head)."""

    def __init__(self, in_dim, n_bins=4):
        super().__init__()
        self.linear = nn.Linear(in_dim, 1)

    def forward(self, bag):
        return SurvivalOutput.from_log_risk(self.linear(bag.features[20].mean(0)))


torch.set_num_threads(1)  # tiny models: one thread avoids oversubscription on the shared 2-core CI
FAST = register_recipe(Recipe("test", lr=2e-3, weight_decay=0.0, epochs=6, accumulation=8, alpha=0.0, warmup_epochs=1))


def fold_config(method, fold=0, seed=0, recipe="test", **settings):
    """The RunConfig of one toy-cohort cell."""
    return RunConfig(method, "toy", fold=fold, seed=seed, recipe=recipe, **settings)


def test_windows_cover_every_draw_once():
    assert plan_windows(70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert plan_windows(65, 32, min_last=2) == [(0, 32), (32, 65)]  # a one-bag Cox window is merged
    assert plan_windows(5, 32) == [(0, 5)]


def test_lr_warmup_then_cosine():
    factors = [lr_factor(s, 4, 20, "cosine") for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_factor(19, 0, 20, "constant") == 1.0


def test_balanced_sampler_tolerates_empty_classes_and_balances():
    classes = [(0, 0)] * 90 + [(1, 1)] * 10  # six of the eight (bin, censorship) classes are empty
    w = balanced_weights(classes)
    assert w[0] == pytest.approx(1 / 90) and w[-1] == pytest.approx(1 / 10)
    draws = draw_epoch(100, 4000, torch.Generator().manual_seed(0), w)
    share = np.mean(np.asarray(draws) >= 90)
    assert 0.45 < share < 0.55
    shuffled = draw_epoch(10, 10, torch.Generator().manual_seed(0), None)
    assert sorted(shuffled) == list(range(10))


def test_inner_split_is_stratified_seeded_and_disjoint():
    ids = [f"s{i}" for i in range(40)]
    strata = [i % 4 for i in range(40)]
    fit, inner = inner_split(ids, strata, 0.25, seed=3)
    assert len(inner) == 8 and set(fit).isdisjoint(inner) and set(fit) | set(inner) == set(ids)
    assert sorted(strata[int(s[1:])] for s in inner) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert inner_split(ids, strata, 0.25, seed=3) == (fit, inner)


def test_recipes_and_overrides():
    paper = get_recipe("paper")
    assert (paper.lr, paper.weight_decay, paper.accumulation, paper.alpha, paper.warmup_epochs) == (1e-4, 4e-6, 32, 0.2, 5)
    mahmood = get_recipe("mahmood")
    assert (mahmood.lr, mahmood.weight_decay, mahmood.epochs, mahmood.alpha, mahmood.schedule) == (2e-4, 1e-5, 20, 0.0, "constant")
    changed = get_recipe("demo", parse_assignments(["lr=3e-4", "epochs=4", "max_samples_per_epoch=none"]))
    assert (changed.lr, changed.epochs, changed.max_samples_per_epoch) == (3e-4, 4, None)
    with pytest.raises(ValueError, match="unknown recipe field"):
        get_recipe("paper", {"learning_rate": "1"})
    with pytest.raises(KeyError, match="Did you mean"):
        get_recipe("papr")  # "Did you mean"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_same_seed_identical_and_amil_learns_the_signal():
    cohort = ToyCohort()
    a = train_fold(cohort, fold_config("amil", 0, seed=5), device="cpu")
    b = train_fold(ToyCohort(), fold_config("amil", 0, seed=5), device="cpu")
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [p["risk"] for p in a.predictions] == [p["risk"] for p in b.predictions]
    c = train_fold(ToyCohort(), fold_config("amil", 0, seed=6), device="cpu")
    assert [p["risk"] for p in a.predictions] != [p["risk"] for p in c.predictions]
    # every epoch ends with a step on its short last window: 30 draws / 8 -> 4 steps per epoch, none leaks
    assert a.extra["steps_per_epoch"] == 4 and a.extra["optimizer_steps"] == 6 * 4
    assert a.metrics["c_index"] > 0.75  # the planted signal is learned
    assert a.selected_epoch == 6 and len(a.history) == 6
    assert {p["sample_id"] for p in a.predictions} == set(cohort.folds[0].val)
    risks = [p["risk"] for p in a.predictions]
    assert min(risks) >= -4 and max(risks) < 0  # risk = -sum(S) with 4 bins
    assert np.isfinite(a.train_risk_median) and len(a.bin_edges) == 5


def test_paper_max_selects_the_best_reported_epoch():
    r = train_fold(ToyCohort(), fold_config("amil", 1, seed=0, selection="paper-max"), device="cpu")
    scores = [h["val_c_index"] for h in r.history]
    assert r.selected_epoch == int(np.argmax(scores)) + 1
    assert r.metrics["c_index"] == pytest.approx(max(scores), abs=1e-12)


def test_inner_selection_never_looks_at_the_reported_fold():
    cohort = ToyCohort()
    r = train_fold(cohort, fold_config("amil", 0, seed=0, selection="inner"), device="cpu")
    val = set(cohort.folds[0].val)
    # the reported fold is read exactly once per sample: the final evaluation
    assert sum(s in val for s in cohort.bag_calls) == len(val)
    assert all("inner_c_index" in h for h in r.history)
    assert r.extra["n_inner"] == 6 and r.extra["n_fit"] == 24
    assert r.selected_epoch == int(np.nanargmax([h["inner_c_index"] for h in r.history])) + 1


def test_cox_head_trains_over_windows(monkeypatch):
    scoped_registry(monkeypatch)
    register_method("toy_cox_mean", needs=Needs(), source="test only", loss="cox", in_all=False)(ToyCoxMean)
    r = train_fold(ToyCohort(), fold_config("toy_cox_mean", 0, seed=0), device="cpu")
    assert r.metrics["c_index"] > 0.7 and np.isnan(r.metrics["ibs"])
    with pytest.raises(ValueError, match=">= 2 bags"):
        train_fold(ToyCohort(), fold_config("toy_cox_mean", recipe=register_recipe(Recipe("one", accumulation=1, epochs=1, warmup_epochs=0)).name), device="cpu")


def test_random_floor_has_no_training_and_is_seeded():
    a = train_fold(ToyCohort(), fold_config("random", 0, seed=1), device="cpu")
    b = train_fold(ToyCohort(), fold_config("random", 0, seed=1), device="cpu")
    c = train_fold(ToyCohort(), fold_config("random", 0, seed=2), device="cpu")
    assert a.n_parameters == 0 and a.extra["optimizer_steps"] == 0
    assert [p["risk"] for p in a.predictions] == [p["risk"] for p in b.predictions]
    assert [p["risk"] for p in a.predictions] != [p["risk"] for p in c.predictions]
