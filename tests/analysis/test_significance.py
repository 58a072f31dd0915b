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


def _sksurv_c(fold, risk, rows=None):
    rows = np.arange(fold.time.size) if rows is None else rows
    return concordance_index_censored(fold.event[rows].astype(bool), fold.time[rows], np.asarray(risk)[rows],
                                      tied_tol=1e-8)[0]


def test_observed_fold_mean_is_the_mean_over_seeds_of_sksurv_per_fold_c():
    """The tested quantity is the table's: mean over folds of the mean over seeds of each seed's C-index."""
    rng = np.random.default_rng(1)
    folds = [_random_fold(rng) for _ in range(5)]
    risks = {"a": [np.round(rng.normal(size=(2, 40)), 1) for _ in folds], "b": [rng.normal(size=40) for _ in folds]}
    boot = sig.fold_bootstrap_c(folds, risks, n_boot=50, seed=0)
    ref_a = np.mean([np.mean([_sksurv_c(f, seed_risk) for seed_risk in r]) for f, r in zip(folds, risks["a"])])
    ref_b = np.mean([_sksurv_c(f, r) for f, r in zip(folds, risks["b"])])
    assert boot.observed == pytest.approx([ref_a, ref_b], abs=1e-12)
    averaged_first = np.mean([_sksurv_c(f, r.mean(axis=0)) for f, r in zip(folds, risks["a"])])
    assert abs(boot.observed[0] - averaged_first) > 1e-3  # not the C of the seed-averaged (ensemble) risk
    assert boot.resampled.shape == (50, 2)


def test_bootstrap_draws_each_patient_once_for_every_repeat_and_counts_lost_resamples():
    """Two repeats partition the same 30 patients differently; resample b's fold C-indices equal sksurv on the
    rows duplicated by one draw of the patients shared by both repeats. A fold whose only event patient is not
    drawn has no comparable pair: that resample is counted in ``lost`` and the fold left out of its mean."""
    rng = np.random.default_rng(3)
    time = rng.integers(1, 40, size=30).astype(float)
    event = np.zeros(30, int)
    event[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]] = 1
    risk = rng.normal(size=30)
    folds = [np.sort(np.random.default_rng(10 + repeat).permutation(30)[k::3]) for repeat in range(2)
             for k in range(3)]
    samples = [sig.FoldSample(time[v], event[v], v) for v in folds]
    boot = sig.fold_bootstrap_c(samples, {"a": [risk[v] for v in folds]}, n_boot=40, seed=9)
    counts = sig.patient_resample_weights(np.random.default_rng(9), np.arange(30), 40)
    lost = 0
    for b in range(40):
        values = []
        for val, fold in zip(folds, samples):
            rows = np.repeat(np.arange(val.size), counts[b, val].astype(int))
            if sig.comparable_pairs(fold.time[rows], fold.event[rows]).sum() > 0:
                values.append(_sksurv_c(fold, risk[val], rows))
        lost += len(values) < len(folds)
        assert boot.resampled[b, 0] == pytest.approx(np.mean(values), abs=1e-12)
    assert boot.lost == lost > 0


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
    """Same ranking in every fold, a different constant risk shift per fold."""
    rng = np.random.default_rng(4)
    folds = [_random_fold(rng, n=60) for _ in range(5)]
    folds = [sig.FoldSample(f.time, f.event, f.patients + 100 * k) for k, f in enumerate(folds)]
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
# The registry of tests
# --------------------------------------------------------------------------------------------------
def test_registry_drives_choices_checks_and_the_default():
    assert sig.TEST_CHOICES == ("auto", *sig.STAT_TESTS) and sig.DEFAULT_TEST in sig.STAT_TESTS
    for spec in sig.STAT_TESTS.values():
        assert spec.description and spec.conditions_on and spec.design and spec.name in sig.test_help()
    with pytest.raises(ValueError, match="unknown test"):
        sig.check_test("t-test")
    with pytest.raises(ValueError, match="corrected-t"):
        sig.check_test("fold-bootstrap", "c_index_uno")
    sig.check_test("auto", "ibs")  # the default tests any stored per-fold metric
    rng = np.random.default_rng(0)
    for repeats in (1, 3):  # the default is the corrected t at every design
        column = sig.simulate_null_column(rng, n_methods=2, n_repeats=repeats)
        assert sig.resolve_test("auto", column) == "corrected-t"
    seeded = sig.ColumnData(column.fold_values, 5, column.folds, column.risks, seeds=2)
    with pytest.raises(ValueError, match="one repeat and one seed"):
        sig.resolve_test("pooled-bootstrap", seeded)
    with pytest.raises(ValueError, match="one repeat and one seed"):
        sig.resolve_test("pooled-bootstrap", column)  # three repeats


