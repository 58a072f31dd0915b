"""Statistics a reviewer accepts: paired tests on the quantity the table shows, Holm-adjusted families,
confidence intervals, the minimum detectable difference, null calibration and Friedman / Iman-Davenport ranks.

Pure functions on arrays (no result store): :mod:`benchmark.analysis.statistics` turns records into the
:class:`ColumnData` these functions take.

The quantity a table cell shows is the mean over ``J = R x K`` validation folds (``R`` repeats of ``K``-fold
cross-validation; several training seeds of one fold are averaged first) of the per-fold Harrell C-index. Two
methods are compared on the *same* folds by one of three tests:

``corrected-t``
    Nadeau-Bengio corrected resampled t-test over the ``J`` per-fold differences (Nadeau & Bengio 2003;
    Bouckaert & Frank 2004 for repeated K-fold). Accounts for the overlap of training sets, hence for training
    randomness; weak with ``J = 5`` (4 degrees of freedom).
``fold-bootstrap``
    Paired bootstrap that resamples validation patients *within each fold* and recomputes every fold's C-index
    of both methods on the same resample; the statistic is the mean over folds, as in the table. Covers the
    sampling of test patients only (the trained models are held fixed).
``pooled-bootstrap``
    The former default, kept as a labelled alternative: one C-index on the risks pooled over folds (it mixes the
    risk scales of K different models, so it tests another quantity than the table shows).

``auto`` picks ``corrected-t`` when there are repeats (``R > 1``: enough folds for a t-test that accounts for
training randomness) and ``fold-bootstrap`` otherwise (with 5 folds the corrected t has 4 degrees of freedom
and almost no power). Multiplicity is controlled with Holm (1979) over a family declared up front.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

#: Risks closer than this are ties (scored 1/2), as ``sksurv.metrics.concordance_index_censored``.
TIED_TOL = 1e-8
TESTS = ("auto", "corrected-t", "fold-bootstrap", "pooled-bootstrap")
FAMILIES = ("reference", "all-pairs")
TEST_DESCRIPTIONS = {
    "corrected-t": "corrected resampled t-test (Nadeau & Bengio 2003) over the per-fold differences",
    "fold-bootstrap": "paired bootstrap of patients within each fold, per-fold C-index recomputed, covering "
                      "test-set sampling only",
    "pooled-bootstrap": "paired bootstrap over patients of the risks pooled across folds, a pooled C-index that is "
                        "not the quantity of the table",
}


# --------------------------------------------------------------------------------------------------
# Harrell's C-index on pair matrices (weights = bootstrap multiplicities)
# --------------------------------------------------------------------------------------------------
def comparable_pairs(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Comparable-pair matrix of Harrell's C-index, as ``sksurv.metrics.concordance_index_censored`` defines it.

    ``P[i, j] = 1`` when sample ``i`` had the event and ``j`` outlived it (``time[j] > time[i]``), or ``j`` was
    censored at the same time. Shape ``(N, N)``, float64.
    """
    t = np.asarray(time, float)
    e = np.asarray(event).astype(bool)
    later = t[None, :] > t[:, None]
    same_time_censored = (t[None, :] == t[:, None]) & ~e[None, :]
    return (e[:, None] & (later | same_time_censored)).astype(np.float64)


def concordance_scores(risk: np.ndarray, tied_tol: float = TIED_TOL) -> np.ndarray:
    """``S[i, j]`` = 1 if ``risk[i] > risk[j]``, 0.5 on a tie within ``tied_tol``, else 0. Shape ``(N, N)``."""
    r = np.asarray(risk, float)
    diff = r[:, None] - r[None, :]
    return np.where(np.abs(diff) <= tied_tol, 0.5, (diff > 0).astype(np.float64))


