"""benchmark.analysis.significance: each procedure against a known answer or an independent implementation, and
the acceptance test of issue 13: with equally good methods, the marking rate stays within alpha."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from sksurv.metrics import concordance_index_censored

from benchmark.analysis import significance as sig


# --------------------------------------------------------------------------------------------------
# Holm
# --------------------------------------------------------------------------------------------------
def brute_force_holm_rejections(p, alpha):
    """Holm's sequential procedure as he states it: walk the sorted p-values, reject while
    p_(i) <= alpha / (m - i + 1), stop at the first acceptance."""
    m = len(p)
    rejected = set()
    for step, index in enumerate(sorted(range(m), key=lambda i: p[i])):
        if p[index] > alpha / (m - step):
            break
        rejected.add(index)
    return rejected


def test_holm_hand_computed_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04): 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(sig.holm_adjust([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # monotonicity: the second step (1 * 0.021) is lifted to the first (2 * 0.02)
    np.testing.assert_allclose(sig.holm_adjust([0.02, 0.021]), [0.04, 0.04])
    np.testing.assert_allclose(sig.holm_adjust([0.6, 0.9, 0.3]), [1.0, 1.0, 0.9])  # capped at 1
    np.testing.assert_allclose(sig.holm_adjust([0.2]), [0.2])  # one test: unchanged


def test_holm_matches_brute_force_step_down():
    rng = np.random.default_rng(0)
    for _ in range(500):
        m = int(rng.integers(1, 12))
        p = rng.uniform(0, 0.1, m) ** rng.uniform(0.5, 2)
        alpha = float(rng.choice([0.01, 0.05, 0.1]))
        adjusted = sig.holm_adjust(p)
        assert set(np.flatnonzero(adjusted <= alpha)) == brute_force_holm_rejections(p, alpha)
        assert np.all(adjusted >= p - 1e-15) and np.all(adjusted <= 1)


def test_holm_rejects_bad_input():
    for bad in ([], [0.1, 1.2], [0.1, float("nan")], [-0.01]):
        with pytest.raises(ValueError):
            sig.holm_adjust(bad)


def test_families_are_declared_not_chosen():
    methods = ["a", "b", "c", "d"]
    assert sig.comparison_family(methods, "reference", "c") == [("c", "a"), ("c", "b"), ("c", "d")]
    assert len(sig.comparison_family(methods, "all-pairs")) == 6
    with pytest.raises(ValueError, match="reference"):
        sig.comparison_family(methods, "reference", None)
    with pytest.raises(ValueError, match="unknown family"):
        sig.comparison_family(methods, "vs-best")
    with pytest.raises(ValueError, match="at least 2"):
        sig.comparison_family(["a"], "all-pairs")


# --------------------------------------------------------------------------------------------------
# Corrected resampled t, interval, MDE
# --------------------------------------------------------------------------------------------------
def test_corrected_t_hand_computed():
    # mean 0.03, s^2 = 0.00025, (1/5 + 1/4) s^2 = 1.125e-4, t = 0.03 / 0.010607 = 2 sqrt(2), 4 df
    result = sig.corrected_resampled_t([0.01, 0.02, 0.03, 0.04, 0.05], n_folds=5)
    assert result.statistic == pytest.approx(2 * math.sqrt(2))
    assert result.df == 4 and result.mean == pytest.approx(0.03)
    assert result.p_value == pytest.approx(2 * stats.t.sf(2 * math.sqrt(2), 4))
    assert 0.04 < result.p_value < 0.05


def test_corrected_t_is_scipy_paired_t_rescaled():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.6, 0.05, 15), rng.normal(0.58, 0.05, 15)  # 3 repeats x 5 folds
    naive = stats.ttest_rel(a, b)
    result = sig.corrected_resampled_t(a - b, n_folds=5)
    # the correction only inflates the variance: t_corrected = t_naive sqrt((1/J) / (1/J + 1/(K-1)))
    assert result.statistic == pytest.approx(naive.statistic * math.sqrt((1 / 15) / (1 / 15 + 1 / 4)))
    assert result.p_value > naive.pvalue


def test_corrected_t_edge_cases_and_errors():
    assert sig.corrected_resampled_t([0.0] * 5, 5).p_value == 1.0  # identical methods
    assert sig.corrected_resampled_t([0.02] * 5, 5).p_value == 0.0  # a constant non-zero shift
    with pytest.raises(ValueError, match="K >= 2"):
        sig.corrected_resampled_t([0.1, 0.2], n_folds=1)
    with pytest.raises(ValueError, match="at least 2 fold values"):
        sig.corrected_resampled_t([0.1], n_folds=5)
    with pytest.raises(ValueError, match="NaN"):
        sig.corrected_resampled_t([0.1, float("nan")], n_folds=5)


def test_corrected_interval_matches_scipy_t_interval():
    values = np.array([0.61, 0.55, 0.66, 0.58, 0.63])
    mean, low, high = sig.corrected_t_interval(values, n_folds=5, confidence=0.95)
    scale = math.sqrt((1 / 5 + 1 / 4) * values.var(ddof=1))
    ref = stats.t.interval(0.95, 4, loc=values.mean(), scale=scale)
    assert (mean, low, high) == pytest.approx((values.mean(), *ref))
    naive = stats.t.interval(0.95, 4, loc=values.mean(), scale=stats.sem(values))
    assert high - low > naive[1] - naive[0]  # wider than the naive interval


def test_minimum_detectable_difference_hand_value_and_power():
    # (t_.975,4 + t_.8,4) * 0.05 * sqrt(0.45) = (2.7764 + 0.9410) * 0.05 * 0.6708 = 0.1247
    assert sig.minimum_detectable_difference(0.05, 5, 5) == pytest.approx(0.1247, abs=5e-4)
    # at the MDE the exact power of the two-sided t-test (noncentral t) is close to the target
    for n_units in (10, 25, 50):
        mde = sig.minimum_detectable_difference(0.05, n_units, 5, alpha=0.05, power=0.8)
        delta = mde / (0.05 * math.sqrt(1 / n_units + 1 / 4))
        crit = stats.t.ppf(0.975, n_units - 1)
        power = stats.nct.sf(crit, n_units - 1, delta) + stats.nct.cdf(-crit, n_units - 1, delta)
        assert 0.77 < power < 0.83
    with pytest.raises(ValueError):
        sig.minimum_detectable_difference(0.05, 1, 5)


# --------------------------------------------------------------------------------------------------
# Fold-stratified bootstrap
# --------------------------------------------------------------------------------------------------
def _random_fold(rng, n=40, slides=1):
    time = np.round(rng.exponential(20, n), 0) + 1
    event = (rng.random(n) < 0.6).astype(int)
    event[0] = 1
    patients = np.arange(n) // slides
    return sig.FoldSample(time, event, patients)


def test_observed_fold_mean_is_sksurv_per_fold_mean():
    rng = np.random.default_rng(1)
    folds = [_random_fold(rng) for _ in range(5)]
    risks = {"a": [np.round(rng.normal(size=40), 1) for _ in folds], "b": [rng.normal(size=40) for _ in folds]}
    observed, resampled = sig.fold_bootstrap_c(folds, risks, n_boot=50, seed=0)
    for i, m in enumerate(risks):
        ref = np.mean([concordance_index_censored(f.event.astype(bool), f.time, r, tied_tol=1e-8)[0]
                       for f, r in zip(folds, risks[m])])
        assert observed[i] == pytest.approx(ref, abs=1e-12)
    assert resampled.shape == (50, 2)


def test_weighted_c_equals_sksurv_on_the_duplicated_resample():
    rng = np.random.default_rng(2)
    fold = _random_fold(rng, n=30, slides=2)  # 15 patients with 2 samples each
    risk = rng.normal(size=30)
    weights = sig.patient_resample_weights(np.random.default_rng(5), fold.patients, 20)
    assert np.all(weights[:, 0::2] == weights[:, 1::2])  # both samples of a patient come along together
    comp = sig.comparable_pairs(fold.time, fold.event)
    conc = sig.concordance_scores(risk) * comp
    weighted = sig.weighted_quadratic_form(weights, conc) / sig.weighted_quadratic_form(weights, comp)
    for b in range(20):
        rows = np.repeat(np.arange(30), weights[b].astype(int))
        if fold.event[rows].any():
            ref = concordance_index_censored(fold.event[rows].astype(bool), fold.time[rows], risk[rows],
                                             tied_tol=1e-8)[0]
            assert weighted[b] == pytest.approx(ref, abs=1e-12)


def test_constant_shift_per_fold_is_no_difference_for_the_fold_test_but_is_for_pooled():
    """Issue 13, point 2: same ranking in every fold, a different constant risk shift per fold."""
    rng = np.random.default_rng(4)
    folds = [_random_fold(rng, n=60) for _ in range(5)]
    base = [rng.normal(size=60) for _ in folds]
    shifted = [r + 3.0 * k for k, r in enumerate(base)]
    data = sig.ColumnData({"a": np.zeros(5), "b": np.zeros(5)}, 5, tuple(folds), {"a": base, "b": shifted})
    fold_test = sig.pair_tests(data, [("a", "b")], "fold-bootstrap", n_boot=300)[("a", "b")]
    assert fold_test == (0.0, 1.0)
    pooled_diff, _ = sig.pair_tests(data, [("a", "b")], "pooled-bootstrap", n_boot=300)[("a", "b")]
    assert abs(pooled_diff) > 0.01  # the pooled C sees the shifts between models


def test_bootstrap_p_value_counts():
    assert sig.bootstrap_p_value(np.ones(99)) == pytest.approx(2 / 100)
    assert sig.bootstrap_p_value(np.r_[np.ones(50), -np.ones(50)]) == 1.0
    with pytest.raises(ValueError):
        sig.bootstrap_p_value(np.array([]))


def test_fold_sample_and_column_data_validate():
    with pytest.raises(ValueError, match="differ in length"):
        sig.FoldSample(np.ones(3), np.ones(2), np.arange(3))
    with pytest.raises(ValueError, match="no comparable pair"):
        sig.FoldSample(np.arange(3.0), np.zeros(3), np.arange(3))
    with pytest.raises(ValueError, match="different numbers"):
        sig.ColumnData({"a": np.zeros(5), "b": np.zeros(4)}, 5)
    with pytest.raises(ValueError, match="K >= 2"):
        sig.ColumnData({"a": np.zeros(5), "b": np.zeros(5)}, 1)
    with pytest.raises(ValueError, match="predictions"):
        sig.resolve_test("fold-bootstrap", sig.ColumnData({"a": np.zeros(5), "b": np.zeros(5)}, 5))
    fold = sig.FoldSample(np.arange(1.0, 5.0), np.ones(4), np.arange(4))
    with pytest.raises(ValueError, match="risks for 2 folds, expected 1"):
        sig.fold_bootstrap_c([fold], {"a": [np.zeros(4), np.zeros(4)]})
    with pytest.raises(ValueError, match="3 risks for 4 samples"):
        sig.fold_bootstrap_c([fold], {"a": [np.zeros(3)]})
    with pytest.raises(ValueError, match="fold samples"):
        sig.ColumnData({"a": np.zeros(5), "b": np.zeros(5)}, 5, folds=(fold,))
    with pytest.raises(ValueError, match="confidence"):
        sig.corrected_t_interval([0.5, 0.6], 5, confidence=95)
    with pytest.raises(ValueError, match="alpha"):
        sig.column_significance(sig.ColumnData({"a": np.zeros(5), "b": np.ones(5)}, 5), alpha=5)


# --------------------------------------------------------------------------------------------------
# One column: marks and footer
# --------------------------------------------------------------------------------------------------
def test_column_marks_direction_and_footer():
    rng = np.random.default_rng(7)
    column = sig.simulate_null_column(rng, n_methods=3, n_patients=300)
    better = [r for r in column.risks["m0"]]
    folds = column.folds
    truth = [f.time for f in folds]  # an oracle: risk = -time ranks every comparable pair right
    risks = {"ref": better, "oracle": [-t for t in truth], "noise": [rng.normal(size=t.size) for t in truth]}
    values = {m: np.array([sig.fold_c_index(f, r) for f, r in zip(folds, risks[m])]) for m in risks}
    data = sig.ColumnData(values, 5, folds, risks)
    result = sig.column_significance(data, family="reference", reference="ref", n_boot=400)
    assert result.test == "fold-bootstrap" and result.n_comparisons == 2
    assert result.marks == {"oracle": "better", "noise": "worse"}
    assert all(result.adjusted_p[p] >= result.raw_p[p] for p in result.pairs)
    footer = result.footer("*")
    for words in ("Holm-adjusted over 2 comparisons", "every method vs ref", "better than ref", "alpha 0.05", "5 folds x 1 repeat"):
        assert words in footer
    everything = sig.column_significance(data, family="all-pairs", test="corrected-t", alpha=0.05)
    assert everything.n_comparisons == 3 and "all pairs" in everything.footer()
    assert everything.marks.get("noise") == "worse" and "oracle" not in everything.marks


# --------------------------------------------------------------------------------------------------
# Null calibration: the acceptance test
# --------------------------------------------------------------------------------------------------
ALPHA = 0.05


def _new_scheme(family, test, n_boot=400):
    def marks_anything(column, index):
        return sig.column_significance(column, family=family, reference="m0", alpha=ALPHA, test=test,
                                       n_boot=n_boot, seed=index).marks
    return marks_anything


def test_null_marking_rate_within_alpha_and_the_vs_best_rule_exceeds_it():
    schemes = {
        "reference, fold bootstrap": _new_scheme("reference", "fold-bootstrap"),
        "all pairs, corrected t": _new_scheme("all-pairs", "corrected-t"),
        "reference, corrected t": _new_scheme("reference", "corrected-t"),
    }
    rates = sig.null_marking_rates(schemes, n_replicates=300, seed=13, n_methods=6, n_patients=150)
    for name, rate in rates.items():  # measured 0.040, 0.013, 0.030
        assert rate.within(ALPHA), f"{name}: {rate.rate:.3f} of 300 null columns marked"
    # the former rule on the first 100 of the same columns (the pooled bootstrap is the slow part)
    rng = np.random.default_rng(13)
    columns = [sig.simulate_null_column(rng, n_methods=6, n_patients=150) for _ in range(100)]
    old = sig.marking_rate(columns, lambda column, i: sig.vs_best_marks(column, alpha=ALPHA, n_boot=200, seed=i))
    assert not old.within(ALPHA) and old.rate > 0.2  # measured 0.36 on 300 columns (issue 13: 38 %)
    vs_best_fold = sig.marking_rate(columns, lambda column, i: sig.vs_best_marks(
        column, alpha=ALPHA, test="fold-bootstrap", n_boot=300, seed=i))
    assert not vs_best_fold.within(ALPHA)  # the right test does not save a data-chosen, unadjusted family


def test_null_marking_rate_with_repeats_uses_corrected_t():
    rng = np.random.default_rng(21)
    columns = [sig.simulate_null_column(rng, n_methods=4, n_patients=120, n_repeats=3) for _ in range(300)]
    assert sig.resolve_test("auto", columns[0]) == "corrected-t"
    rate = sig.marking_rate(columns, _new_scheme("all-pairs", "auto"))
    assert rate.within(ALPHA)


def test_a_truly_better_method_is_found():
    """The calibrated test is not calibrated by never marking: a much better method is detected."""
    rng = np.random.default_rng(5)
    found = 0
    for index in range(40):
        column = sig.simulate_null_column(rng, n_methods=3, n_patients=200, noise=1.0)
        risks = dict(column.risks)
        risks["m0"] = [-f.time for f in column.folds]  # perfect ranking
        values = {m: np.array([sig.fold_c_index(f, r) for f, r in zip(column.folds, risks[m])]) for m in risks}
        data = sig.ColumnData(values, 5, column.folds, risks)
        found += sig.column_significance(data, reference="m0", n_boot=300, seed=index).marks == {
            "m1": "worse", "m2": "worse"}
    assert found >= 36


# --------------------------------------------------------------------------------------------------
# Friedman, Iman-Davenport, Nemenyi
# --------------------------------------------------------------------------------------------------
def test_friedman_and_iman_davenport_demsar_example():
    # Demsar 2006, sec. 3.2.2: 14 data sets, 4 methods, mean ranks 3.143, 2.000, 2.893, 1.964:
    # chi2_F = 9.28, F_F = 3.69 (critical F(3, 39) = 2.85 at 0.05), CD = 1.25
    result = sig.friedman_from_mean_ranks([3.143, 2.000, 2.893, 1.964], 14)
    assert round(result.chi2, 2) == 9.28 and round(result.f, 2) == 3.69
    assert (result.df1, result.df2) == (3, 39) and result.significant(0.05)
    assert stats.f.ppf(0.95, 3, 39) == pytest.approx(2.85, abs=0.01)
    assert round(sig.nemenyi_critical_difference(4, 14), 2) == 1.25


def test_friedman_chi2_matches_scipy():
    rng = np.random.default_rng(8)
    for k, n in [(3, 6), (5, 10), (11, 6)]:
        scores = rng.normal(0.6, 0.05, size=(n, k)) + np.linspace(0, 0.03, k)
        result = sig.friedman_from_mean_ranks(sig.rank_rows(scores).mean(axis=0), n)
        ref = stats.friedmanchisquare(*scores.T)
        assert result.chi2 == pytest.approx(ref.statistic) and result.chi2_p_value == pytest.approx(ref.pvalue)
        # Iman-Davenport from the chi2, by its own formula
        f = (n - 1) * ref.statistic / (n * (k - 1) - ref.statistic)
        assert result.f == pytest.approx(f)
        assert result.f_p_value == pytest.approx(stats.f.sf(f, k - 1, (k - 1) * (n - 1)))


def test_nemenyi_q_matches_demsar_table_5():
    table5 = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]
    for k, q in zip(range(2, 11), table5):
        assert sig.nemenyi_q(k, 0.05) == pytest.approx(q, abs=1e-3)


def test_rank_rows_ties_and_errors():
    np.testing.assert_allclose(sig.rank_rows([[0.7, 0.7, 0.5]]), [[1.5, 1.5, 3.0]])
    np.testing.assert_allclose(sig.rank_rows([[0.1, 0.2]], higher_is_better=False), [[1.0, 2.0]])
    with pytest.raises(ValueError):
        sig.rank_rows([[0.1, float("nan")]])
    with pytest.raises(ValueError, match="2 data sets"):
        sig.friedman_from_mean_ranks([1.0, 2.0], 1)


def test_fisher_combination_matches_scipy():
    p = [0.2, 0.04, 0.5, 0.9, 0.01]
    assert sig.fisher_combined_p(p) == pytest.approx(stats.combine_pvalues(p, method="fisher").pvalue)
    assert sig.fisher_combined_p([0.3, float("nan")]) == pytest.approx(0.3)  # one test: its own p
    with pytest.raises(ValueError):
        sig.fisher_combined_p([])


def test_bootstrap_resamples_suffice_for_the_holm_thresholds():
    # 100 resamples cannot give p < 0.05 / 3: raised so that 2 / (B + 1) <= alpha / (2 m)
    assert sig.resamples_for(3, 0.05, 100) == 240 and sig.resamples_for(3, 0.05, 1000) == 1000
    for m in (1, 3, 15, 36):
        b = sig.resamples_for(m, 0.05, 10)
        assert 2 / (b + 1) <= 0.05 / (2 * m)
    column = sig.simulate_null_column(np.random.default_rng(0), n_methods=3)
    result = sig.column_significance(column, family="all-pairs", test="fold-bootstrap", n_boot=50)
    assert result.n_boot == 240 and "(240 resamples)" in result.footer()
