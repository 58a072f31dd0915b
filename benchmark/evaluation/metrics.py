"""Evaluation metrics: Harrell's C-index (the headline number), Uno's C, integrated Brier score, time-dependent AUC,
D-calibration.

Every function takes plain arrays. Sign contract everywhere: ``risk`` is *higher for shorter survival*
(``-sum(S)`` for the discrete-time head, the log partial hazard for a Cox head).

The inverse-probability-of-censoring weights of Uno's C, the Brier score and the AUC are fitted on the
*training fold* (scikit-survival's Kaplan-Meier censoring estimator), never on the evaluated fold.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import chi2
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

#: sksurv's risk-tie tolerance, as in every MCAT / Patch-GCN / CrossFusion evaluation.
TIED_TOL = 1e-8
#: Floor of a survival value before its logarithm.
TINY = np.finfo(float).tiny


#: Note a record carries when its validation fold has no event: Harrell's C-index has no comparable pair.
NO_EVENTS_NOTE = "no events: C-index undefined"


def _as_arrays(time, event, risk=None):
    t = np.asarray(time, dtype=float).reshape(-1)
    e = np.asarray(event).reshape(-1).astype(bool)
    if t.shape != e.shape:
        raise ValueError(f"time has {t.size} values but event has {e.size}")
    if not np.isfinite(t).all():
        raise ValueError("time contains NaN or infinite values")
    if risk is None:
        return t, e
    r = np.asarray(risk, dtype=float).reshape(-1)
    if r.shape != t.shape:
        raise ValueError(f"risk has {r.size} values but time has {t.size}")
    if not np.isfinite(r).all():
        raise ValueError("risk contains NaN or infinite values")
    return t, e, r


def c_index(time: Sequence[float], event: Sequence[int | bool], risk: Sequence[float], tied_tol: float = TIED_TOL) -> float:
    """Harrell's concordance index, with scikit-survival's ``concordance_index_censored``.

    Parameters
    ----------
    time : array-like, shape (n,)
        Follow-up times (continuous months, not bins).
    event : array-like, shape (n,)
        1 / True = event observed, 0 / False = censored (``event = 1 - censorship``).
    risk : array-like, shape (n,)
        Predicted risk. **Higher risk = shorter survival**: a perfect model scores 1, the reversed
        ranking 0, noise 0.5. Pass ``-sum(S)`` for the discrete-time head, never ``sum(S)``.
    tied_tol : float
        Risks closer than this count as ties (scored 1/2).

    Returns
    -------
    float
        Fraction of comparable pairs (the earlier time is an event) ordered concordantly.

    Raises
    ------
    ValueError
        When every sample is censored (no comparable pair).
    """
    t, e, r = _as_arrays(time, event, risk)
    if not e.any():
        raise ValueError("c_index: all samples are censored, the C-index is undefined")
    return float(concordance_index_censored(e, t, r, tied_tol=tied_tol)[0])


def survival_at(survival: np.ndarray, bin_edges: Sequence[float], times: Sequence[float]) -> np.ndarray:
    """Continuous survival curve of the discrete-time head: **constant hazard within each bin**.

    Convention (stated because IBS, td-AUC and D-calibration depend on it): ``S_k = P(T > e_k)`` is the survival
    at the end of bin ``k`` (``[e_{k-1}, e_k)``, ``k = 1..K``); ``S(t) = 1`` up to the first edge ``e_0``; inside a
    bin the hazard is constant, so ``log S`` is interpolated linearly between the edges,
    ``S(t) = S_{k-1} (S_k / S_{k-1})^((t - e_{k-1}) / (e_k - e_{k-1}))`` with ``S_0 = 1``; past the last edge the
    last bin's hazard continues. Survival values are floored at the smallest positive float before the logarithm
    (a zero survival stays zero to machine precision).

    Parameters
    ----------
    survival : ndarray, shape (n, K)
        Discrete survival ``S_1..S_K`` of each sample (non-increasing).
    bin_edges : array-like, shape (K + 1,)
        Bin edges used for training (outer edges included).
    times : array-like, shape (m,)
        Times at which to evaluate.

    Returns
    -------
    ndarray, shape (n, m)
    """
    s = np.asarray(survival, dtype=float)
    edges = np.asarray(bin_edges, dtype=float)
    if s.ndim != 2 or edges.size != s.shape[1] + 1:
        raise ValueError(f"survival must be (n, K) with K + 1 bin edges; got {s.shape} and {edges.size} edges")
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"bin edges must increase strictly; got {edges.tolist()}")
    log_s = np.concatenate([np.zeros((s.shape[0], 1)), np.log(np.clip(s, TINY, 1.0))], axis=1)  # at e_0..e_K
    t = np.asarray(times, dtype=float).reshape(-1)
    k = np.clip(np.searchsorted(edges, t, side="left"), 1, edges.size - 1)  # bin (e_{k-1}, e_k] holding t
    fraction = (t - edges[k - 1]) / (edges[k] - edges[k - 1])  # > 1 past the last edge: extrapolates
    log_at = log_s[:, k - 1] + np.maximum(fraction, 0.0) * (log_s[:, k] - log_s[:, k - 1])
    return np.where(t <= edges[0], 1.0, np.exp(log_at))


def evaluation_times(train_time: np.ndarray, test_time: np.ndarray, n: int = 32,
                     test_event: np.ndarray | None = None) -> np.ndarray:
    """Time grid for IBS / AUC where both folds support it.

    Inside ``[lo, hi)`` with ``lo`` the later of both folds' first times and, given ``test_event``, of the
    evaluated fold's first event in range (before it the AUC has no case: sksurv returns NaN), and ``hi`` the
    earlier of both folds' last times (sksurv needs times inside the test range, the censoring weights need
    training patients at risk). The grid is the 10th-90th percentiles of the evaluated fold's times in that
    range; when they give fewer than 2 points, the distinct times in range themselves. Empty when no event
    lies in range.
    """
    test_time = np.asarray(test_time, float)
    lo = max(float(np.min(test_time)), float(np.min(train_time)))
    hi = min(float(np.max(test_time)), float(np.max(train_time)))
    if test_event is not None:
        events = test_time[np.asarray(test_event).astype(bool) & (test_time >= lo) & (test_time < hi)]
        if events.size == 0:
            return np.array([])
        lo = float(events.min())
    in_range = test_time[(test_time >= lo) & (test_time < hi)]
    if in_range.size == 0:
        return np.array([])
    grid = np.unique(np.quantile(in_range, np.linspace(0.1, 0.9, n)))
    grid = grid[(grid >= lo) & (grid < hi)]
    return grid if grid.size >= 2 else np.unique(in_range)


def censor_after(time: np.ndarray, event: np.ndarray, horizon: float,
                 limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Administratively censor the samples followed beyond ``horizon`` at the first such time (at most ``limit``).

    Brier scores, the cumulative/dynamic AUC and Uno's C at times ``<= horizon`` use a sample observed past
    the horizon only as "still at risk", never its own censoring weight, so this leaves them unchanged; it keeps
    scikit-survival from evaluating the training fold's censoring survival at an event past the last training
    time (where it is 0 or undefined). ``limit`` (the training fold's last time, above the horizon) keeps the
    new censoring time inside the training follow-up too.
    """
    t, e = np.asarray(time, float).copy(), np.asarray(event).astype(bool).copy()
    beyond = t > horizon
    if beyond.any():
        first = t[beyond].min()
        t[beyond], e[beyond] = first if limit is None or limit <= horizon else min(first, limit), False
    return t, e


