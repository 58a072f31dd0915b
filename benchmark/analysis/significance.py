"""Statistics a reviewer accepts: paired tests on the quantity the table shows, Holm-adjusted families,
confidence intervals, the minimum detectable difference, null calibration and Friedman / Iman-Davenport ranks.

Pure functions on arrays (no result store): :mod:`benchmark.analysis.statistics` turns records into the
:class:`ColumnData` these functions take.

The quantity a table cell shows is the mean over ``J = R x K`` validation folds (``R`` repeats of ``K``-fold
cross-validation) of the per-fold metric, each fold's value first averaged over the training seeds. Two methods
are compared on the *same* folds by one of the tests of :data:`STAT_TESTS`, the one registry that the command
line choices, the option checks, the table footers and the docs read:

``corrected-t`` (the default at every design)
    Nadeau-Bengio corrected resampled t-test over the ``J`` per-fold differences (Nadeau & Bengio 2003;
    Bouckaert & Frank 2004 for repeated K-fold). Each fold's model is a fresh draw of the training procedure
    (``--seeding per-fold``), so the fold-to-fold spread contains the training randomness: its null is "the two
    training procedures are equally good on this cohort". Weak with ``J = 5`` (4 degrees of freedom).
``fold-bootstrap``
    Paired bootstrap over patients (each patient drawn once for every repeat, seed and method), every fold's
    C-index recomputed, the statistic the mean over folds as in the table. Conditional on the trained models:
    its null is "these fitted models rank the cohort's patients equally well", not a statement about methods.
``pooled-bootstrap``
    Labelled alternative: one C-index on the risks pooled over folds (it mixes the risk scales of K different
    models, another quantity than the table shows); one repeat and one seed only. Conditional on the models.

Multiplicity is controlled with Holm (1979) over a family declared up front. A test that cannot be read where
validation folds have few events (:attr:`StatTest.min_events`, :data:`BOOTSTRAP_MIN_EVENTS`) withholds its
marks there and says so in the footer.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

#: Risks closer than this are ties (scored 1/2), as ``sksurv.metrics.concordance_index_censored``.
TIED_TOL = 1e-8
FAMILIES = ("reference", "all-pairs")


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


def bounded_interval(values: Sequence[float], n_folds: int, confidence: float = 0.95, low: float = 0.0,
                     high: float = 1.0) -> tuple[float, float, float, bool]:
    """:func:`corrected_t_interval` clipped to the metric's range ``[low, high]``; the flag says it was clipped.

    The t-interval is symmetric and can leave the range with few or spread folds (``[-0.16, 1.39]`` for a
    C-index); the clipped ends are not a confidence statement, so the caller shows the flag.
    """
    mean, lo, hi = corrected_t_interval(values, n_folds, confidence)
    clipped = lo < low or hi > high
    return mean, max(lo, low), min(hi, high), clipped


def minimum_detectable_difference(sd_difference: float, n_units: int, n_folds: int, alpha: float = 0.05,
                                  power: float = 0.8, n_comparisons: int = 1) -> float:
    """Smallest mean difference a paired corrected t-test detects with the given power at Holm's first step.

    ``MDE = (t_{1-alpha/(2m), J-1} + t_{power, J-1}) s_d sqrt(1/J + n_test/n_train)`` (the usual
    normal-approximation power formula with t quantiles; Nadeau & Bengio 2003 for the variance factor). ``s_d``
    is the standard deviation of the per-fold differences (ddof 1). ``m`` = comparisons of the family: Holm's
    strictest step tests at ``alpha / m`` (x1.32 for m = 3, x1.56 for m = 6 at J = 5).
    """
    if n_units < 2 or n_folds < 2:
        raise ValueError(f"the MDE needs J >= 2 fold values and K >= 2 folds; got J = {n_units}, K = {n_folds}")
    if not (0 < alpha < 1 and 0 < power < 1) or not sd_difference >= 0 or n_comparisons < 1:
        raise ValueError(f"need 0 < alpha, power < 1, sd >= 0 and m >= 1; got {alpha}, {power}, {sd_difference}, "
                         f"{n_comparisons}")
    df = n_units - 1
    quantiles = stats.t.ppf(1 - alpha / (2 * n_comparisons), df) + stats.t.ppf(power, df)
    return float(quantiles * sd_difference * math.sqrt(corrected_variance_factor(n_units, n_folds)))


def bootstrap_mde(standard_error: float, alpha: float = 0.05, power: float = 0.8, n_comparisons: int = 1) -> float:
    """MDE of a bootstrap test at Holm's first step: ``(z_{1-alpha/(2m)} + z_power) SE`` with ``SE`` the bootstrap
    standard deviation of the difference (normal approximation of the resampling distribution)."""
    return float((stats.norm.ppf(1 - alpha / (2 * n_comparisons)) + stats.norm.ppf(power)) * standard_error)


def sd_interval(sd: float, df: int, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a standard deviation estimated with ``df`` degrees of freedom (normal data):
    ``s sqrt(df / chi2_{1-a/2, df})`` to ``s sqrt(df / chi2_{a/2, df})``. With J = 5 folds (df 4) it spans
    0.60 s to 2.87 s: an MDE from five folds is known only to within a factor of about 5."""
    a = 1 - confidence
    return (float(sd * math.sqrt(df / stats.chi2.ppf(1 - a / 2, df))),
            float(sd * math.sqrt(df / stats.chi2.ppf(a / 2, df))))