def weighted_quadratic_form(weights: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``w_b^T M w_b`` for every row ``w_b`` of ``weights`` (shape ``(B, N)``) in one matrix product."""
    return np.einsum("bi,bi->b", weights @ matrix, weights)


# --------------------------------------------------------------------------------------------------
# Holm adjustment and declared families
# --------------------------------------------------------------------------------------------------
def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values, in the input order.

    With the p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted value is
    ``max_{l <= i} min(1, (m - l + 1) p_(l))``; rejecting where it is ``<= alpha`` controls the family-wise
    error rate at ``alpha`` under any dependence (Holm, Scand. J. Statist. 6:65-70, 1979).

    Raises
    ------
    ValueError
        On an empty input or a p-value outside [0, 1] (NaN included).
    """
    p = np.asarray(p_values, dtype=float).reshape(-1)
    if p.size == 0:
        raise ValueError("holm_adjust needs at least one p-value")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"p-values must lie in [0, 1]; got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)  # monotone: never below an earlier (smaller) step
    return adjusted


def comparison_family(methods: Sequence[str], family: str = "reference",
                      reference: str | None = None) -> list[tuple[str, str]]:
    """The pairs ``(a, b)`` tested together, declared before looking at the data.

    ``reference``: every other method against ``reference`` (``m = k - 1`` pairs, ``a`` = the reference);
    ``all-pairs``: every unordered pair (``m = k (k - 1) / 2``). Choosing the reference as the column's observed
    best is neither: the best is picked from the same data (see :func:`vs_best_marks`).
    """
    methods = list(methods)
    if len(methods) < 2:
        raise ValueError(f"a comparison family needs at least 2 methods; got {methods}")
    if family == "all-pairs":
        return list(itertools.combinations(methods, 2))
    if family != "reference":
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if reference not in methods:
        raise ValueError(f"the reference family needs a reference among {methods}; got {reference!r}")
    return [(reference, m) for m in methods if m != reference]


# --------------------------------------------------------------------------------------------------
# Corrected resampled t, interval, minimum detectable difference
# --------------------------------------------------------------------------------------------------
def _checked_fold_values(values: Sequence[float], n_folds: int, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=float).reshape(-1)
    if n_folds < 2:
        raise ValueError(f"{what} needs K >= 2 folds per repeat; got K = {n_folds}")
    if v.size < 2:
        raise ValueError(f"{what} needs at least 2 fold values; got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError(f"{what}: fold values contain NaN or infinite entries: {v.tolist()}")
    return v


def corrected_variance_factor(n_units: int, n_folds: int) -> float:
    """``1/J + n_test/n_train`` with ``n_test/n_train = 1/(K - 1)`` for K-fold CV (Nadeau & Bengio 2003)."""
    return 1.0 / n_units + 1.0 / (n_folds - 1)


@dataclass(frozen=True)
class CorrectedT:
    """Result of :func:`corrected_resampled_t`: mean difference, its corrected standard error, t, df, p."""

    mean: float
    standard_error: float
    statistic: float
    df: int
    p_value: float


def corrected_resampled_t(differences: Sequence[float], n_folds: int) -> CorrectedT:
    """Two-sided corrected resampled t-test of ``mean(d) = 0`` over ``J = R x K`` per-fold differences.

    ``t = mean(d) / sqrt((1/J + n_test/n_train) s^2)``, ``s^2`` the sample variance (ddof 1), ``J - 1`` degrees
    of freedom, ``n_test/n_train = 1/(K - 1)``: Nadeau & Bengio 2003 ("Inference for the generalization error",
    Machine Learning 52:239-281), for repeated K-fold CV Bouckaert & Frank 2004 (PAKDD, LNCS 3056). The
    correction accounts for the overlap of the training sets of different folds.

    Parameters
    ----------
    differences : array-like, shape (J,)
        ``C_A,j - C_B,j`` on the same folds (all repeats).
    n_folds : int
        ``K``, folds per repeat.
    """
    d = _checked_fold_values(differences, n_folds, "corrected_resampled_t")
    variance = float(np.var(d, ddof=1))
    se = math.sqrt(corrected_variance_factor(d.size, n_folds) * variance)
    mean = float(d.mean())
    if se == 0.0:  # identical differences on every fold: no spread to test against
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return CorrectedT(mean, 0.0, t, d.size - 1, 1.0 if mean == 0.0 else 0.0)
    t = mean / se
    p = float(2.0 * stats.t.sf(abs(t), d.size - 1))
    return CorrectedT(mean, se, float(t), d.size - 1, p)


def corrected_t_interval(values: Sequence[float], n_folds: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and confidence interval of a cell's fold values with the Nadeau-Bengio variance correction.

    ``mean ± t_{1-a/2, J-1} sqrt((1/J + 1/(K-1)) s^2)`` (Nadeau & Bengio 2003, corrected resampled t). The
    correction widens the naive interval because the folds' training sets overlap.

    Returns
    -------
    (mean, low, high)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    v = _checked_fold_values(values, n_folds, "corrected_t_interval")
    half = stats.t.ppf(0.5 + confidence / 2, v.size - 1) * math.sqrt(
        corrected_variance_factor(v.size, n_folds) * np.var(v, ddof=1))
    mean = float(v.mean())
    return mean, float(mean - half), float(mean + half)


def minimum_detectable_difference(sd_difference: float, n_units: int, n_folds: int, alpha: float = 0.05,
                                  power: float = 0.8) -> float:
    """Smallest mean difference a paired corrected t-test detects with the given power.

    ``MDE = (t_{1-alpha/2, J-1} + t_{power, J-1}) s_d sqrt(1/J + n_test/n_train)`` (the usual normal-approximation
    power formula with t quantiles; Nadeau & Bengio 2003 for the variance factor). ``s_d`` is the standard
    deviation of the per-fold differences (ddof 1), e.g. observed between two methods.
    """
    if n_units < 2 or n_folds < 2:
        raise ValueError(f"the MDE needs J >= 2 fold values and K >= 2 folds; got J = {n_units}, K = {n_folds}")
    if not (0 < alpha < 1 and 0 < power < 1) or not sd_difference >= 0:
        raise ValueError(f"need 0 < alpha, power < 1 and sd >= 0; got {alpha}, {power}, {sd_difference}")
    df = n_units - 1
    quantiles = stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)
    return float(quantiles * sd_difference * math.sqrt(corrected_variance_factor(n_units, n_folds)))


# --------------------------------------------------------------------------------------------------
# Bootstrap of the fold-mean C-index
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldSample:
    """The validation samples of one fold (one repeat), shared by every method of a column.

    Attributes
    ----------
    time, event : ndarray, shape (n,)
    patients : ndarray of int, shape (n,)
        Patient code of each sample: a resample draws patients, and every sample of a drawn patient comes along.
    """

    time: np.ndarray
    event: np.ndarray
    patients: np.ndarray

    def __post_init__(self):
        n = len(self.time)
        if len(self.event) != n or len(self.patients) != n:
            raise ValueError(f"fold sample: time ({n}), event ({len(self.event)}) and patients "
                             f"({len(self.patients)}) differ in length")
        if comparable_pairs(self.time, self.event).sum() == 0:
            raise ValueError("a validation fold has no comparable pair (no event): its C-index is undefined")


def patient_resample_weights(rng: np.random.Generator, patients: np.ndarray, n_boot: int) -> np.ndarray:
    """Multiplicity of each sample in ``n_boot`` resamples of the patients with replacement; shape (B, n)."""
    codes, inverse = np.unique(np.asarray(patients), return_inverse=True)
    draws = rng.integers(0, codes.size, size=(n_boot, codes.size))
    counts = np.zeros((n_boot, codes.size))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts[:, inverse]


def fold_bootstrap_c(folds: Sequence[FoldSample], risks: Mapping[str, Sequence[np.ndarray]], n_boot: int = 1000,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean over folds of each method's Harrell C-index, observed and on paired within-fold resamples.

    Every resample draws, independently in each fold, the fold's patients with replacement (the same draw for
    all methods: paired), recomputes each fold's C-index of every method, and averages over folds (the
    fold-stratified bootstrap of statistics.md section 2; Efron & Tibshirani 1993, ch. 6 for the paired
    bootstrap). Resamples where some fold has no comparable pair are dropped.

    Returns
    -------
    observed : ndarray, shape (M,)
        Mean fold C-index of each method (order of ``risks``).
    resampled : ndarray, shape (B', M)
        The same on each kept resample.
    """
    if not folds:
        raise ValueError("fold_bootstrap_c needs at least one fold")
    methods = list(risks)
    for m in methods:
        if len(risks[m]) != len(folds):
            raise ValueError(f"method {m!r} has risks for {len(risks[m])} folds, expected {len(folds)}")
    rng = np.random.default_rng(seed)
    observed = np.zeros((len(folds), len(methods)))
    resampled = np.zeros((n_boot, len(folds), len(methods)))
    for j, fold in enumerate(folds):
        fold_risks = [np.asarray(risks[m][j], float) for m in methods]
        for m, risk in zip(methods, fold_risks):
            if risk.shape != fold.time.shape:
                raise ValueError(f"method {m!r}, fold {j}: {risk.size} risks for {fold.time.size} samples")
        weights = patient_resample_weights(rng, fold.patients, n_boot)
        observed[j], resampled[:, j] = _fold_c_indices(fold, fold_risks, weights)
    means = resampled.mean(axis=1)
    return observed.mean(axis=0), means[np.isfinite(means).all(axis=1)]


def _fold_c_indices(fold: FoldSample, fold_risks: Sequence[np.ndarray], weights: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One fold's C-index of each method, observed (shape (M,)) and under each resample's weights (B, M)."""
    comp = comparable_pairs(fold.time, fold.event)
    conc = [concordance_scores(risk) * comp for risk in fold_risks]
    observed = np.array([c.sum() / comp.sum() for c in conc])
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without a comparable pair: NaN, dropped
        denominators = weighted_quadratic_form(weights, comp)
        resampled = np.stack([weighted_quadratic_form(weights, c) / denominators for c in conc], axis=1)
    return observed, resampled


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of ``difference = 0``: ``2 min(P*(D <= 0), P*(D >= 0))``, each proportion
    counted as ``(#+1)/(B+1)`` so that it is never 0 (Davison & Hinkley 1997, eq. 4.11)."""
    d = np.asarray(differences, float)
    if d.size == 0:
        raise ValueError("no bootstrap resample left to compute a p-value")
    below = (np.sum(d <= 0) + 1) / (d.size + 1)
    above = (np.sum(d >= 0) + 1) / (d.size + 1)
    return float(min(1.0, 2.0 * min(below, above)))


def pooled_fold(folds: Sequence[FoldSample], risks: Mapping[str, Sequence[np.ndarray]]
                ) -> tuple[list[FoldSample], dict[str, list[np.ndarray]]]:
    """Every fold merged into one (the pooled out-of-fold predictions), for the ``pooled-bootstrap`` test."""
    offset, patients = 0, []
    for f in folds:  # patient codes of different folds must not collide
        codes = np.unique(f.patients, return_inverse=True)[1]
        patients.append(codes + offset)
        offset += codes.max() + 1
    merged = FoldSample(np.concatenate([f.time for f in folds]), np.concatenate([f.event for f in folds]),
                        np.concatenate(patients))
    return [merged], {m: [np.concatenate([np.asarray(r, float) for r in per_fold])] for m, per_fold in risks.items()}


# --------------------------------------------------------------------------------------------------
# One table column: per-method fold values (and predictions), tests, Holm, marks, footer
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnData:
    """Every method of one table column (one cohort), evaluated on the same ``J = R x K`` validation folds.

    Attributes
    ----------
    fold_values : dict
        Method -> per-fold metric, shape (J,), the same fold order for every method (seeds averaged).
    n_folds : int
        ``K``, folds per repeat.
    folds : tuple of FoldSample, optional
        The J validation folds (needed by the bootstrap tests only).
    risks : dict, optional
        Method -> J risk arrays aligned with ``folds``.
    repeats : int, optional
        ``R``, repeats present (default ``J // K``; a cell with unfinished folds has ``J < R K``).
    """

    fold_values: Mapping[str, np.ndarray]
    n_folds: int
    folds: tuple[FoldSample, ...] | None = None
    risks: Mapping[str, Sequence[np.ndarray]] | None = None
    repeats: int | None = None

    def __post_init__(self):
        lengths = {m: len(v) for m, v in self.fold_values.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"methods have different numbers of fold values: {lengths}")
        n_units = next(iter(lengths.values()), 0)
        if self.n_folds < 2 or n_units < 2:
            raise ValueError(f"need J >= 2 fold values and K >= 2 folds per repeat; got J = {n_units}, "
                             f"K = {self.n_folds}")
        if self.folds is not None and len(self.folds) != n_units:
            raise ValueError(f"{len(self.folds)} fold samples for {n_units} fold values")

    @property
    def methods(self) -> list[str]:
        return list(self.fold_values)

    @property
    def n_repeats(self) -> int:
        return self.repeats or max(1, len(next(iter(self.fold_values.values()))) // self.n_folds)

    def mean(self, method: str) -> float:
        return float(np.mean(self.fold_values[method]))


def resolve_test(test: str, data: ColumnData) -> str:
    """``auto`` -> ``corrected-t`` with repeats (R > 1), else ``fold-bootstrap`` (needs predictions)."""
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; expected one of {', '.join(TESTS)}")
    if test == "auto":
        test = "corrected-t" if data.n_repeats > 1 or data.folds is None else "fold-bootstrap"
    if test != "corrected-t" and (data.folds is None or data.risks is None):
        raise ValueError(f"the {test} test needs the stored predictions of every fold")
    if test == "pooled-bootstrap" and data.n_repeats > 1:
        raise ValueError("the pooled bootstrap needs each patient once (one repeat); use corrected-t")
    return test


def pair_tests(data: ColumnData, pairs: Sequence[tuple[str, str]], test: str, n_boot: int = 1000,
               seed: int = 0) -> dict[tuple[str, str], tuple[float, float]]:
    """``(a, b) -> (difference a - b of the tested quantity, raw two-sided p)`` for every pair.

    ``test`` must be resolved (:func:`resolve_test`). The bootstrap tests draw one set of resamples for all
    methods, so every pair is paired on the same resamples.
    """
    if test == "corrected-t":
        out = {}
        for a, b in pairs:
            result = corrected_resampled_t(np.subtract(data.fold_values[a], data.fold_values[b]), data.n_folds)
            out[(a, b)] = (result.mean, result.p_value)
        return out
    folds, risks = list(data.folds), dict(data.risks)
    if test == "pooled-bootstrap":
        folds, risks = pooled_fold(folds, risks)
    observed, resampled = fold_bootstrap_c(folds, risks, n_boot=n_boot, seed=seed)
    index = {m: i for i, m in enumerate(risks)}
    return {(a, b): (float(observed[index[a]] - observed[index[b]]),
                     bootstrap_p_value(resampled[:, index[a]] - resampled[:, index[b]])) for a, b in pairs}


@dataclass
class ColumnSignificance:
    """Raw and Holm-adjusted p-values of one column's declared family, and the rows they mark.

    ``marks`` maps a row to ``"worse"`` or ``"better"``: in the ``reference`` family, relative to the reference;
    in ``all-pairs``, ``"worse"`` = significantly below at least one other row.
    """

    test: str
    family: str
    reference: str | None
    alpha: float
    pairs: list[tuple[str, str]]
    differences: dict[tuple[str, str], float]
    raw_p: dict[tuple[str, str], float]
    adjusted_p: dict[tuple[str, str], float]
    marks: dict[str, str] = field(default_factory=dict)
    n_folds: int = 0
    n_repeats: int = 1
    n_boot: int = 0  # resamples of a bootstrap test (0 for the t-test)

    @property
    def n_comparisons(self) -> int:
        return len(self.pairs)

    def footer(self, marker: str = "*") -> str:
        """The sentence a table prints under itself: test, adjustment, alpha, number of comparisons."""
        what = (f"↓ / ↑ significantly worse / better than {self.reference}" if self.family == "reference"
                else f"{marker} significantly below at least one other row")
        family = (f"every method vs {self.reference}" if self.family == "reference" else "all pairs of rows")
        resamples = f" ({self.n_boot} resamples)" if self.n_boot else ""
        return (f"{what}: two-sided {TEST_DESCRIPTIONS[self.test]}{resamples}, {self.n_folds} folds x "
                f"{self.n_repeats} repeat(s); Holm-adjusted over {self.n_comparisons} comparison{'s' if self.n_comparisons != 1 else ''} ({family}) "
                f"per column, family-wise alpha {self.alpha:g}.")


def resamples_for(n_comparisons: int, alpha: float, n_boot: int) -> int:
    """At least ``4 m / alpha`` bootstrap resamples, so the smallest attainable p-value, ``2 / (B + 1)``, lies
    below half the strictest Holm threshold ``alpha / m``; fewer could never mark anything (e.g. 100 resamples
    and 3 comparisons: p >= 0.0198 > 0.05 / 3)."""
    return max(int(n_boot), math.ceil(4 * n_comparisons / alpha))


def marks_from_adjusted(family: str, differences: Mapping[tuple[str, str], float],
                        adjusted_p: Mapping[tuple[str, str], float], alpha: float,
                        higher_is_better: bool = True) -> dict[str, str]:
    """Rows to mark: ``worse``/``better`` than the reference (``reference``), or ``worse`` than some row."""
    marks: dict[str, str] = {}
    for (a, b), p in adjusted_p.items():
        if p > alpha or differences[(a, b)] == 0:
            continue
        b_is_worse = (differences[(a, b)] > 0) == higher_is_better
        if family == "reference":
            marks[b] = "worse" if b_is_worse else "better"
        else:
            marks[b if b_is_worse else a] = "worse"
    return marks


def column_significance(data: ColumnData, *, family: str = "reference", reference: str | None = None,
                        alpha: float = 0.05, test: str = "auto", n_boot: int = 1000, seed: int = 0,
                        higher_is_better: bool = True) -> ColumnSignificance:
    """Test one column's declared family of pairs and Holm-adjust it (Holm 1979; statistics.md section 3).

    Parameters
    ----------
    data : ColumnData
        Per-method fold values (and predictions for the bootstrap tests).
    family : {"reference", "all-pairs"}
        Every method vs ``reference`` (``k - 1`` comparisons) or every pair (``k (k - 1) / 2``).
    alpha : float
        Family-wise error rate: a row is marked where its Holm-adjusted p-value is ``<= alpha``.
    test : {"auto", "corrected-t", "fold-bootstrap", "pooled-bootstrap"}
        See the module docstring; ``auto`` is ``corrected-t`` with repeats, ``fold-bootstrap`` without.
    n_boot : int
        Bootstrap resamples, raised to :func:`resamples_for` when too few to reach the Holm thresholds.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    test = resolve_test(test, data)
    pairs = comparison_family(data.methods, family, reference)
    n_boot = 0 if test == "corrected-t" else resamples_for(len(pairs), alpha, n_boot)
    tested = pair_tests(data, pairs, test, n_boot=n_boot, seed=seed)
    raw = {pair: tested[pair][1] for pair in pairs}
    adjusted = dict(zip(pairs, holm_adjust([raw[pair] for pair in pairs])))
    differences = {pair: tested[pair][0] for pair in pairs}
    marks = marks_from_adjusted(family, differences, adjusted, alpha, higher_is_better)
    return ColumnSignificance(test, family, reference if family == "reference" else None, alpha, pairs,
                              differences, raw, adjusted, marks, data.n_folds, data.n_repeats, n_boot)


def vs_best_marks(data: ColumnData, *, alpha: float = 0.05, test: str = "pooled-bootstrap", n_boot: int = 1000,
                  seed: int = 0) -> set[str]:
    """The former rule, kept only to document its error rate: every row vs the column's *observed* best, each at
    the raw ``alpha``. The best is chosen from the same data and ``k - 1`` tests run unadjusted, so with equally
    good methods it marks some row far more often than ``alpha`` (see :func:`null_marking_rates`)."""
    best = max(data.methods, key=data.mean)
    pairs = [(best, m) for m in data.methods if m != best]
    tested = pair_tests(data, pairs, resolve_test(test, data), n_boot=n_boot, seed=seed)
    return {b for (a, b), (diff, p) in tested.items() if p < alpha and diff > 0}


# --------------------------------------------------------------------------------------------------
# Null calibration: how often does a scheme mark anything when every method is equally good?
# --------------------------------------------------------------------------------------------------
def fold_c_index(fold: FoldSample, risk: np.ndarray) -> float:
    """Harrell's C-index of one fold's risks (pair-matrix form of ``concordance_index_censored``)."""
    comp = comparable_pairs(fold.time, fold.event)
    return float((concordance_scores(risk) * comp).sum() / comp.sum())


def simulate_null_column(rng: np.random.Generator, n_methods: int = 6, n_patients: int = 150, n_folds: int = 5,
                         n_repeats: int = 1, noise: float = 1.0) -> ColumnData:
    """One column of ``n_methods`` equally good methods: per-patient risk = true risk + independent noise.

    Times are exponential with hazard ``exp(x) / 30`` for a standard-normal true risk ``x``, censored uniformly on
    [5, 120] months (about 45 % censored). Each repeat draws a new partition into ``n_folds`` folds and each
    (repeat, fold) a fresh noise draw per method, as a retrained model would.
    """
    x = rng.normal(size=n_patients)
    event_time = rng.exponential(30.0 * np.exp(-x))
    censor_time = rng.uniform(5.0, 120.0, size=n_patients)
    time, event = np.minimum(event_time, censor_time), (event_time <= censor_time).astype(int)
    methods = [f"m{i}" for i in range(n_methods)]
    folds, risks = [], {m: [] for m in methods}
    for _ in range(n_repeats):
        fold_of = rng.permutation(np.arange(n_patients) % n_folds)
        for k in range(n_folds):
            val = np.flatnonzero(fold_of == k)
            folds.append(FoldSample(time[val], event[val], val))
            for m in methods:
                risks[m].append(x[val] + noise * rng.normal(size=val.size))
    values = {m: np.array([fold_c_index(f, r) for f, r in zip(folds, risks[m])]) for m in methods}
    return ColumnData(values, n_folds, tuple(folds), risks)


@dataclass(frozen=True)
class MarkingRate:
    """Fraction of columns where a scheme marked at least one row, with its Monte-Carlo standard error."""

    marked: int
    columns: int

    @property
    def rate(self) -> float:
        return self.marked / self.columns if self.columns else float("nan")

    @property
    def standard_error(self) -> float:
        p = self.rate
        return math.sqrt(p * (1 - p) / self.columns) if self.columns else float("nan")

    def within(self, alpha: float) -> bool:
        """``rate <= alpha + 2 SE``, the SE taken at ``alpha`` (so a rate of 0 is not judged on a zero SE)."""
        return self.rate <= alpha + 2 * math.sqrt(alpha * (1 - alpha) / self.columns)


def marking_rate(columns, marks_anything) -> MarkingRate:
    """How many ``columns`` (ColumnData) ``marks_anything(column, index)`` marks: the family-wise error rate
    when every column's methods are equally good (e.g. real cells on ``--signal none`` data)."""
    outcomes = [bool(marks_anything(column, i)) for i, column in enumerate(columns)]
    return MarkingRate(sum(outcomes), len(outcomes))


def null_marking_rates(schemes: Mapping[str, object], n_replicates: int = 300, seed: int = 0,
                       **simulation) -> dict[str, MarkingRate]:
    """Family-wise marking rate of each scheme on ``n_replicates`` simulated null columns.

    ``schemes`` maps a name to ``marks_anything(column, index) -> bool``; every scheme sees the same columns.
    ``simulation`` goes to :func:`simulate_null_column`.
    """
    rng = np.random.default_rng(seed)
    columns = [simulate_null_column(rng, **simulation) for _ in range(n_replicates)]
    return {name: marking_rate(columns, scheme) for name, scheme in schemes.items()}


# --------------------------------------------------------------------------------------------------
# Many methods on many data sets: Friedman, Iman-Davenport, Nemenyi (Demsar 2006)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FriedmanResult:
    """Friedman chi-square and its Iman-Davenport F version over ``n_datasets`` data sets and ``n_methods``."""

    chi2: float
    chi2_p_value: float
    f: float
    f_p_value: float
    df1: int
    df2: int
    n_datasets: int
    n_methods: int

    def significant(self, alpha: float = 0.05) -> bool:
        """Iman-Davenport rejects "all methods equivalent" at ``alpha``."""
        return bool(self.f_p_value <= alpha)


def friedman_from_mean_ranks(mean_ranks: Sequence[float], n_datasets: int) -> FriedmanResult:
    """Friedman and Iman-Davenport statistics from the methods' mean ranks (Demšar 2006, JMLR 7:1-30, sec. 3.2.2).

    ``chi2_F = 12 N / (k (k + 1)) [sum_j R_j^2 - k (k + 1)^2 / 4]`` with ``k - 1`` df, and
    ``F_F = (N - 1) chi2_F / (N (k - 1) - chi2_F)``, F-distributed with ``(k - 1, (k - 1)(N - 1))`` df
    (Iman & Davenport 1980), less conservative than the chi-square.
    """
    r = np.asarray(mean_ranks, float)
    k, n = r.size, int(n_datasets)
    if k < 2 or n < 2:
        raise ValueError(f"the Friedman test needs >= 2 methods and >= 2 data sets; got k = {k}, N = {n}")
    chi2 = 12.0 * n / (k * (k + 1)) * (np.sum(r ** 2) - k * (k + 1) ** 2 / 4.0)
    df1, df2 = k - 1, (k - 1) * (n - 1)
    denominator = n * (k - 1) - chi2
    f = math.inf if denominator <= 0 else (n - 1) * chi2 / denominator  # every data set ranks alike: F infinite
    f_p = 0.0 if math.isinf(f) else float(stats.f.sf(f, df1, df2))
    return FriedmanResult(float(chi2), float(stats.chi2.sf(chi2, df1)), float(f), f_p, df1, df2, n, k)


def rank_rows(scores: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Rank of each method (column) within each data set (row), 1 = best, ties get their average rank."""
    s = np.asarray(scores, float)
    if s.ndim != 2 or not np.isfinite(s).all():
        raise ValueError("scores must be a complete 2-D array (data sets x methods) without NaN")
    return stats.rankdata(-s if higher_is_better else s, axis=1)


def nemenyi_q(n_methods: int, alpha: float = 0.05) -> float:
    """Nemenyi ``q_alpha``: studentized range quantile (infinite df) over ``sqrt(2)`` (k=2: 1.960, k=4: 2.569)."""
    return float(stats.studentized_range.ppf(1 - alpha, n_methods, np.inf) / math.sqrt(2))


def nemenyi_critical_difference(n_methods: int, n_datasets: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference ``q_alpha sqrt(k (k + 1) / (6 N))`` (Demšar 2006, sec. 3.2.2; k = 4, N = 14,
    alpha 0.05: 1.25)."""
    if n_methods < 2 or n_datasets < 1:
        raise ValueError("the critical difference needs at least 2 methods and 1 dataset")
    return float(nemenyi_q(n_methods, alpha) * math.sqrt(n_methods * (n_methods + 1) / (6.0 * n_datasets)))


def fisher_combined_p(p_values: Sequence[float]) -> float:
    """Fisher's (1932) combination of independent p-values: ``-2 sum log p`` is chi-square with ``2n`` df.

    Used for the D-calibration tests of the folds of one cell (disjoint validation patients).
    """
    p = np.asarray([v for v in p_values if v is not None and math.isfinite(v)], dtype=float)
    if p.size == 0:
        raise ValueError("fisher_combined_p needs at least one finite p-value")
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1]; got {p.tolist()}")
    statistic = -2.0 * np.sum(np.log(np.clip(p, np.finfo(float).tiny, 1.0)))
    return float(stats.chi2.sf(statistic, 2 * p.size))