# --------------------------------------------------------------------------------------------------
# One column: marks, the set tied for best, footer, MDE
# --------------------------------------------------------------------------------------------------
def _oracle_column(rng):
    column = sig.simulate_null_column(rng, n_methods=3, n_patients=300)
    folds = column.folds
    risks = {"ref": list(column.risks["m0"]), "oracle": [-f.time for f in folds],
             "noise": [rng.normal(size=f.time.size) for f in folds]}
    values = {m: np.array([sig.fold_harrell_c(f, r) for f, r in zip(folds, risks[m])]) for m in risks}
    return sig.ColumnData(values, 5, folds, risks)


def test_column_marks_direction_footer_and_tied_best():
    data = _oracle_column(np.random.default_rng(7))
    result = sig.column_significance(data, family="reference", reference="ref", test="fold-bootstrap", n_boot=400)
    assert result.test == "fold-bootstrap" and result.n_comparisons == 2
    assert result.marks == {"oracle": "better", "noise": "worse"} and result.tied_best is None
    assert all(result.adjusted_p[p] >= result.raw_p[p] for p in result.pairs)
    footer = result.footer("*")
    for words in ("Holm-adjusted over m = 2 comparisons", "every method vs ref", "better than ref", "alpha 0.05",
                  "5 finished validation folds", "conditional on the trained models", "paired bootstrap"):
        assert words in footer
    everything = sig.column_significance(data, family="all-pairs", alpha=0.05)
    assert everything.test == "corrected-t" and everything.n_comparisons == 3
    assert "all pairs" in everything.footer() and "Nadeau & Bengio" in everything.footer()
    assert everything.marks.get("noise") == "worse" and "oracle" not in everything.marks
    # tied for best: the best row and every row not significantly below it (Holm-adjusted all pairs)
    best = max(data.methods, key=data.mean)
    expected = {best} | {m for m in data.methods if m != best and everything.adjusted_p.get(
        (best, m), everything.adjusted_p.get((m, best))) > 0.05}
    assert everything.tied_best == expected and "noise" not in expected


def test_few_events_withhold_the_bootstrap_marks_and_say_so():
    rng = np.random.default_rng(11)
    column = sig.simulate_null_column(rng, n_methods=2, n_patients=40, censor_high=25.0)
    assert column.min_events < sig.BOOTSTRAP_MIN_EVENTS
    risks = {"good": [-f.time for f in column.folds], "bad": list(column.risks["m1"])}
    values = {m: np.array([sig.fold_harrell_c(f, r) for f, r in zip(column.folds, risks[m])]) for m in risks}
    data = sig.ColumnData(values, 5, column.folds, risks)
    result = sig.column_significance(data, family="all-pairs", test="fold-bootstrap", n_boot=400)
    assert result.marks == {} and result.tied_best is None and "withheld" in result.footer()
    assert sig.marks_from_adjusted("all-pairs", result.differences, result.adjusted_p, 0.05) == {"bad": "worse"}
    assert sig.column_significance(data, family="all-pairs").withheld is None  # the corrected t has no threshold