@dataclass(frozen=True)
class MDE:
    """Minimum detectable difference of the test that ran (80 % power by default), at Holm's first step.

    ``value`` from the observed spread; ``low``/``high`` the same with the spread at the ends of its 95 %
    interval (:func:`sd_interval`; for a bootstrap test the interval is not computed: ``low = high = value``).
    """

    value: float
    low: float
    high: float
    test: str
    n_comparisons: int
    alpha: float
    power: float

    def describe(self) -> str:
        spread = (f" (95 % range {self.low:.3f}-{self.high:.3f} from the uncertainty of the spread of few folds)"
                  if self.high > self.low else "")
        return (f"minimum detectable difference {self.value:.3f}{spread}: {self.power:.0%} power for the {self.test} "
                f"at Holm's first step, alpha {self.alpha:g} / m = {self.n_comparisons}")


def corrected_t_mde(sd_difference: float, n_units: int, n_folds: int, alpha: float = 0.05, power: float = 0.8,
                    n_comparisons: int = 1) -> MDE:
    """:func:`minimum_detectable_difference` with its range from :func:`sd_interval`."""
    value = minimum_detectable_difference(sd_difference, n_units, n_folds, alpha, power, n_comparisons)
    low, high = (minimum_detectable_difference(s, n_units, n_folds, alpha, power, n_comparisons)
                 for s in sd_interval(sd_difference, n_units - 1))
    return MDE(value, low, high, "corrected-t", n_comparisons, alpha, power)


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
        Patient code of each sample, the same code for a patient in every fold and repeat of the column: a
        resample draws patients, every sample of a drawn patient comes along, in every repeat alike.
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

    @property
    def events(self) -> int:
        return int(np.sum(np.asarray(self.event) != 0))


def patient_resample_weights(rng: np.random.Generator, patients: np.ndarray, n_boot: int) -> np.ndarray:
    """Multiplicity of each sample in ``n_boot`` resamples of the patients with replacement; shape (B, n)."""
    codes, inverse = np.unique(np.asarray(patients), return_inverse=True)
    draws = rng.integers(0, codes.size, size=(n_boot, codes.size))
    counts = np.zeros((n_boot, codes.size))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts[:, inverse]


@dataclass(frozen=True)
class BootstrapC:
    """:func:`fold_bootstrap_c`: observed fold-mean C of each method (M,), the same on each resample (B, M), and
    how many resamples lost some fold's comparable pairs (that fold is left out of those resamples' mean)."""

    observed: np.ndarray
    resampled: np.ndarray
    lost: int


def _as_seed_rows(risk) -> np.ndarray:
    r = np.asarray(risk, float)
    return r[None, :] if r.ndim == 1 else r


