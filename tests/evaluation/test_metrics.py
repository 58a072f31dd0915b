"""Metrics: sign contract, brute-force agreement, the 275 released MCAT folds, IPCW metrics, aggregation."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scipy import stats
from sksurv.metrics import brier_score, integrated_brier_score
from sksurv.util import Surv

from benchmark.evaluation.metrics import (aggregate, c_index, censor_after, d_calibration, evaluate, evaluation_times,
                                        survival_at)

PREDICTIONS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tcga_clinical" / "derived" / "predictions"


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


def test_survival_curve_constant_hazard_within_bins():
    s = np.array([[0.9, 0.6, 0.3, 0.1]])
    edges = [0.0, 10.0, 20.0, 30.0, 100.0]
    # S = 1 up to e_0; at the edges S_k; half-way through bin 1: sqrt(0.9); through bin 2: 0.9 sqrt(0.6 / 0.9)
    got = survival_at(s, edges, [-1.0, 0.0, 5.0, 10.0, 15.0, 20.0, 100.0])
    np.testing.assert_allclose(got, [[1.0, 1.0, math.sqrt(0.9), 0.9, 0.9 * math.sqrt(0.6 / 0.9), 0.6, 0.1]])
    with pytest.raises(ValueError, match="K \\+ 1 bin edges"):
        survival_at(s, edges[:-1], [1.0])


def test_survival_curve_is_exact_for_an_exponential_model():
    """Known answer: with a constant hazard, S_k = exp(-lambda e_k) at the edges reproduces exp(-lambda t)
    everywhere, past the last edge included."""
    rates = np.array([0.01, 0.05, 0.2])
    edges = np.array([0.0, 3.0, 7.5, 20.0, 41.0])
    times = np.linspace(0, 60, 121)
    got = survival_at(np.exp(-np.outer(rates, edges[1:])), edges, times)
    np.testing.assert_allclose(got, np.exp(-np.outer(rates, times)), rtol=1e-12)


def test_ibs_known_answer_without_censoring():
    """No censoring: the censoring weights are 1 and BS(t) = mean((1{T > t} - S(t))^2), integrated by the
    trapezoidal rule over the grid and divided by its length (sksurv's definition)."""
    rng = np.random.default_rng(0)
    rate = np.exp(rng.normal(size=120)) / 20
    time = rng.exponential(1 / rate)
    event = np.ones(120, dtype=int)
    train, test = slice(0, 80), slice(80, None)
    edges = np.r_[0.0, np.quantile(time[train], [0.25, 0.5, 0.75]), time.max() + 1]
    survival = np.exp(-np.outer(rate[test], edges[1:]))
    got = evaluate(time[test], event[test], rate[test], time[train], event[train], survival=survival, bin_edges=edges)
    grid = evaluation_times(time[train], time[test])
    truth = np.exp(-np.outer(rate[test], grid))
    bs = np.mean(((time[test][:, None] > grid[None, :]) - truth) ** 2, axis=0)
    expected = np.sum(np.diff(grid) * (bs[1:] + bs[:-1]) / 2) / (grid[-1] - grid[0])
    assert got["ibs"] == pytest.approx(expected, rel=1e-10)
    y_train, y_test = Surv.from_arrays(event[train] == 1, time[train]), Surv.from_arrays(event[test] == 1, time[test])
    assert got["ibs"] == pytest.approx(integrated_brier_score(y_train, y_test, truth, grid), rel=1e-10)


def test_censoring_after_the_grid_leaves_sksurv_brier_scores_unchanged():
    time, event, x = _surv_data(seed=3, n=300)
    y_train = Surv.from_arrays(event[:200].astype(bool), time[:200])
    grid = np.quantile(time[200:], [0.2, 0.4, 0.6])
    estimate = np.exp(-np.outer(np.exp(x[200:]), grid) / 30)
    t_cut, e_cut = censor_after(time[200:], event[200:], grid[-1])
    assert t_cut.max() > grid[-1] and (t_cut <= np.sort(time[200:][time[200:] > grid[-1]])[0]).all()
    plain = brier_score(y_train, Surv.from_arrays(event[200:].astype(bool), time[200:]), estimate, grid)[1]
    cut = brier_score(y_train, Surv.from_arrays(e_cut, t_cut), estimate, grid)[1]
    np.testing.assert_allclose(cut, plain, rtol=1e-12)


def test_no_nan_in_thirty_ordinary_folds():
    """Issue 13, point 5: IBS / td-AUC were NaN whenever a validation event fell after the last training time."""
    for draw in range(30):
        rng = np.random.default_rng(100 + draw)
        n = int(rng.integers(60, 200))
        x = rng.normal(size=n)
        t_event, t_cens = rng.exponential(30 * np.exp(-x)), rng.uniform(2, 150, n)
        time, event = np.minimum(t_event, t_cens).round(1) + 0.1, (t_event <= t_cens).astype(int)
        fold = rng.permutation(np.arange(n) % 5)
        tr, te = fold != 0, fold == 0
        edges = np.r_[time[tr].min() - 1e-6, np.quantile(time[tr][event[tr] == 1], [0.25, 0.5, 0.75]),
                      time[tr].max() + 1e-6]
        survival = np.exp(-np.outer(np.exp(x[te]), edges[1:]) / 30)
        errors = {}
        got = evaluate(time[te], event[te], x[te], time[tr], event[tr], survival=survival, bin_edges=edges,
                       errors=errors)
        assert errors == {} and all(np.isfinite(v) for v in got.values()), (draw, got, errors)


def test_metric_failures_keep_their_reason():
    errors = {}
    got = evaluate([1.0, 2.0, 3.0, 4.0], [0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 5.0], [1, 0, 1],
                   errors=errors)
    assert np.isnan(got["c_index"]) and "all samples are censored" in errors["c_index"]
    assert errors["ibs"] == errors["mean_auc"] == "ValueError: no event in the validation fold"
    assert "Cox head" in errors["d_calibration_p"]
    errors = {}
    got = evaluate([1.0, 2.0, 3.0, 4.0], [1, 0, 1, 0], [0.4, 0.2, 0.3, 0.1], [1.0, 2.0, 5.0], [1, 0, 1],
                   errors=errors)
    assert np.isfinite(got["mean_auc"]) and "Cox head" in errors["ibs"]  # the real reason, not the grid


def test_small_folds_with_an_event_in_range_never_lose_a_metric_to_the_grid():
    """Folds of 8 patients with 1-3 events (as the tiny preset's): wherever the validation fold has an event
    before both folds' last times, the AUC, Uno's C and the IBS are finite; otherwise the reason names it."""
    rng = np.random.default_rng(12)
    edges = np.array([0.0, 10.0, 25.0, 50.0, 200.0])
    checked = 0
    for _ in range(300):
        time = np.round(rng.exponential(30.0, 40), 1) + 0.1
        event = (rng.random(40) < 0.25).astype(int)
        x = rng.normal(size=40)
        survival = np.exp(-np.outer(np.exp(x), [0.2, 0.5, 1.0, 2.0]))
        te, tr = np.arange(8), np.arange(8, 40)
        errors = {}
        got = evaluate(time[te], event[te], x[te], time[tr], event[tr], survival=survival[te], bin_edges=edges,
                       errors=errors)
        hi = min(time[te].max(), time[tr].max())
        in_range = event[te].astype(bool) & (time[te] >= max(time[te].min(), time[tr].min())) & (time[te] < hi)
        if in_range.any():
            checked += 1
            grid = evaluation_times(time[tr], time[te], test_event=event[te])
            assert grid.size >= 1 and grid.min() >= time[te][in_range].min()
            assert np.isfinite(got["mean_auc"]) and np.isfinite(got["c_index_uno"]), errors
            assert np.isfinite(got["ibs"]) or "fewer than 2 evaluation times" in errors["ibs"], errors
        else:
            assert "no event" in errors["mean_auc"] or "no validation event" in errors["mean_auc"]
    assert checked > 150


def test_d_calibration_hand_computed():
    # 4 bins. uncensored S=0.1 -> bin 0; uncensored S=0.6 -> bin 2; censored s=0.6 -> (0.6-0.5)/0.6 = 1/6 to bin 2
    # and 1/(4*0.6) to bins 0, 1; censored s=0.2 -> (0.2-0)/0.2 = 1 to bin 0
    result = d_calibration([0.1, 0.6, 0.6, 0.2], [1, 1, 0, 0], n_bins=4)
    np.testing.assert_allclose(result.counts, [2 + 1 / 2.4, 1 / 2.4, 1 + 1 / 6, 0.0])
    statistic = sum((c - 1.0) ** 2 for c in result.counts)
    assert result.statistic == pytest.approx(statistic) and result.statistic == pytest.approx(3.375, abs=1e-9)
    assert result.p_value == pytest.approx(stats.chisquare(result.counts).pvalue)
    with pytest.raises(ValueError):
        d_calibration([0.5, 0.2], [1], n_bins=4)


def test_d_calibration_tells_calibrated_from_miscalibrated():
    rng = np.random.default_rng(11)
    rate = np.exp(rng.normal(size=3000)) / 30
    t_event, t_cens = rng.exponential(1 / rate), rng.uniform(0, 100, 3000)
    time, event = np.minimum(t_event, t_cens), t_event <= t_cens
    calibrated = d_calibration(np.exp(-rate * time), event)
    too_pessimistic = d_calibration(np.exp(-3 * rate * time), event)
    assert calibrated.counts.sum() == pytest.approx(3000)
    assert calibrated.p_value > 0.05 and too_pessimistic.p_value < 1e-6


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
    assert set(good) == {"c_index", "c_index_uno", "ibs", "mean_auc", "d_calibration_p"}
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


def test_d_calibration_loses_its_power_under_censoring():
    """Calibrated exponential curves on 60-patient folds: the test rejects about alpha of them uncensored, almost
    never at half censored (the mass of censored samples is spread over the low bins): the report's
    ``DCAL_POWERLESS_CENSORING`` rests on this."""
    from benchmark.analysis.report import DCAL_POWERLESS_CENSORING

    rng = np.random.default_rng(0)

    def false_alarms(censor_high):
        rejected, censored = 0, []
        for _ in range(400):
            hazard = np.exp(rng.normal(size=60)) / 30
            event_time = rng.exponential(1 / hazard)
            censor = rng.uniform(0, censor_high, 60) if censor_high else np.full(60, np.inf)
            time, event = np.minimum(event_time, censor), event_time <= censor
            censored.append(1 - event.mean())
            rejected += d_calibration(np.exp(-hazard * time), event).p_value <= 0.05
        return rejected / 400, float(np.mean(censored))

    uncensored, _ = false_alarms(None)
    heavy, share = false_alarms(40.0)
    assert 0.02 <= uncensored <= 0.085 and share > DCAL_POWERLESS_CENSORING and heavy <= 0.005