def test_mde_of_the_test_that_ran_at_holms_first_step():
    # (t_.975,4 + t_.8,4) * s * sqrt(1/5 + 1/4): Holm's first step at alpha/m multiplies it by 1.32 (m = 3)
    base = sig.minimum_detectable_difference(0.05, 5, 5)
    assert sig.minimum_detectable_difference(0.05, 5, 5, n_comparisons=3) / base == pytest.approx(1.3186, abs=1e-3)
    assert sig.minimum_detectable_difference(0.05, 5, 5, n_comparisons=6) / base == pytest.approx(1.5581, abs=1e-3)
    low, high = sig.sd_interval(1.0, 4)
    assert (low, high) == pytest.approx((math.sqrt(4 / stats.chi2.ppf(0.975, 4)), math.sqrt(4 / stats.chi2.ppf(0.025, 4))))
    mde = sig.corrected_t_mde(0.05, 5, 5, n_comparisons=3)
    assert mde.low < mde.value < mde.high and mde.high / mde.low == pytest.approx(high / low)
    assert sig.bootstrap_mde(0.02, 0.05, 0.8, 1) == pytest.approx((1.959964 + 0.841621) * 0.02, abs=1e-5)
    data = _oracle_column(np.random.default_rng(7))
    t_result = sig.column_significance(data, family="all-pairs")
    sds = [np.std(data.fold_values[a] - data.fold_values[b], ddof=1) for a, b in t_result.pairs]
    assert t_result.mde.value == pytest.approx(sig.minimum_detectable_difference(
        np.sqrt(np.mean(np.square(sds))), 5, 5, n_comparisons=3))
    boot = sig.column_significance(data, family="all-pairs", test="fold-bootstrap", n_boot=300)
    assert boot.mde.test == "fold-bootstrap" and boot.mde.n_comparisons == 3 and "Holm" in boot.mde.describe()


def test_bounded_interval_stays_in_the_metric_range():
    mean, low, high, clipped = sig.bounded_interval([0.2, 0.9, 1.0, 0.4, 0.95], 5)
    assert clipped and low >= 0.0 and high == 1.0 and low == pytest.approx(sig.corrected_t_interval(
        [0.2, 0.9, 1.0, 0.4, 0.95], 5)[1])
    assert not sig.bounded_interval([0.6, 0.62, 0.61], 3)[3]


# --------------------------------------------------------------------------------------------------
# Null calibration: the acceptance test
# --------------------------------------------------------------------------------------------------
ALPHA = 0.05


def _scheme(family, test, n_boot=240):
    def marks_anything(column, index):
        return sig.column_significance(column, family=family, reference="m0", alpha=ALPHA, test=test,
                                       n_boot=n_boot, seed=index).marks
    return marks_anything


def _every_scheme():
    return {f"{family}, {test}": _scheme(family, test) for family in sig.FAMILIES for test in sig.STAT_TESTS}


def test_calibration_with_training_variance_and_few_events():
    """Equal training procedures whose trained models differ in true C (model_sd 0.3: C spread about 0.03) on
    40 patients with about 80 % censoring (1-4 events per validation fold): every offered test, as the table
    shows it, marks at most alpha + 2 SE of the columns in both families."""
    rates = sig.null_marking_rates(_every_scheme(), n_replicates=200, seed=31, n_methods=3, n_patients=40,
                                   censor_high=25.0, model_sd=0.3)
    for name, rate in rates.items():  # measured: corrected t 0.005 / 0.005; bootstraps withheld (0)
        assert rate.within(ALPHA), f"{name}: {rate.rate:.3f} of {rate.columns} null columns marked"


def test_calibration_of_the_conditional_tests_on_their_own_null_with_many_events():
    """Trained models equally good as fitted (model_sd 0): the bootstraps' own null, 150 patients, >= 5 events in
    every fold (marks shown): within alpha + 2 SE in both families; so is the corrected t."""
    rates = sig.null_marking_rates(_every_scheme(), n_replicates=200, seed=13, n_methods=3, n_patients=150,
                                   min_events=sig.BOOTSTRAP_MIN_EVENTS)
    for name, rate in rates.items():  # measured 0.015-0.05
        assert rate.within(ALPHA), f"{name}: {rate.rate:.3f} of {rate.columns} null columns marked"