def fold_bootstrap_c(folds: Sequence[FoldSample], risks: Mapping[str, Sequence[np.ndarray]], n_boot: int = 1000,
                     seed: int = 0) -> BootstrapC:
    """Mean over folds of each method's Harrell C-index (seeds averaged per fold), observed and on paired resamples.

    Every resample draws the column's patients with replacement once (Efron & Tibshirani 1993, ch. 6, paired
    bootstrap): a patient's multiplicity is the same in every fold that holds it (every repeat), for every seed
    and every method. Each (fold, seed) C-index is recomputed on the resample, averaged over seeds, then over
    folds: the quantity of the table. A fold whose resample keeps no comparable pair has no C-index there; it is
    left out of that resample's mean and the resample is counted in ``lost``.

    Parameters
    ----------
    risks : mapping
        Method -> one risk array per fold, shape (n,) or (S, n) for S training seeds.
    """
    if not folds:
        raise ValueError("fold_bootstrap_c needs at least one fold")
    methods = list(risks)
    for m in methods:
        if len(risks[m]) != len(folds):
            raise ValueError(f"method {m!r} has risks for {len(risks[m])} folds, expected {len(folds)}")
    codes = np.unique(np.concatenate([np.asarray(f.patients) for f in folds]), return_inverse=True)[1]
    counts = patient_resample_weights(np.random.default_rng(seed), np.arange(codes.max() + 1), n_boot)
    observed = np.zeros((len(folds), len(methods)))
    resampled = np.zeros((n_boot, len(folds), len(methods)))
    start = 0
    for j, fold in enumerate(folds):
        fold_codes = codes[start:start + fold.time.size]
        start += fold.time.size
        fold_risks = [_as_seed_rows(risks[m][j]) for m in methods]
        for m, risk in zip(methods, fold_risks):
            if risk.shape[1] != fold.time.size:
                raise ValueError(f"method {m!r}, fold {j}: {risk.shape[1]} risks for {fold.time.size} samples")
        observed[j], resampled[:, j] = _fold_c_indices(fold, fold_risks, counts[:, fold_codes])
    lost = ~np.isfinite(resampled).all(axis=(1, 2))
    with warnings.catch_warnings():  # a resample in which every fold lost its pairs: NaN, counted in ``lost``
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(resampled, axis=1)
    return BootstrapC(observed.mean(axis=0), means, int(lost.sum()))


