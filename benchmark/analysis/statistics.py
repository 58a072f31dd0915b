"""Paired comparisons of methods evaluated on identical folds.

Every method of a grid sees the same patients in the same folds, so two methods are compared *paired*:

- **per fold**: the difference of the fold C-indices (the numbers the tables average);
- **paired bootstrap over patients** of the pooled out-of-fold risks: resample patients with replacement
  (all samples of a drawn patient come along, so slide-level cells resample whole patients), recompute
  Harrell's C-index of *both* methods on the same resample, and read a percentile confidence interval and a
  two-sided p-value off the bootstrap distribution of the difference;
- **over cohorts**: mean ranks (1 = best), the Friedman test (scipy) and the Nemenyi critical difference
  with its diagram (Demšar 2006, JMLR 7:1-30).

Harrell's C-index follows ``sksurv.metrics.concordance_index_censored`` exactly (risk ties within ``1e-8``
count one half; an event is comparable to later times and to censored samples at its own time). The bootstrap
evaluates it on weighted pair matrices, which equals recomputing it on the resample with duplicated rows.

Records are read through :class:`benchmark.store.records.ResultStore` (layout of ``docs/ARCHITECTURE.md``,
(``<results>/cells/<method>/<cohort>/<backbone>/<recipe>-<selection>-s<seed>/fold<k>.json``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from benchmark.store.query import Results, group_cells, recorded_n_folds

#: Marker the tables put next to a row that is significantly worse than the best row of its column.
SIGNIFICANCE_MARKER = "‡"

TIED_TOL = 1e-8


def pooled_predictions(records: Sequence[Mapping]) -> pd.DataFrame:
    """Out-of-fold predictions of one cell, pooled over folds (a sample's risks averaged over seeds).

    Returns
    -------
    DataFrame indexed by ``sample_id`` with columns ``patient_id, time, event, risk, fold``.
    """
    frames = []
    for r in records:
        preds = r.get("predictions") or []
        if not preds:
            raise ValueError(f"{r.get('_path', 'record')}: no predictions stored (fold {r.get('fold')})")
        df = pd.DataFrame(preds)
        missing = {"sample_id", "patient_id", "time", "event", "risk"} - set(df.columns)
        if missing:
            raise ValueError(f"{r.get('_path', 'record')}: predictions lack {sorted(missing)}")
        df["fold"] = int(r["fold"])
        frames.append(df)
    pooled = pd.concat(frames, ignore_index=True)
    pooled["sample_id"] = pooled["sample_id"].astype(str)
    folds_per_sample = pooled.groupby("sample_id")["fold"].nunique()
    if (folds_per_sample > 1).any():
        sample = folds_per_sample[folds_per_sample > 1].index[0]
        raise ValueError(f"sample {sample!r} is predicted in more than one fold; folds must be disjoint")
    if pooled["sample_id"].duplicated().any():  # several seeds of one cell: average each sample's risk
        pooled = pooled.groupby("sample_id", as_index=False, sort=False).agg(
            patient_id=("patient_id", "first"), time=("time", "first"), event=("event", "first"),
            risk=("risk", "mean"), fold=("fold", "first"))
    pooled["patient_id"] = pooled["patient_id"].astype(str)
    pooled["event"] = pooled["event"].astype(int)
    pooled["time"] = pooled["time"].astype(float)
    pooled["risk"] = pooled["risk"].astype(float)
    return pooled.set_index("sample_id")


def fold_c_index(record: Mapping) -> float:
    """The fold's reported C-index (``metrics.c_index``), recomputed from predictions if absent."""
    value = (record.get("metrics") or {}).get("c_index")
    if value is not None:
        return float(value)
    df = pd.DataFrame(record["predictions"])
    return harrell_c_index(df["time"].to_numpy(float), df["event"].to_numpy(int), df["risk"].to_numpy(float))


# --------------------------------------------------------------------------------------------------
# Harrell's C-index on pair matrices
# --------------------------------------------------------------------------------------------------
def comparable_pairs(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Comparable-pair matrix of Harrell's C-index, as sksurv defines it.

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


def harrell_c_index(time, event, risk, weights: np.ndarray | None = None) -> float:
    """Harrell's C-index (higher risk = shorter survival), optionally with per-sample multiplicities.

    ``weights[i]`` = how often sample ``i`` occurs (a bootstrap resample); pairs weigh ``w_i * w_j``.
    """
    comp = comparable_pairs(time, event)
    conc = concordance_scores(risk) * comp
    w = np.ones(len(comp)) if weights is None else np.asarray(weights, float)
    denominator = w @ comp @ w
    if denominator == 0:
        return float("nan")
    return float((w @ conc @ w) / denominator)


# --------------------------------------------------------------------------------------------------
# Paired bootstrap
# --------------------------------------------------------------------------------------------------
@dataclass
class BootstrapResult:
    """Paired bootstrap of ``C(a) - C(b)`` over patients.

    Attributes
    ----------
    c_index_a, c_index_b : float
        Pooled out-of-fold C-index of each method on the common samples.
    difference : float
        ``c_index_a - c_index_b`` (observed).
    ci_low, ci_high : float
        Percentile confidence interval of the difference at level ``confidence``.
    p_value : float
        Two-sided bootstrap p-value, ``min(1, 2 * min(#(d* <= 0) + 1, #(d* >= 0) + 1) / (n_boot + 1))``.
    n_boot, seed, confidence : bootstrap settings
    n_patients, n_samples : int
        Patients resampled and samples they carry.
    differences : ndarray, shape (n_boot,)
        The bootstrap distribution (resamples without a comparable pair are dropped).
    """

    c_index_a: float
    c_index_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    n_boot: int
    seed: int
    confidence: float
    n_patients: int
    n_samples: int
    differences: np.ndarray = field(repr=False)

    def significant(self, alpha: float = 0.05) -> bool:
        return bool(self.p_value < alpha)


def paired_bootstrap(
    pred_a: pd.DataFrame,
    pred_b: pd.DataFrame,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    chunk: int = 100,
) -> BootstrapResult:
    """Paired bootstrap over patients of the pooled out-of-fold risks of two methods.

    Parameters
    ----------
    pred_a, pred_b : DataFrame
        :func:`pooled_predictions` of the two cells (indexed by ``sample_id``); only common samples are used.
    n_boot : int
        Bootstrap resamples.
    seed : int
        Seed of the resampling (``numpy.random.default_rng``); equal seeds give identical results.
    confidence : float
        Level of the percentile interval.
    """
    common = pred_a.index.intersection(pred_b.index)
    if len(common) < 2:
        raise ValueError("the two cells share fewer than 2 samples; were they run on the same cohort and folds?")
    a = pred_a.loc[common]
    b = pred_b.loc[common]
    if not (np.allclose(a["time"].to_numpy(), b["time"].to_numpy()) and (a["event"].to_numpy() == b["event"].to_numpy()).all()):
        raise ValueError("the two cells disagree on survival times/events of the same samples; different data?")
    time, event = a["time"].to_numpy(float), a["event"].to_numpy(int)
    comp = comparable_pairs(time, event)
    conc_a = concordance_scores(a["risk"].to_numpy(float)) * comp
    conc_b = concordance_scores(b["risk"].to_numpy(float)) * comp
    # Each sample's multiplicity in a resample = how often its patient was drawn.
    patient_codes, patients = pd.factorize(a["patient_id"])
    n_patients = len(patients)

    def c_of(weights: np.ndarray, conc: np.ndarray) -> np.ndarray:  # weights (B, N)
        den = np.einsum("bi,ij,bj->b", weights, comp, weights)
        num = np.einsum("bi,ij,bj->b", weights, conc, weights)
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / den

    ones = np.ones((1, len(common)))
    c_a, c_b = float(c_of(ones, conc_a)[0]), float(c_of(ones, conc_b)[0])
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        draws = rng.integers(0, n_patients, size=(size, n_patients))
        counts = np.stack([np.bincount(d, minlength=n_patients) for d in draws]).astype(float)
        weights = counts[:, patient_codes]
        diffs.append(c_of(weights, conc_a) - c_of(weights, conc_b))
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    alpha = 1.0 - confidence
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    n = len(d)
    p = min(1.0, 2.0 * min((np.sum(d <= 0) + 1) / (n + 1), (np.sum(d >= 0) + 1) / (n + 1)))
    return BootstrapResult(
        c_index_a=c_a, c_index_b=c_b, difference=c_a - c_b, ci_low=float(lo), ci_high=float(hi), p_value=float(p),
        n_boot=n_boot, seed=seed, confidence=confidence, n_patients=n_patients, n_samples=len(common), differences=d,
    )


@dataclass
class PairedComparison:
    """Method/row ``a`` vs ``b`` on one cohort: per-fold differences and the paired bootstrap."""

    label_a: str
    label_b: str
    cohort: str
    folds: list[int]
    fold_c_a: list[float]
    fold_c_b: list[float]
    bootstrap: BootstrapResult

    @property
    def fold_differences(self) -> list[float]:
        return [x - y for x, y in zip(self.fold_c_a, self.fold_c_b)]

    @property
    def mean_difference(self) -> float:
        return float(np.mean(self.fold_differences)) if self.folds else float("nan")

    def as_dict(self) -> dict:
        bs = self.bootstrap
        return {
            "a": self.label_a, "b": self.label_b, "cohort": self.cohort, "folds": self.folds,
            "fold_c_index_a": self.fold_c_a, "fold_c_index_b": self.fold_c_b,
            "fold_differences": self.fold_differences, "mean_fold_difference": self.mean_difference,
            "pooled_c_index_a": bs.c_index_a, "pooled_c_index_b": bs.c_index_b,
            "pooled_difference": bs.difference, "ci_low": bs.ci_low, "ci_high": bs.ci_high,
            "confidence": bs.confidence, "p_value": bs.p_value, "n_boot": bs.n_boot, "seed": bs.seed,
            "n_patients": bs.n_patients, "n_samples": bs.n_samples,
        }


def compare_cells(
    records_a: Sequence[Mapping],
    records_b: Sequence[Mapping],
    *,
    label_a: str | None = None,
    label_b: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedComparison:
    """Compare two cells of one cohort (fold records of each): per-fold differences + paired bootstrap."""
    if not records_a or not records_b:
        raise ValueError("compare_cells needs at least one record per cell")
    by_fold_a = {int(r["fold"]): r for r in records_a}
    by_fold_b = {int(r["fold"]): r for r in records_b}
    folds = sorted(set(by_fold_a) & set(by_fold_b))
    boot = paired_bootstrap(
        pooled_predictions(records_a), pooled_predictions(records_b), n_boot=n_boot, seed=seed, confidence=confidence
    )
    return PairedComparison(
        label_a=label_a or str(records_a[0].get("method")),
        label_b=label_b or str(records_b[0].get("method")),
        cohort=str(records_a[0].get("cohort")),
        folds=folds,
        fold_c_a=[fold_c_index(by_fold_a[k]) for k in folds],
        fold_c_b=[fold_c_index(by_fold_b[k]) for k in folds],
        bootstrap=boot,
    )


def significance_vs_best(
    rows: Mapping[str, Sequence[Mapping]],
    *,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, PairedComparison | None]:
    """Paired comparison of every row of one table column against the column's best row.

    The hook the table renderer calls to mark significant differences: for one cohort (a column),
    ``rows`` maps each row label (a method in Table 1, a backbone in Table 2) to that cell's fold records.
    The best row is the one with the highest mean fold C-index. Every other row is compared with it by
    :func:`compare_cells` (paired bootstrap over patients, seeded).

    Returns
    -------
    dict
        Row label -> :class:`PairedComparison` (``a`` = best row, ``b`` = this row), ``None`` for the best row
        itself. Mark a row with :data:`SIGNIFICANCE_MARKER` when ``result.bootstrap.p_value < alpha``
        (see :func:`significant_rows`).
    """
    usable = {label: recs for label, recs in rows.items() if recs}
    if not usable:
        return {}
    means = {label: float(np.mean([fold_c_index(r) for r in recs])) for label, recs in usable.items()}
    best = max(means, key=lambda k: means[k])
    out: dict[str, PairedComparison | None] = {best: None}
    for label, recs in usable.items():
        if label != best:
            out[label] = compare_cells(usable[best], recs, label_a=best, label_b=label, n_boot=n_boot, seed=seed)
    return out


def significant_rows(
    rows: Mapping[str, Sequence[Mapping]], *, alpha: float = 0.05, n_boot: int = 1000, seed: int = 0
) -> set[str]:
    """Labels of the rows significantly worse than the column's best row (p < ``alpha``)."""
    return {
        label
        for label, cmp in significance_vs_best(rows, alpha=alpha, n_boot=n_boot, seed=seed).items()
        if cmp is not None and cmp.bootstrap.p_value < alpha and cmp.bootstrap.difference > 0
    }


def significance_footnote(alpha: float = 0.05, n_boot: int = 1000) -> str:
    """The legend for :data:`SIGNIFICANCE_MARKER`, to print under a table."""
    return (
        f"{SIGNIFICANCE_MARKER} significantly below the best row of its column (paired bootstrap over patients of "
        f"the pooled out-of-fold risks, {n_boot} resamples, two-sided p < {alpha:g})."
    )


# --------------------------------------------------------------------------------------------------
# Ranks over cohorts: Friedman + Nemenyi critical difference
# --------------------------------------------------------------------------------------------------
def mean_ranks(scores: pd.DataFrame) -> pd.Series:
    """Mean rank of each method (column) over datasets (rows); rank 1 = highest score, ties averaged."""
    if scores.isna().any().any():
        raise ValueError("mean ranks need every method scored on every dataset (found missing cells)")
    ranks = scores.rank(axis=1, ascending=False, method="average")
    return ranks.mean(axis=0).sort_values()


def nemenyi_q(n_methods: int, alpha: float = 0.05) -> float:
    """Nemenyi ``q_alpha``: studentized range quantile (infinite df) over ``sqrt(2)`` (k=2: 1.960, k=3: 2.343)."""
    from scipy.stats import studentized_range

    return float(studentized_range.ppf(1 - alpha, n_methods, np.inf) / math.sqrt(2))


def nemenyi_critical_difference(n_methods: int, n_datasets: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference ``q_alpha * sqrt(k (k + 1) / (6 N))`` (Demšar 2006, eq. after Table 5).

    ``q_alpha`` is the studentized range quantile with infinite degrees of freedom divided by ``sqrt(2)``
    (k = 2: 1.960, k = 3: 2.343, k = 10: 3.164).
    """
    if n_methods < 2 or n_datasets < 1:
        raise ValueError("the critical difference needs at least 2 methods and 1 dataset")
    q = nemenyi_q(n_methods, alpha)
    return float(q * math.sqrt(n_methods * (n_methods + 1) / (6.0 * n_datasets)))


@dataclass
class RankSummary:
    """Mean ranks over datasets with the Friedman test and the Nemenyi critical difference."""

    scores: pd.DataFrame
    ranks: pd.Series
    critical_difference: float
    alpha: float
    friedman_statistic: float | None
    friedman_p_value: float | None

    def cliques(self) -> list[tuple[str, ...]]:
        """Maximal groups of methods whose mean ranks differ by less than the critical difference."""
        names = list(self.ranks.index)
        values = self.ranks.to_numpy()
        groups: list[tuple[str, ...]] = []
        for i in range(len(names)):
            j = i
            while j + 1 < len(names) and values[j + 1] - values[i] < self.critical_difference:
                j += 1
            if j > i:
                group = tuple(names[i : j + 1])
                if not any(set(group) <= set(g) for g in groups):
                    groups.append(group)
        return groups


def rank_summary(scores: pd.DataFrame, alpha: float = 0.05) -> RankSummary:
    """Mean ranks, Friedman test (``scipy.stats.friedmanchisquare``; needs >= 3 methods) and Nemenyi CD.

    Parameters
    ----------
    scores : DataFrame
        Rows = datasets (cohorts, or cohort x backbone), columns = methods, values = mean fold C-index.
    """
    from scipy.stats import friedmanchisquare

    ranks = mean_ranks(scores)
    stat = p = None
    if scores.shape[1] >= 3 and scores.shape[0] >= 2:
        res = friedmanchisquare(*[scores[c].to_numpy() for c in scores.columns])
        stat, p = float(res.statistic), float(res.pvalue)
    cd = nemenyi_critical_difference(scores.shape[1], scores.shape[0], alpha)
    return RankSummary(scores, ranks, cd, alpha, stat, p)


def critical_difference_diagram(summary: RankSummary, path: str | Path, title: str | None = None) -> Path:
    """Draw a Demšar critical-difference diagram to ``path`` (PNG; PDF too if the suffix says so).

    Methods sit on a rank axis (1 = best, left); a bar joins methods whose mean ranks differ by less than
    the Nemenyi critical difference (not significantly different); the CD is drawn above the axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = summary.ranks
    k = len(ranks)
    cliques = summary.cliques()
    half = (k + 1) // 2
    height = 1.4 + 0.3 * max(half, k - half) + 0.12 * len(cliques)
    fig, ax = plt.subplots(figsize=(7.5, height))
    ax.set_xlim(0.5, k + 0.5)
    lowest = -0.35 - 0.22 * len(cliques) - 0.45 * (max(half, k - half) - 1)
    ax.set_ylim(lowest - 0.3, 1.6)
    ax.axis("off")
    # rank axis
    ax.plot([1, k], [0, 0], color="black", lw=1)
    for r in range(1, k + 1):
        ax.plot([r, r], [0, 0.12], color="black", lw=1)
        ax.text(r, 0.22, str(r), ha="center", va="bottom", fontsize=9)
    # critical difference bar
    cd = summary.critical_difference
    ax.plot([1, min(1 + cd, k + 0.5)], [1.05, 1.05], color="black", lw=2)
    ax.text(1 + cd / 2, 1.15, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    # clique bars just below the axis
    for i, group in enumerate(cliques):
        y = -0.25 - 0.22 * i
        ax.plot([ranks[group[0]] - 0.03, ranks[group[-1]] + 0.03], [y, y], color="black", lw=3, solid_capstyle="round")
    base = -0.35 - 0.22 * len(cliques)
    for i, (name, r) in enumerate(ranks.items()):
        left = i < half
        level = base - 0.45 * (i if left else k - 1 - i)
        x_text = 0.55 if left else k + 0.45
        ax.plot([r, r], [0, level], color="black", lw=0.8)
        ax.plot([r, x_text], [level, level], color="black", lw=0.8)
        ax.text(x_text, level, f"{name} ({r:.2f})", ha="left" if left else "right", va="bottom", fontsize=9)
    subtitle = f"Nemenyi alpha={summary.alpha:g}, N={summary.scores.shape[0]} datasets"
    if summary.friedman_p_value is not None:
        subtitle += f"; Friedman p={summary.friedman_p_value:.3g}"
    ax.set_title((title + "\n" if title else "") + subtitle, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def score_table(
    results: Results,
    methods: Sequence[str],
    *,
    cohorts: Sequence[str] | None = None,
    backbone: str | None = None,
    recipe: str | None = None,
    selection: str | None = None,
    seed: int | None = None,
) -> pd.DataFrame:
    """Mean fold C-index per dataset (rows: ``cohort`` or ``cohort/backbone``) and method (columns).

    Only cells with every fold count: a cell's expected fold count is the cohort's (``n_folds`` in the records),
    or for older records the most folds any cell of that dataset has. A mean over 1 of 5 folds is not comparable
    with a mean over 5. Methods with no complete cell are then dropped, and so are datasets where some remaining
    method has no complete cell (ranks need complete rows).
    """
    records = results.select(
        method=methods, cohort=cohorts, backbone=backbone, recipe=recipe, selection=selection, seed=seed
    )
    groups = group_cells(records)
    backbones = {k[2] for k in groups}
    protocols = {(k[3], k[4]) for k in groups}
    if len(protocols) > 1:
        raise ValueError(
            f"{results}: cells of several recipes/selection rules {sorted(protocols)}; "
            "choose one with --recipe and --selection (numbers of different protocols are not comparable)"
        )
    def row_of(key: tuple) -> str:
        return key[1] if len(backbones) == 1 else f"{key[1]}/{key[2]}"

    folds_done = {key: len({int(r["fold"]) for r in recs}) for key, recs in groups.items()}
    expected: dict[str, int] = defaultdict(int)  # dataset row -> folds a complete cell has
    for key, recs in groups.items():
        expected[row_of(key)] = max(expected[row_of(key)], folds_done[key], recorded_n_folds(recs))
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for key, recs in groups.items():
        complete = folds_done[key] >= expected[row_of(key)]  # an incomplete cell is never ranked
        table[row_of(key)][key[0]].append(float(np.mean([fold_c_index(r) for r in recs])) if complete else math.nan)
    # several seeds of one method and dataset are replicates: their means are averaged
    frame = pd.DataFrame({row: {m: float(np.mean(v)) for m, v in cols.items()} for row, cols in table.items()}).T
    frame = frame.reindex(columns=[m.lower() for m in methods])
    return frame.dropna(axis=1, how="all").dropna(axis=0, how="any").sort_index()