def test_training_variance_with_many_events_the_corrected_t_holds_the_bootstrap_does_not():
    """Model-level variance large enough to matter (model_sd 0.6: trained models' C spread about 0.05), >= 5 events
    per fold: the default test stays within alpha in both families; the fold bootstrap, conditional on the
    trained models, reads their luck as a difference (measured 0.15-0.17 on 200 columns): why it is not the
    default and its footer says what it conditions on."""
    schemes = {"reference, corrected-t": _scheme("reference", "corrected-t"),
               "all-pairs, corrected-t": _scheme("all-pairs", "corrected-t"),
               "all-pairs, fold-bootstrap": _scheme("all-pairs", "fold-bootstrap")}
    rates = sig.null_marking_rates(schemes, n_replicates=200, seed=41, n_methods=3, n_patients=150, model_sd=0.6,
                                   min_events=sig.BOOTSTRAP_MIN_EVENTS)
    assert rates["reference, corrected-t"].within(ALPHA) and rates["all-pairs, corrected-t"].within(ALPHA)
    assert not rates["all-pairs, fold-bootstrap"].within(ALPHA)


def test_vs_best_rule_exceeds_alpha():
    rng = np.random.default_rng(13)
    columns = [sig.simulate_null_column(rng, n_methods=6, n_patients=150) for _ in range(100)]
    vs_best = sig.marking_rate(columns, lambda column, i: sig.vs_best_marks(
        column, alpha=ALPHA, test="fold-bootstrap", n_boot=300, seed=i))
    assert not vs_best.within(ALPHA)  # the right test does not save a data-chosen, unadjusted family


def test_a_truly_better_method_is_found():
    """The calibrated test is not calibrated by never marking: a much better method is detected."""
    rng = np.random.default_rng(5)
    found = 0
    for index in range(40):
        column = sig.simulate_null_column(rng, n_methods=3, n_patients=200, noise=1.0)
        risks = dict(column.risks)
        risks["m0"] = [-f.time for f in column.folds]  # perfect ranking
        values = {m: np.array([sig.fold_harrell_c(f, r) for f, r in zip(column.folds, risks[m])]) for m in risks}
        data = sig.ColumnData(values, 5, column.folds, risks)
        found += sig.column_significance(data, reference="m0", seed=index).marks == {
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


def test_friedman_tie_correction_matches_scipy():
    rng = np.random.default_rng(9)
    for k, n in [(3, 6), (4, 10), (6, 5)]:
        scores = np.round(rng.normal(0.6, 0.05, size=(n, k)), 2)  # rounded: many ties within a data set
        scores[0, :2] = scores[0, 2]
        result = sig.friedman_test(scores)
        ref = stats.friedmanchisquare(*scores.T)
        assert sig.friedman_tie_correction(sig.rank_rows(scores)) < 1
        assert result.chi2 == pytest.approx(ref.statistic) and result.chi2_p_value == pytest.approx(ref.pvalue)
    assert sig.friedman_test(np.ones((3, 4))).chi2_p_value == 1.0  # all ties: no ranking


def test_average_p_value_is_valid_under_dependence():
    """Twice the mean (Vovk & Wang 2020): identical copies of one p give 2p (capped at 1), never below it."""
    assert sig.average_p_value([0.02, 0.02, 0.02]) == pytest.approx(0.04)
    assert sig.average_p_value([0.3]) == 0.3 and sig.average_p_value([0.8, 0.9]) == 1.0
    rng = np.random.default_rng(0)
    u = rng.random(20000)  # perfectly dependent copies of one uniform p: the rejection rate stays <= alpha
    assert np.mean([sig.average_p_value([x, x, x]) <= 0.05 for x in u[:4000]]) <= 0.05
    with pytest.raises(ValueError):
        sig.average_p_value([])


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


def test_list_tests_reads_the_registry(capsys):
    from benchmark.cli import main as cli_main

    assert cli_main(["list", "tests"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in sig.STAT_TESTS)