def _fold_c_indices(fold: FoldSample, fold_risks: Sequence[np.ndarray], weights: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One fold's seed-averaged C-index of each method, observed (M,) and under each resample's weights (B, M)."""
    comp = comparable_pairs(fold.time, fold.event)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without a comparable pair: NaN, counted
        denominators = weighted_quadratic_form(weights, comp)
        observed, resampled = [], []
        for seeds in fold_risks:
            conc = [concordance_scores(r) * comp for r in seeds]
            observed.append(np.mean([c.sum() / comp.sum() for c in conc]))
            resampled.append(np.mean([weighted_quadratic_form(weights, c) / denominators for c in conc], axis=0))
    return np.array(observed), np.stack(resampled, axis=1)


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of ``difference = 0``: ``2 min(P*(D <= 0), P*(D >= 0))``, each proportion
    counted as ``(#+1)/(B+1)`` so that it is never 0 (Davison & Hinkley 1997, eq. 4.11)."""
    d = np.asarray(differences, float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise ValueError("no bootstrap resample left to compute a p-value")
    below = (np.sum(d <= 0) + 1) / (d.size + 1)
    above = (np.sum(d >= 0) + 1) / (d.size + 1)
    return float(min(1.0, 2.0 * min(below, above)))


def pooled_fold(folds: Sequence[FoldSample], risks: Mapping[str, Sequence[np.ndarray]]
                ) -> tuple[list[FoldSample], dict[str, list[np.ndarray]]]:
    """Every fold merged into one (the pooled out-of-fold predictions), for the ``pooled-bootstrap`` test."""
    merged = FoldSample(np.concatenate([f.time for f in folds]), np.concatenate([f.event for f in folds]),
                        np.concatenate([f.patients for f in folds]))
    return [merged], {m: [np.concatenate([np.asarray(r, float) for r in per_fold], axis=-1)]
                      for m, per_fold in risks.items()}


# --------------------------------------------------------------------------------------------------
# One table column: per-method fold values (and predictions)
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
        Method -> J risk arrays aligned with ``folds``, each (n,) or (S, n) for S seeds.
    repeats : int, optional
        ``R``, repeats present (default ``J // K``; a cell with unfinished folds has ``J < R K``).
    fold_events : tuple of int, optional
        Events in each of the J validation folds (default: read off ``folds``).
    seeds : int
        Training seeds averaged per fold.
    """

    fold_values: Mapping[str, np.ndarray]
    n_folds: int
    folds: tuple[FoldSample, ...] | None = None
    risks: Mapping[str, Sequence[np.ndarray]] | None = None
    repeats: int | None = None
    fold_events: tuple[int, ...] | None = None
    seeds: int = 1

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
    def n_units(self) -> int:
        return len(next(iter(self.fold_values.values())))

    @property
    def n_repeats(self) -> int:
        return self.repeats or max(1, self.n_units // self.n_folds)

    @property
    def min_events(self) -> int | None:
        """Fewest events in a validation fold (None when unknown)."""
        events = self.fold_events or (tuple(f.events for f in self.folds) if self.folds else None)
        return min(events) if events else None

    def mean(self, method: str) -> float:
        return float(np.mean(self.fold_values[method]))


# --------------------------------------------------------------------------------------------------
# The tests: one registry read by the command line, validation, footers and docs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TestOutcome:
    """What a test returns for a family of pairs: the tested difference ``a - b`` and the raw two-sided p of each
    pair, the standard error of each difference (for the MDE), and the bootstrap's resamples and lost ones."""

    differences: dict[tuple[str, str], float]
    p_values: dict[tuple[str, str], float]
    standard_errors: dict[tuple[str, str], float]
    n_boot: int = 0
    lost: int = 0


def _run_corrected_t(data: ColumnData, pairs, n_boot: int, seed: int) -> TestOutcome:
    diffs, ps, ses = {}, {}, {}
    for a, b in pairs:
        result = corrected_resampled_t(np.subtract(data.fold_values[a], data.fold_values[b]), data.n_folds)
        diffs[(a, b)], ps[(a, b)], ses[(a, b)] = result.mean, result.p_value, result.standard_error
    return TestOutcome(diffs, ps, ses)


def _bootstrap_outcome(folds, risks, pairs, n_boot: int, seed: int) -> TestOutcome:
    boot = fold_bootstrap_c(folds, risks, n_boot=n_boot, seed=seed)
    index = {m: i for i, m in enumerate(risks)}
    diffs, ps, ses = {}, {}, {}
    for a, b in pairs:
        d = boot.resampled[:, index[a]] - boot.resampled[:, index[b]]
        diffs[(a, b)] = float(boot.observed[index[a]] - boot.observed[index[b]])
        ps[(a, b)] = bootstrap_p_value(d)
        ses[(a, b)] = float(np.nanstd(d, ddof=1))
    return TestOutcome(diffs, ps, ses, n_boot, boot.lost)


def _run_fold_bootstrap(data: ColumnData, pairs, n_boot: int, seed: int) -> TestOutcome:
    return _bootstrap_outcome(list(data.folds), dict(data.risks), pairs, n_boot, seed)


def _run_pooled_bootstrap(data: ColumnData, pairs, n_boot: int, seed: int) -> TestOutcome:
    folds, risks = pooled_fold(list(data.folds), dict(data.risks))
    return _bootstrap_outcome(folds, risks, pairs, n_boot, seed)


def _needs_predictions(data: ColumnData) -> str | None:
    return None if data.folds is not None and data.risks is not None else "needs the stored predictions of every fold"


def _one_repeat_one_seed(data: ColumnData) -> str | None:
    if data.n_repeats > 1 or data.seeds > 1:
        return "pools each patient's risk once: one repeat and one seed only (use corrected-t)"
    return _needs_predictions(data)


#: Fewest events in every validation fold at which the bootstrap tests show their marks. A resample misses all
#: ``e`` event patients of a fold with probability about ``exp(-e)`` (37 % at 1 event, 5 % at 3, 0.7 % at 5):
#: that fold then has no C-index there, and the resampling distribution is no longer that of the table's mean
#: over every fold. From 5 events on, at most a few per cent of resamples lose a fold (5 folds). The calibration
#: (docs/EXPERIMENTS.md) found the bootstraps conservative, not liberal, below it; the marks are withheld
#: there because the distribution answers another question, not because of a measured excess.
BOOTSTRAP_MIN_EVENTS = 5


@dataclass(frozen=True)
class StatTest:
    """One paired test of the registry.

    Attributes
    ----------
    name, description : str
        Command-line name; what the footer says it is (with its source).
    conditions_on : str
        What the test holds fixed: its null hypothesis in words (the footer prints it).
    metrics : tuple of str or None
        Metrics it can test (None: any stored per-fold metric).
    design : str
        What the column must provide (the docs print it).
    min_events : int
        Fewest events per validation fold at which its marks are shown (0: no threshold); see
        :data:`BOOTSTRAP_MIN_EVENTS`.
    run : callable
        ``run(data, pairs, n_boot, seed) -> TestOutcome``.
    check : callable
        ``check(data) -> None or why the column's design does not allow the test``.
    bootstrap : bool
        Draws resamples (``--n-boot``, ``--boot-seed``).
    """

    name: str
    description: str
    conditions_on: str
    metrics: tuple[str, ...] | None
    design: str
    min_events: int
    run: Callable[[ColumnData, Sequence[tuple[str, str]], int, int], TestOutcome]
    check: Callable[[ColumnData], str | None]
    bootstrap: bool = False

    def problem(self, metric: str) -> str | None:
        """Why the test cannot test ``metric`` (None when it can)."""
        if self.metrics is not None and metric not in self.metrics:
            return f"the {self.name} test recomputes Harrell's C-index; for {metric} use --test corrected-t (or auto)"
        return None


STAT_TESTS: dict[str, StatTest] = {t.name: t for t in (
    StatTest("corrected-t", "corrected resampled t-test over the per-fold differences (Nadeau & Bengio 2003; "
             "Bouckaert & Frank 2004 for repeats)",
             "the cohort only (it compares training procedures: each fold's freshly seeded model puts the training "
             "randomness into the fold-to-fold spread)",
             None, "any per-fold metric; J >= 2 validation folds", 0, _run_corrected_t, lambda data: None),
    StatTest("fold-bootstrap", "paired bootstrap over patients (each once for every repeat and seed), every fold's "
             "C-index recomputed (Efron & Tibshirani 1993)",
             "the trained models: held fixed, only the validation patients are resampled",
             ("c_index",), "Harrell's C-index with stored predictions", BOOTSTRAP_MIN_EVENTS, _run_fold_bootstrap,
             _needs_predictions, bootstrap=True),
    StatTest("pooled-bootstrap", "paired bootstrap over patients of one C-index on the risks pooled across folds "
             "(not the quantity of the table)",
             "the trained models: held fixed, only the validation patients are resampled",
             ("c_index",), "Harrell's C-index with stored predictions; one repeat, one seed", BOOTSTRAP_MIN_EVENTS,
             _run_pooled_bootstrap, _one_repeat_one_seed, bootstrap=True),
)}
DEFAULT_TEST = "corrected-t"
#: ``--test`` choices: ``auto`` (= :data:`DEFAULT_TEST`) and every registered test.
TEST_CHOICES = ("auto", *STAT_TESTS)


def test_help() -> str:
    """The ``--test`` help text, from the registry."""
    return "; ".join(f"{t.name}: conditional on {t.conditions_on}" for t in STAT_TESTS.values()) + \
        f"; auto = {DEFAULT_TEST}"


def check_test(test: str, metric: str = "c_index") -> None:
    """Raise ValueError when ``test`` is unknown or cannot test ``metric``."""
    if test != "auto" and test not in STAT_TESTS:
        raise ValueError(f"unknown test {test!r}; expected one of {', '.join(TEST_CHOICES)}")
    problem = STAT_TESTS[DEFAULT_TEST if test == "auto" else test].problem(metric)
    if problem:
        raise ValueError(problem)


def resolve_test(test: str, data: ColumnData) -> str:
    """``auto`` -> :data:`DEFAULT_TEST`; raises ValueError when the column's design does not allow the test."""
    check_test(test)
    name = DEFAULT_TEST if test == "auto" else test
    problem = STAT_TESTS[name].check(data)
    if problem:
        raise ValueError(f"the {name} test {problem}")
    return name


def pair_tests(data: ColumnData, pairs: Sequence[tuple[str, str]], test: str, n_boot: int = 1000,
               seed: int = 0) -> dict[tuple[str, str], tuple[float, float]]:
    """``(a, b) -> (difference a - b of the tested quantity, raw two-sided p)`` for every pair (``test``
    resolved). The bootstrap tests draw one set of resamples for all methods: every pair is paired on them."""
    outcome = STAT_TESTS[test].run(data, pairs, n_boot, seed)
    return {pair: (outcome.differences[pair], outcome.p_values[pair]) for pair in pairs}


# --------------------------------------------------------------------------------------------------
# Holm over the declared family, marks, the set tied for best, footer
# --------------------------------------------------------------------------------------------------
@dataclass
class ColumnSignificance:
    """Raw and Holm-adjusted p-values of one column's declared family, and the rows they mark.

    ``marks`` maps a row to ``"worse"`` or ``"better"``: in the ``reference`` family, relative to the reference;
    in ``all-pairs``, ``"worse"`` = significantly below at least one other row. ``tied_best``: in the all-pairs
    family, the column's best row and every row not significantly below it (None in the reference family,
    which does not test against the best). ``withheld``: why no mark is shown although the test ran.
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
    n_units: int = 0  # validation folds every row finished (J)
    lost: int = 0  # resamples in which some fold lost its comparable pairs
    withheld: str | None = None
    tied_best: set[str] | None = None
    mde: MDE | None = None
    seeds: int = 1

    @property
    def n_comparisons(self) -> int:
        return len(self.pairs)

    def footer(self, marker: str = "*", details: bool = True) -> str:
        """The sentence a table prints under itself: test, what it conditions on, family, Holm, alpha, m; with
        ``details`` the column's own facts too (:meth:`details`)."""
        spec = STAT_TESTS[self.test]
        what = (f"↓ / ↑ significantly worse / better than {self.reference}" if self.family == "reference"
                else f"{marker} significantly below at least one other row")
        family = (f"every method vs {self.reference}" if self.family == "reference" else "all pairs of rows")
        m = self.n_comparisons
        resamples = f" ({self.n_boot} resamples)" if self.n_boot else ""
        text = (f"{what}: two-sided {spec.description}{resamples}, conditional on {spec.conditions_on}; "
                f"family {family}, Holm-adjusted over m = {m} comparison{'s' if m != 1 else ''} per column, "
                f"family-wise alpha {self.alpha:g}.")
        return f"{text} {self.details()}" if details else text

    def details(self) -> str:
        """The column's own facts: finished folds, resamples that lost a fold's pairs, withheld marks."""
        text = (f"{self.n_units} finished validation folds ({self.n_folds} per repeat, {self.n_repeats} repeat(s), "
                f"{self.seeds} seed(s)).")
        if self.lost:
            text += (f" {self.lost} of {self.n_boot} resamples lost some fold's comparable pairs (that fold left "
                     "out of their mean).")
        if self.withheld:
            text += f" Marks withheld: {self.withheld}."
        return text


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


def tied_for_best(data: ColumnData, adjusted_p: Mapping[tuple[str, str], float], alpha: float,
                  higher_is_better: bool = True) -> set[str]:
    """The row with the best mean and every row not significantly below it (Holm-adjusted all-pairs p-values):
    the set statistically tied for best, the only rows a table may call best."""
    sign = 1.0 if higher_is_better else -1.0
    best = max(data.methods, key=lambda m: sign * data.mean(m))
    tied = {best}
    for (a, b), p in adjusted_p.items():
        if best in (a, b):
            other = b if a == best else a
            if p > alpha or sign * (data.mean(best) - data.mean(other)) <= 0:
                tied.add(other)
    return tied


def _withheld(spec: StatTest, data: ColumnData) -> str | None:
    events = data.min_events
    if spec.min_events and events is not None and events < spec.min_events:
        return (f"a validation fold has {events} event(s), fewer than {spec.min_events}: resamples often miss all of "
                f"a fold's event patients, so the {spec.name} distribution is not that of the mean over every fold "
                "(docs/EXPERIMENTS.md)")
    return None


def _test_mde(spec: StatTest, data: ColumnData, outcome: TestOutcome, alpha: float, m: int) -> MDE | None:
    """The MDE of the test that ran, its spread pooled (root mean square) over the family's informative pairs."""
    if spec.bootstrap:
        ses = [s for s in outcome.standard_errors.values() if np.isfinite(s) and s > 0]
        if not ses:
            return None
        value = bootstrap_mde(float(np.sqrt(np.mean(np.square(ses)))), alpha, 0.8, m)
        return MDE(value, value, value, spec.name, m, alpha, 0.8)
    sds = [np.std(np.subtract(data.fold_values[a], data.fold_values[b]), ddof=1) for a, b in outcome.differences]
    sds = [s for s in sds if s > 0]
    if not sds:
        return None
    return corrected_t_mde(float(np.sqrt(np.mean(np.square(sds)))), data.n_units, data.n_folds, alpha, 0.8, m)


def column_significance(data: ColumnData, *, family: str = "reference", reference: str | None = None,
                        alpha: float = 0.05, test: str = "auto", n_boot: int = 1000, seed: int = 0,
                        higher_is_better: bool = True) -> ColumnSignificance:
    """Test one column's declared family of pairs and Holm-adjust it (Holm 1979).

    Parameters
    ----------
    data : ColumnData
        Per-method fold values (and predictions for the bootstrap tests).
    family : {"reference", "all-pairs"}
        Every method vs ``reference`` (``k - 1`` comparisons) or every pair (``k (k - 1) / 2``).
    alpha : float
        Family-wise error rate: a row is marked where its Holm-adjusted p-value is ``<= alpha``.
    test : str
        A name of :data:`STAT_TESTS`, or ``auto`` (:data:`DEFAULT_TEST`).
    n_boot : int
        Bootstrap resamples, raised to :func:`resamples_for` when too few to reach the Holm thresholds.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    spec = STAT_TESTS[resolve_test(test, data)]
    pairs = comparison_family(data.methods, family, reference)
    n_boot = resamples_for(len(pairs), alpha, n_boot) if spec.bootstrap else 0
    outcome = spec.run(data, pairs, n_boot, seed)
    raw = {pair: outcome.p_values[pair] for pair in pairs}
    adjusted = dict(zip(pairs, holm_adjust([raw[pair] for pair in pairs])))
    withheld = _withheld(spec, data)
    marks = {} if withheld else marks_from_adjusted(family, outcome.differences, adjusted, alpha, higher_is_better)
    tied = (tied_for_best(data, adjusted, alpha, higher_is_better) if family == "all-pairs" and not withheld
            else None)
    return ColumnSignificance(spec.name, family, reference if family == "reference" else None, alpha, pairs,
                              dict(outcome.differences), raw, adjusted, marks, data.n_folds, data.n_repeats, n_boot,
                              data.n_units, outcome.lost, withheld, tied,
                              _test_mde(spec, data, outcome, alpha, len(pairs)), data.seeds)


def vs_best_marks(data: ColumnData, *, alpha: float = 0.05, test: str = "pooled-bootstrap", n_boot: int = 1000,
                  seed: int = 0) -> set[str]:
    """A rule kept only to document its error rate: every row vs the column's *observed* best, each at the raw
    ``alpha``. The best is chosen from the same data and ``k - 1`` tests run unadjusted, so with equally good
    methods it marks some row far more often than ``alpha`` (see :func:`null_marking_rates`)."""
    best = max(data.methods, key=data.mean)
    pairs = [(best, m) for m in data.methods if m != best]
    tested = pair_tests(data, pairs, resolve_test(test, data), n_boot=n_boot, seed=seed)
    return {b for (a, b), (diff, p) in tested.items() if p < alpha and diff > 0}


# --------------------------------------------------------------------------------------------------
# Null calibration: how often does a test mark anything when every method is equally good?
# --------------------------------------------------------------------------------------------------
def fold_harrell_c(fold: FoldSample, risk: np.ndarray) -> float:
    """Harrell's C-index of one fold's risks (pair-matrix form of ``concordance_index_censored``)."""
    comp = comparable_pairs(fold.time, fold.event)
    return float((concordance_scores(risk) * comp).sum() / comp.sum())


def _null_survival(rng: np.random.Generator, n_patients: int, censor_high: float):
    """Standard-normal true risk x, exponential times with hazard ``exp(x) / 30``, uniform censoring on
    [5, censor_high] months (120: about 45 % censored; 25: about 80 %)."""
    x = rng.normal(size=n_patients)
    event_time = rng.exponential(30.0 * np.exp(-x))
    censor_time = rng.uniform(5.0, censor_high, size=n_patients)
    return x, np.minimum(event_time, censor_time), (event_time <= censor_time).astype(int)


def simulate_null_column(rng: np.random.Generator, n_methods: int = 6, n_patients: int = 150, n_folds: int = 5,
                         n_repeats: int = 1, noise: float = 1.0, model_sd: float = 0.0, censor_high: float = 120.0,
                         min_events: int = 1) -> ColumnData:
    """One column of ``n_methods`` equally good training procedures.

    Each (method, repeat, fold) is a freshly trained model: risk = ``q x + noise e`` with the true risk ``x``,
    per-patient noise ``e`` and a model-level quality ``q = max(0, 1 + model_sd z)`` drawn per model, so trained
    models differ in true C-index around the same mean (``model_sd`` 0.3 gives a seed-to-seed C spread of about
    0.03 at ``noise`` 1). Times: :func:`_null_survival`. Each repeat draws a new partition into ``n_folds``
    folds; a partition with a fold of fewer than ``min_events`` events is drawn again.
    """
    x, time, event = _null_survival(rng, n_patients, censor_high)
    while event.sum() < n_folds * max(1, min_events):
        x, time, event = _null_survival(rng, n_patients, censor_high)
    methods = [f"m{i}" for i in range(n_methods)]
    folds, risks = [], {m: [] for m in methods}
    for _ in range(n_repeats):
        fold_of = _partition(rng, time, event, n_folds, max(1, min_events))
        for k in range(n_folds):
            val = np.flatnonzero(fold_of == k)
            folds.append(FoldSample(time[val], event[val], val))
            for m in methods:
                q = max(0.0, 1.0 + model_sd * rng.normal())
                risks[m].append(q * x[val] + noise * rng.normal(size=val.size))
    values = {m: np.array([fold_harrell_c(f, r) for f, r in zip(folds, risks[m])]) for m in methods}
    return ColumnData(values, n_folds, tuple(folds), risks)


def _partition(rng: np.random.Generator, time: np.ndarray, event: np.ndarray, n_folds: int,
               min_events: int) -> np.ndarray:
    """A random fold of each patient, every fold with at least ``min_events`` events and a comparable pair."""
    while True:
        fold_of = rng.permutation(np.arange(event.size) % n_folds)
        if all(event[fold_of == k].sum() >= min_events
               and comparable_pairs(time[fold_of == k], event[fold_of == k]).sum() > 0 for k in range(n_folds)):
            return fold_of


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


def friedman_from_mean_ranks(mean_ranks: Sequence[float], n_datasets: int, tie_correction: float = 1.0
                             ) -> FriedmanResult:
    """Friedman and Iman-Davenport statistics from the methods' mean ranks (Demšar 2006, JMLR 7:1-30, sec. 3.2.2).

    ``chi2_F = 12 N / (k (k + 1)) [sum_j R_j^2 - k (k + 1)^2 / 4] / C`` with ``k - 1`` df, ``C`` the tie
    correction (:func:`friedman_tie_correction`; 1 without ties), and
    ``F_F = (N - 1) chi2_F / (N (k - 1) - chi2_F)``, F-distributed with ``(k - 1, (k - 1)(N - 1))`` df
    (Iman & Davenport 1980), less conservative than the chi-square.
    """
    r = np.asarray(mean_ranks, float)
    k, n = r.size, int(n_datasets)
    if k < 2 or n < 2:
        raise ValueError(f"the Friedman test needs >= 2 methods and >= 2 data sets; got k = {k}, N = {n}")
    if not 0 < tie_correction <= 1:
        raise ValueError(f"the tie correction lies in (0, 1]; got {tie_correction}")
    chi2 = 12.0 * n / (k * (k + 1)) * (np.sum(r ** 2) - k * (k + 1) ** 2 / 4.0) / tie_correction
    df1, df2 = k - 1, (k - 1) * (n - 1)
    denominator = n * (k - 1) - chi2
    f = math.inf if denominator <= 0 else (n - 1) * chi2 / denominator  # every data set ranks alike: F infinite
    f_p = 0.0 if math.isinf(f) else float(stats.f.sf(f, df1, df2))
    return FriedmanResult(float(chi2), float(stats.chi2.sf(chi2, df1)), float(f), f_p, df1, df2, n, k)


def friedman_tie_correction(ranks: np.ndarray) -> float:
    """``C = 1 - sum (t^3 - t) / (N k (k^2 - 1))`` over the groups of ``t`` tied ranks within each data set (row)
    (Hollander & Wolfe 1999, sec. 7.1; what ``scipy.stats.friedmanchisquare`` divides by)."""
    r = np.asarray(ranks, float)
    n, k = r.shape
    ties = sum(float(np.sum(counts ** 3 - counts)) for counts in
               (np.unique(row, return_counts=True)[1].astype(float) for row in r))
    return 1.0 - ties / (n * k * (k * k - 1))


def friedman_test(scores: np.ndarray, higher_is_better: bool = True) -> FriedmanResult:
    """Friedman (tie-corrected) and Iman-Davenport tests on a data sets x methods score matrix.

    Equals ``scipy.stats.friedmanchisquare`` for the chi-square (ties included); a matrix whose every row is all
    ties (``C = 0``) carries no ranking: chi2 = 0, p = 1.
    """
    ranks = rank_rows(scores, higher_is_better)
    correction = friedman_tie_correction(ranks)
    if correction <= 0:
        n, k = ranks.shape
        return FriedmanResult(0.0, 1.0, 0.0, 1.0, k - 1, (k - 1) * (n - 1), n, k)
    return friedman_from_mean_ranks(ranks.mean(axis=0), ranks.shape[0], correction)


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

    Used for the D-calibration tests of the folds of one repeat and seed of a cell (disjoint validation
    patients); :func:`average_p_value` then combines repeats and seeds, which share patients.
    """
    p = np.asarray([v for v in p_values if v is not None and math.isfinite(v)], dtype=float)
    if p.size == 0:
        raise ValueError("fisher_combined_p needs at least one finite p-value")
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1]; got {p.tolist()}")
    statistic = -2.0 * np.sum(np.log(np.clip(p, np.finfo(float).tiny, 1.0)))
    return float(stats.chi2.sf(statistic, 2 * p.size))


def average_p_value(p_values: Sequence[float]) -> float:
    """``min(1, 2 mean(p))``: a p-value valid under any dependence between the tests (Rüschendorf 1982; Vovk &
    Wang 2020, Biometrika 107:791-808, "twice the arithmetic mean"). Used to combine the D-calibration of several
    repeats or seeds of one cell, whose validation patients recur."""
    p = np.asarray([v for v in p_values if v is not None and math.isfinite(v)], dtype=float)
    if p.size == 0:
        raise ValueError("average_p_value needs at least one finite p-value")
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1]; got {p.tolist()}")
    return float(p[0]) if p.size == 1 else float(min(1.0, 2.0 * p.mean()))
