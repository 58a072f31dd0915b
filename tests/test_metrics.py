"""Metrics: sign contract, brute-force agreement, the 275 released MCAT folds, IPCW metrics, aggregation."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.training.metrics import aggregate, c_index, discrete_survival_function, evaluate, evaluation_times

PREDICTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga_clinical" / "derived" / "predictions"


def brute_force_harrell(time, event, risk):
    """Pairs (i, j) comparable when i has the event and t_i < t_j (or t_i == t_j and j censored)."""
    num = den = 0.0
    for i in range(len(time)):
        if not event[i]:
            continue
        for j in range(len(time)):
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def _toy(n=60, seed=0):
    rng = np.random.default_rng(seed)
    time = np.round(rng.exponential(20, n), 0) + 1  # rounded: tied times
    event = rng.random(n) < 0.6
    risk = np.round(rng.normal(size=n), 1)  # rounded: tied risks
    return time, event, risk


def test_sign_contract_higher_risk_shorter_survival():
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    event = np.ones(5, dtype=int)  # int events are accepted
    assert c_index(time, event, -time) == 1.0
    assert c_index(time, event, time) == 0.0
    assert c_index(time, event, np.zeros(5)) == 0.5


def test_matches_brute_force_with_ties():
    for seed in range(3):
        time, event, risk = _toy(seed=seed)
        assert c_index(time, event, risk) == pytest.approx(brute_force_harrell(time, event, risk), abs=1e-12)


def test_all_censored_is_a_clear_error():
    with pytest.raises(ValueError, match="all samples are censored"):
        c_index([1.0, 2.0], [0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="risk has"):
        c_index([1.0, 2.0], [1, 0], [0.1])


@pytest.mark.skipif(not PREDICTIONS.is_dir(), reason="../shared real-data predictions not present")
def test_reproduces_all_275_released_mcat_folds():
    preds = pd.read_csv(PREDICTIONS / "MCAT_results_ICCV_val_predictions.csv.zip")
    check = pd.read_csv(PREDICTIONS / "val_cindex_check.csv")
    check = check[check["repo"] == "mahmoodlab/MCAT"].set_index(["experiment_dir", "cohort", "fold"])
    folds = preds.groupby(["experiment", "cohort", "fold"])
    assert folds.ngroups == 275
    worst = 0.0
    for key, g in folds:
        c = c_index(g["survival_months"].to_numpy(), (1 - g["censorship"]).to_numpy(), g["risk"].to_numpy())
        worst = max(worst, abs(c - check.loc[key, "val_cindex_summary"]))
    assert worst <= 1e-12
    # aggregation: mean and population std, as MCAT's cindex.csv (AMIL BLCA 0.5362 +- 0.0385)
    amil = check.loc["AMILsm_nll_surv_a0.0_5foldcv_gc32_sig"].loc["blca", "val_cindex_summary"]
    mean, std = aggregate(amil.tolist())
    assert (round(mean, 4), round(std, 4)) == (0.5362, 0.0385)


def test_aggregate_population_std_and_nan():
    assert aggregate([0.5, 0.7]) == pytest.approx((0.6, 0.1))
    assert aggregate([0.5, float("nan"), 0.7]) == pytest.approx((0.6, 0.1))
    assert np.isnan(aggregate([])[0])


def test_discrete_survival_step_function():
    s = np.array([[0.9, 0.6, 0.3, 0.1]])
    edges = [0.0, 10.0, 20.0, 30.0, 100.0]
    # before the first inner edge S = 1; [10, 20) -> S_1; [20, 30) -> S_2; [30, ...) -> S_3 then S_4 past the end
    got = discrete_survival_function(s, edges, [5.0, 10.0, 19.9, 20.0, 35.0, 100.0])
    np.testing.assert_allclose(got, [[1.0, 0.9, 0.9, 0.6, 0.3, 0.1]])
    with pytest.raises(ValueError, match="K \\+ 1 bin edges"):
        discrete_survival_function(s, edges[:-1], [1.0])


def _surv_data(seed=1, n=200):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t_event = rng.exponential(np.exp(-x) * 30)
    t_cens = rng.uniform(5, 80, n)
    return np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int), x


def test_evaluate_informative_beats_reversed():
    time, event, x = _surv_data()
    tr, te = slice(0, 120), slice(120, None)
    edges = np.array([0.0, *np.quantile(time[tr][event[tr] == 1], [0.25, 0.5, 0.75]), time.max() + 1])
    # survival of each sample from its true hazard (exponential model), on the bin ends
    ends = edges[1:]
    good_s = np.exp(-np.outer(np.exp(x[te]), ends) / 30)
    bad_s = np.exp(-np.outer(np.exp(-x[te]), ends) / 30)
    good = evaluate(time[te], event[te], x[te], time[tr], event[tr], survival=good_s, bin_edges=edges)
    bad = evaluate(time[te], event[te], -x[te], time[tr], event[tr], survival=bad_s, bin_edges=edges)
    assert set(good) == {"c_index", "c_index_uno", "ibs", "mean_auc"}
    assert good["c_index"] > 0.65 and bad["c_index"] == pytest.approx(1 - good["c_index"], abs=1e-9)
    assert good["c_index_uno"] > 0.6 > bad["c_index_uno"]
    assert good["mean_auc"] > 0.6 > bad["mean_auc"]
    assert 0 < good["ibs"] < bad["ibs"]
    # without a survival function (Cox heads) the IBS is undefined, reported as NaN
    assert np.isnan(evaluate(time[te], event[te], x[te], time[tr], event[tr])["ibs"])


def test_evaluation_grid_inside_both_follow_ups():
    time, _, _ = _surv_data()
    grid = evaluation_times(time[:50], time[50:] * 2)
    assert grid.size > 2 and grid.min() >= (time[50:] * 2).min() and grid.max() < time[:50].max()