def _nan_on_failure(func, name: str, errors: dict[str, str] | None):
    """``func()`` as a float; NaN when it fails or is not finite, with the reason stored in ``errors[name]``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(func())
    except (ValueError, ZeroDivisionError, IndexError) as exc:
        # e.g. no event in the evaluated fold: undefined, reported as NaN with the reason kept for the record
        if errors is not None:
            errors[name] = f"{type(exc).__name__}: {exc}"
        return float("nan")
    if not math.isfinite(value) and errors is not None:
        errors[name] = f"non-finite value {value}"
    return value if math.isfinite(value) else float("nan")


@dataclass(frozen=True)
class DCalibration:
    """D-calibration of one evaluated fold: bin counts and the chi-square test of their uniformity."""

    counts: np.ndarray
    statistic: float
    p_value: float


def d_calibration(survival_at_time: Sequence[float], event: Sequence[int | bool], n_bins: int = 10) -> DCalibration:
    """D-calibration (Haider, Hoehn, Davis & Greiner 2020, JMLR 21(85), sec. 3.2 / Appendix B).

    For a calibrated model the predicted survival at the observed time, ``S_i(t_i)``, is uniform on [0, 1]. With
    ``B`` equal bins of [0, 1]: an uncensored sample adds 1 to the bin of ``S_i(t_i)``; a censored one with
    ``s = S_i(c_i)`` spreads one unit uniformly over [0, s] (its true ``S(T)`` lies below ``s``): ``(s - l_b)/s`` to
    the bin ``b`` holding ``s`` (lower edge ``l_b``) and ``1/(B s)`` to every bin below. Pearson's chi-square of
    the counts against ``n/B`` each, ``B - 1`` degrees of freedom; a small p-value = miscalibrated.
    """
    s = np.clip(np.asarray(survival_at_time, dtype=float).reshape(-1), 0.0, 1.0)
    e = np.asarray(event).reshape(-1).astype(bool)
    if s.shape != e.shape or s.size == 0 or n_bins < 2 or not np.isfinite(s).all():
        raise ValueError(f"d_calibration needs n > 0 finite survival values, one per event flag, and >= 2 bins; "
                         f"got {s.size} values, {e.size} flags, {n_bins} bins")
    bin_of = np.minimum((s * n_bins).astype(int), n_bins - 1)  # S = 1 falls in the top bin
    counts = np.bincount(bin_of[e], minlength=n_bins).astype(float)
    for value, b in zip(s[~e], bin_of[~e]):
        if value <= 0:  # survival 0 at censoring: all mass in the lowest bin
            counts[0] += 1.0
            continue
        counts[b] += (value - b / n_bins) / value
        counts[:b] += 1.0 / (n_bins * value)
    expected = s.size / n_bins
    statistic = float(np.sum((counts - expected) ** 2) / expected)
    return DCalibration(counts, statistic, float(chi2.sf(statistic, n_bins - 1)))


def evaluate(
    time: Sequence[float],
    event: Sequence[int | bool],
    risk: Sequence[float],
    train_time: Sequence[float],
    train_event: Sequence[int | bool],
    survival: np.ndarray | None = None,
    bin_edges: Sequence[float] | None = None,
    errors: dict[str, str] | None = None,
) -> dict[str, float]:
    """All metrics of one evaluated fold.

    Parameters
    ----------
    time, event, risk : array-like, shape (n,)
        Evaluated (reported) fold; ``risk`` higher = shorter survival.
    train_time, train_event : array-like, shape (n_train,)
        Training fold, used only to fit the censoring distribution (IPCW).
    survival : ndarray, shape (n, K), optional
        Discrete survival of each evaluated sample (curve convention: :func:`survival_at`); without it (Cox
        heads) ``ibs`` and ``d_calibration_p`` are NaN.
    bin_edges : array-like, shape (K + 1,), optional
        Bin edges of ``survival``.
    errors : dict, optional
        Filled with ``metric -> reason`` for every metric reported as NaN, for the caller to store.

    Returns
    -------
    dict
        ``c_index`` (Harrell), ``c_index_uno`` (truncated just after the top of the time grid), ``ibs`` (lower is
        better), ``mean_auc`` and ``d_calibration_p`` (Haider et al. 2020, 10 bins). ``mean_auc`` is
        scikit-survival's summary of the cumulative/dynamic AUC (``cumulative_dynamic_auc(...)[1]``): the AUC at
        the grid times weighted by the drop of the evaluated fold's Kaplan-Meier estimate at each time,
        ``sum_i AUC(t_i) (S(t_{i-1}) - S(t_i)) / (1 - S(t_last))`` with ``S(t_0) = 1`` (Lambert & Chevret 2016),
        not their plain mean (they differ by up to 0.08 on
        small folds). The grid (:func:`evaluation_times`) starts at the fold's first event and lies inside both
        folds' follow-up; samples followed past it are censored there (:func:`censor_after`), which leaves every
        metric on the grid unchanged. A metric undefined for the fold is NaN with its reason in ``errors``.
    """
    errors = {} if errors is None else errors
    t, e, r = _as_arrays(time, event, risk)
    tt, te = _as_arrays(train_time, train_event)
    grid = evaluation_times(tt, t, test_event=e)
    out = {"c_index": _nan_on_failure(lambda: c_index(t, e, r), "c_index", errors)}
    if grid.size == 0:
        reason = ("no event in the validation fold" if not e.any() else
                  "no validation event inside both folds' follow-up (before the last validation and training times)")
        for name in ("c_index_uno", "ibs", "mean_auc"):
            out[name] = _nan_on_failure(_raise(reason), name, errors)
    else:
        y_train = Surv.from_arrays(te, tt)
        t_cut, e_cut = censor_after(t, e, float(grid[-1]), limit=float(np.max(tt)))
        y_test = Surv.from_arrays(e_cut, t_cut)
        # truncated just after the grid's last time, so an event at that time still counts (sksurv keeps T < tau)
        tau = max(float(np.max(t_cut)), float(np.nextafter(grid[-1], np.inf)))
        out["c_index_uno"] = _nan_on_failure(lambda: concordance_index_ipcw(
            y_train, y_test, r, tau=tau, tied_tol=TIED_TOL)[0], "c_index_uno", errors)
        out["ibs"] = _nan_on_failure(lambda: _ibs(y_train, y_test, survival, bin_edges, grid), "ibs", errors)
        out["mean_auc"] = _nan_on_failure(lambda: cumulative_dynamic_auc(
            y_train, y_test, r, grid, tied_tol=TIED_TOL)[1], "mean_auc", errors)
    out["d_calibration_p"] = _nan_on_failure(lambda: _d_calibration_p(t, e, survival, bin_edges),
                                             "d_calibration_p", errors)
    return out


def _raise(reason: str):
    def fail():
        raise ValueError(reason)
    return fail


def _ibs(y_train, y_test, survival, bin_edges, grid) -> float:
    if survival is None or bin_edges is None:
        raise ValueError("no survival function (Cox head): the integrated Brier score is undefined")
    if grid.size < 2:
        raise ValueError("fewer than 2 evaluation times: nothing to integrate")
    return integrated_brier_score(y_train, y_test, survival_at(np.asarray(survival), bin_edges, grid), grid)


def _d_calibration_p(time, event, survival, bin_edges) -> float:
    if survival is None or bin_edges is None:
        raise ValueError("no survival function (Cox head): D-calibration is undefined")
    at_own_time = np.diagonal(survival_at(np.asarray(survival), bin_edges, time))  # S_i(t_i); n is a fold, small
    return d_calibration(at_own_time, event).p_value


def aggregate(values: Sequence[float]) -> tuple[float, float]:
    """Mean and **population** standard deviation (ddof 0) over folds, as MCAT's ``cindex.csv``.

    NaN entries are ignored; an empty input gives ``(nan, nan)``.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=0))
