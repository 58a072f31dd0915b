"""Evaluation metrics: Harrell's C-index (the headline number), Uno's C, integrated Brier score, time-dependent AUC.

Every function takes plain arrays. Sign contract everywhere: ``risk`` is *higher for shorter survival*
(``-sum(S)`` for the discrete-time head, the log partial hazard for a Cox head).

The inverse-probability-of-censoring weights of Uno's C, the Brier score and the AUC are fitted on the
*training fold* (scikit-survival's Kaplan-Meier censoring estimator), never on the evaluated fold.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

#: sksurv's risk-tie tolerance, as in every MCAT / Patch-GCN / CrossFusion evaluation.
TIED_TOL = 1e-8


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


def discrete_survival_function(survival: np.ndarray, bin_edges: Sequence[float], times: Sequence[float]) -> np.ndarray:
    """Evaluate the discrete-time survival of each sample as a right-continuous step function.

    ``S_k = P(T > end of bin k)`` with bins ``[e_k, e_{k+1})``, so ``S(t) = 1`` before the first inner edge,
    ``S_k`` on ``[e_k, e_{k+1})`` for ``k = 1..K-1`` and ``S_K`` from the last edge on.

    Parameters
    ----------
    survival : ndarray, shape (n, K)
        Discrete survival ``S`` of each sample.
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
    padded = np.concatenate([np.ones((s.shape[0], 1)), s], axis=1)
    index = np.searchsorted(edges[1:], np.asarray(times, dtype=float), side="right")
    return padded[:, index]


def evaluation_times(train_time: np.ndarray, test_time: np.ndarray, n: int = 32) -> np.ndarray:
    """Time grid for IBS / AUC: the 10th-90th percentiles of the evaluated fold's times, kept strictly inside
    both folds' follow-up (sksurv needs times inside the test range, and the censoring weights need
    times where the training fold still has patients at risk)."""
    lo = max(float(np.min(test_time)), float(np.min(train_time)))
    hi = min(float(np.max(test_time)), float(np.max(train_time)))
    grid = np.unique(np.quantile(test_time, np.linspace(0.1, 0.9, n)))
    return grid[(grid >= lo) & (grid < hi)]


def _nan_on_failure(func):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(func())
        return value if math.isfinite(value) else float("nan")
    except (ValueError, ZeroDivisionError, IndexError):
        # e.g. no event in the evaluated fold, or a censoring weight of zero: undefined, reported as NaN
        return float("nan")


def evaluate(
    time: Sequence[float],
    event: Sequence[int | bool],
    risk: Sequence[float],
    train_time: Sequence[float],
    train_event: Sequence[int | bool],
    survival: np.ndarray | None = None,
    bin_edges: Sequence[float] | None = None,
) -> dict[str, float]:
    """All metrics of one evaluated fold.

    Parameters
    ----------
    time, event, risk : array-like, shape (n,)
        Evaluated (reported) fold; ``risk`` higher = shorter survival.
    train_time, train_event : array-like, shape (n_train,)
        Training fold, used only to fit the censoring distribution (IPCW).
    survival : ndarray, shape (n, K), optional
        Discrete survival of each evaluated sample; without it (Cox heads) ``ibs`` is NaN.
    bin_edges : array-like, shape (K + 1,), optional
        Bin edges of ``survival``.

    Returns
    -------
    dict
        ``c_index`` (Harrell), ``c_index_uno`` (truncated at the top of the time grid), ``ibs`` (lower is
        better) and ``mean_auc`` (cumulative/dynamic AUC averaged over the grid). An undefined metric is NaN.
    """
    t, e, r = _as_arrays(time, event, risk)
    tt, te = _as_arrays(train_time, train_event)
    y_train = Surv.from_arrays(te, tt)
    y_test = Surv.from_arrays(e, t)
    grid = evaluation_times(tt, t)
    out = {"c_index": _nan_on_failure(lambda: c_index(t, e, r))}
    tau = float(grid[-1]) if grid.size else None
    out["c_index_uno"] = _nan_on_failure(lambda: concordance_index_ipcw(y_train, y_test, r, tau=tau, tied_tol=TIED_TOL)[0])
    if survival is not None and bin_edges is not None and grid.size >= 2:
        s_grid = discrete_survival_function(np.asarray(survival), bin_edges, grid)
        out["ibs"] = _nan_on_failure(lambda: integrated_brier_score(y_train, y_test, s_grid, grid))
    else:
        out["ibs"] = float("nan")
    if grid.size >= 1:
        out["mean_auc"] = _nan_on_failure(lambda: cumulative_dynamic_auc(y_train, y_test, r, grid, tied_tol=TIED_TOL)[1])
    else:
        out["mean_auc"] = float("nan")
    return out


def aggregate(values: Sequence[float]) -> tuple[float, float]:
    """Mean and **population** standard deviation (ddof 0) over folds, as MCAT's ``cindex.csv``.

    NaN entries are ignored; an empty input gives ``(nan, nan)``.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=0))
