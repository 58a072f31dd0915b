"""Discrete-time survival bins.

Two rules, both with left-closed intervals ``[e_k, e_{k+1})`` (a time equal to an inner edge goes to the upper
bin; censored samples get the bin their censoring time falls in):

- ``"train"`` (default): inner edges = quantiles (pandas linear interpolation) of the *uncensored patients of the
  training fold*; outer edges = that fold's min - 1e-6 / max + 1e-6; times outside fall in the first / last bin.
- ``"cohort"``: the legacy MCAT / Patch-GCN rule over the whole table (all folds): patient-level de-duplication,
  ``qcut`` of the uncensored patients' times, outer edges min - 1e-6 / max + 1e-6 over all patients
  (``mahmoodlab/Patch-GCN: datasets/dataset_survival.py``). Reproduces MCAT's ``disc_label`` exactly.
- ``"cohort-slides"``: CrossFusion's variant of ``"cohort"``: no patient de-duplication (one row per slide).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from benchmark.choices import BIN_RULES

EPS = 1e-6
RULES = BIN_RULES


def quantile_edges(times: np.ndarray, events: np.ndarray, n_bins: int = 4, *, source: str = "") -> np.ndarray:
    """Bin edges from the quantiles of the uncensored times, outer edges at min - 1e-6 / max + 1e-6 of all times.

    Parameters
    ----------
    times : (N,) follow-up times (one per patient, or per slide for ``cohort-slides``)
    events : (N,) 1 = event, 0 = censored
    n_bins : number of bins

    Returns
    -------
    ndarray, shape (n_bins + 1,), strictly increasing.

    Raises
    ------
    ValueError
        No uncensored sample, or repeated edges (too few distinct event times); the message starts with
        ``source`` (cohort and fold).
    """
    times = np.asarray(times, dtype=float)
    events = np.asarray(events).astype(bool)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if events.sum() < 1:
        raise ValueError(f"{source}: no uncensored sample to fit {n_bins} time bins on")
    qs = pd.Series(times[events]).quantile(np.linspace(0, 1, n_bins + 1)).to_numpy()
    edges = qs.copy()
    edges[0] = times.min() - EPS
    edges[-1] = times.max() + EPS
    if np.any(np.diff(edges) <= 0):
        # equal edges make empty bins whose NLL terms are meaningless, and the C-index then rests on ties
        distinct = np.unique(times[events]).size
        raise ValueError(
            f"{source}: the {n_bins} time bins have repeated edges {np.round(edges, 4).tolist()} (the "
            f"{int(events.sum())} uncensored times hold {distinct} distinct value(s)); use fewer bins or check the "
            "survival times"
        )
    return edges


def assign_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each time for left-closed intervals; times outside the outer edges clip to the end bins.

    Equal to ``pd.cut(times, edges, right=False, include_lowest=True, labels=False)`` inside the edges.
    """
    inner = np.asarray(edges, dtype=float)[1:-1]
    return np.searchsorted(inner, np.asarray(times, dtype=float), side="right").astype(np.int64)
