"""Records -> statistics: paired comparisons, the tables' significance hook, ranks over cohorts, CD diagrams.

The procedures themselves are pure functions in :mod:`benchmark.analysis.significance` (each citing its source);
this module reads fold records into them:

- :func:`column_data`: one table column (cohort) as per-(repeat, fold) values of each row, seeds averaged, with
  the stored out-of-fold risks for the bootstrap tests (slide-level cells resample whole patients);
- :class:`SignificanceOptions`: the declared family (all pairs, or every row vs a reference), Holm-adjusted, as
  the tables' significance hook; :func:`calibration_rate`: its family-wise marking rate over real stores,
  :func:`null_means` the methods' mean values there;
  :func:`design_mde`: the minimum detectable difference of a design from its observed fold variance;
- **over cohorts**: mean ranks, the Friedman / Iman-Davenport test and the Nemenyi critical difference with its
  diagram (Demšar 2006, JMLR 7:1-30), drawn only when the test rejects;

Harrell's C-index follows ``sksurv.metrics.concordance_index_censored`` exactly (risk ties within ``1e-8``
count one half; an event is comparable to later times and to censored samples at its own time). The bootstraps
evaluate it on weighted pair matrices, which equals recomputing it on the resample with duplicated rows.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from benchmark.analysis.significance import (
    ColumnData,
    ColumnSignificance,
    FoldSample,
    FriedmanResult,
    BOOTSTRAP_MIN_EVENTS,
    STAT_TESTS,
    MarkingRate,
    column_significance,
    marks_from_adjusted,
    comparable_pairs,
    concordance_scores,
    MDE,
    check_test,
    corrected_t_mde,
    friedman_test,
    marking_rate,
    nemenyi_critical_difference,
    nemenyi_q,  # noqa: F401  re-exported: callers ask this module for the Nemenyi q
)
from benchmark.store.query import Results, fold_order, group_cells, recorded_n_folds

#: Marker the tables put next to a row the declared family of tests marks (with an arrow for the direction).
SIGNIFICANCE_MARKER = "‡"


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


def record_c_index(record: Mapping) -> float:
    """A fold record's reported C-index (``metrics.c_index``), recomputed from its predictions if absent."""
    value = (record.get("metrics") or {}).get("c_index")
    if value is not None:
        return float(value)
    df = pd.DataFrame(record["predictions"])
    return harrell_c_index(df["time"].to_numpy(float), df["event"].to_numpy(int), df["risk"].to_numpy(float))


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
# Records -> one table column of the significance layer
# --------------------------------------------------------------------------------------------------
def fold_metric(records: Sequence[Mapping], metric: str = "c_index") -> float:
    """A validation fold's metric averaged over the seeds (records) of that fold; NaN when none has it."""
    if metric == "c_index":
        values = [record_c_index(r) for r in records]
    else:
        values = [(r.get("metrics") or {}).get(metric) for r in records]
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _units(records: Sequence[Mapping]) -> dict[tuple[int, int], list[Mapping]]:
    """``(repeat, fold) -> records`` (one per seed)."""
    out: dict[tuple[int, int], list[Mapping]] = defaultdict(list)
    for r in records:
        out[fold_order(r)].append(r)
    return out


def folds_per_repeat(records: Iterable[Mapping]) -> int:
    """``K``: the cohort's fold count recorded by the runner, else the folds seen."""
    records = list(records)
    return max([int(r["n_folds"]) for r in records if r.get("n_folds")] or [len({int(r["fold"]) for r in records})])


def _seed_predictions(records: Sequence[Mapping]) -> list[pd.DataFrame]:
    """One prediction frame per seed (record) of one fold, indexed by ``sample_id``, in seed order."""
    frames = []
    for r in sorted(records, key=lambda r: int(r.get("seed") or 0)):
        frame = pooled_predictions([r])
        frames.append(frame)
    return frames


def _fold_sample(unit_records: Mapping[str, Sequence[Mapping]], patient_codes: dict[str, int]
                 ) -> tuple[FoldSample, dict[str, np.ndarray]]:
    """The common validation samples of one fold, and each row's risks on them, shape (seeds, n).

    ``patient_codes`` maps a patient id to its code for the whole column (extended here), so a patient keeps
    one code in every repeat: a bootstrap draws each patient once for all repeats.
    """
    per_seed = {row: _seed_predictions(recs) for row, recs in unit_records.items()}
    common = sorted(set.intersection(*(set(f.index) for frames in per_seed.values() for f in frames)))
    first = next(iter(per_seed.values()))[0].loc[common]
    for row, frames in per_seed.items():
        for f in frames:
            if not (np.allclose(f.loc[common, "time"], first["time"]) and (f.loc[common, "event"] == first["event"]).all()):
                raise ValueError(f"row {row!r} disagrees on survival times/events of the same samples; different data?")
    patients = np.array([patient_codes.setdefault(p, len(patient_codes)) for p in first["patient_id"]])
    fold = FoldSample(first["time"].to_numpy(float), first["event"].to_numpy(int), patients)
    risks = {row: np.stack([f.loc[common, "risk"].to_numpy(float) for f in frames]) for row, frames in per_seed.items()}
    return fold, risks


def _fold_events(records: Sequence[Mapping]) -> int | None:
    """Events among a fold's validation samples (from its stored predictions; None without them)."""
    preds = (records[0].get("predictions") or []) if records else []
    return sum(1 for p in preds if int(p.get("event") or 0)) if preds else None


def column_data(rows: Mapping[str, Sequence[Mapping]], metric: str = "c_index",
                predictions: bool = True) -> ColumnData:
    """One table column (cohort) as :class:`ColumnData`: each row's per-(repeat, fold) metric, seeds averaged.

    Only the validation folds every row finished are used. With ``predictions`` and the Harrell C-index, the
    stored out-of-fold risks of every seed come along for the bootstrap tests (other metrics: the corrected t
    only). The events of each validation fold are read off the predictions either way.
    """
    units = {row: _units([r for r in recs if r.get("status", "ok") == "ok"]) for row, recs in rows.items()}
    units = {row: u for row, u in units.items() if u}
    if len(units) < 2:
        raise ValueError(f"a column needs at least 2 rows with results; got {sorted(units)}")
    values = {row: {key: fold_metric(recs, metric) for key, recs in u.items()} for row, u in units.items()}
    shared = sorted(set.intersection(*(set(k for k, v in vals.items() if math.isfinite(v)) for vals in values.values())))
    if len(shared) < 2:
        raise ValueError(f"fewer than 2 validation folds with a finite {metric} are shared by every row")
    fold_values = {row: np.array([values[row][key] for key in shared]) for row in units}
    all_records = [r for u in units.values() for recs in u.values() for r in recs]
    first = next(iter(units.values()))
    events = [_fold_events(first[key]) for key in shared]
    common = dict(n_folds=folds_per_repeat(all_records), repeats=len({key[0] for key in shared}),
                  fold_events=None if None in events else tuple(events),
                  seeds=max(len(u[key]) for u in units.values() for key in shared))
    if not (predictions and metric == "c_index"):
        return ColumnData(fold_values, **common)
    folds, risks, codes = [], {row: [] for row in units}, {}
    for key in shared:
        fold, fold_risks = _fold_sample({row: units[row][key] for row in units}, codes)
        folds.append(fold)
        for row in units:
            risks[row].append(fold_risks[row])
    return ColumnData(fold_values, folds=tuple(folds), risks=risks, **common)


@dataclass(frozen=True)
class SignificanceOptions:
    """The declared test of a table or comparison: family, reference, alpha, test, bootstrap settings."""

    family: str = "all-pairs"
    reference: str | None = None
    alpha: float = 0.05
    test: str = "auto"
    n_boot: int = 1000
    seed: int = 0
    metric: str = "c_index"
    higher_is_better: bool = True

    def __post_init__(self):
        if self.family == "reference" and not self.reference:
            raise ValueError("the reference family needs --reference NAME")
        check_test(self.test, self.metric)

    def __call__(self, rows: Mapping[str, Sequence[Mapping]]) -> ColumnSignificance | None:
        """Test one column (``row -> its fold records``); None when fewer than 2 rows, or the reference is absent."""
        rows = {row: recs for row, recs in rows.items() if recs}
        if len(rows) < 2 or (self.family == "reference" and self.reference not in rows):
            return None
        data = column_data(rows, self.metric, predictions=self.test not in ("auto", "corrected-t"))
        return column_significance(data, family=self.family, reference=self.reference, alpha=self.alpha,
                                   test=self.test, n_boot=self.n_boot, seed=self.seed,
                                   higher_is_better=self.higher_is_better)


def store_columns(results: Iterable[Results], methods: Sequence[str] | None = None) -> list[dict[str, list]]:
    """Every column (cohort x backbone x recipe x selection of one store) with at least two rows (methods)."""
    columns = []
    for store in results:
        by_column: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for r in store.select(method=methods):
            by_column[(r["cohort"], r["backbone"], r["recipe"], r["selection"])][r["method"]].append(r)
        columns += [rows for rows in by_column.values() if len(rows) >= 2]
    return columns


def calibration_rate(results: Iterable[Results], options: SignificanceOptions, methods: Sequence[str] | None = None
                     ) -> MarkingRate:
    """Family-wise marking rate of ``options`` over every column of real stores (e.g. ``--signal none`` data).

    A column is one cohort x backbone x recipe x selection of one store, its rows the methods. When no method
    carries signal, the fraction of columns with any mark estimates the family-wise error rate; it should be
    ``<= alpha`` within its Monte-Carlo error (:meth:`MarkingRate.within`).
    """
    columns = store_columns(results, methods)

    def marks_anything(rows, index) -> bool:
        result = options(rows)
        return bool(result is not None and result.marks)

    return marking_rate(columns, marks_anything)


def _column_outcomes(data: ColumnData, reference: str, tests: Sequence[str], alpha: float, n_boot: int,
                     seed: int) -> list[dict]:
    """Whether each family x test marks this column, shown and as it would without withholding."""
    out = []
    for family in ("reference", "all-pairs"):
        for test in tests:
            result = column_significance(data, family=family, reference=reference, alpha=alpha, test=test,
                                         n_boot=n_boot, seed=seed)
            raw = marks_from_adjusted(family, result.differences, result.adjusted_p, alpha)
            out.append({"family": family, "test": result.test, "marked": bool(result.marks),
                        "marked_unwithheld": bool(raw), "lost": result.lost})
    return out


def calibration_rates(results: Iterable[Results], *, methods: Sequence[str] | None = None,
                      reference: str | None = None, tests: Sequence[str] | None = None, alpha: float = 0.05,
                      n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Family-wise marking rate of every test and family over the columns of null stores, by events per fold.

    Every column (cohort x backbone x recipe x selection of one store) whose rows are equally good training
    procedures (``make calibration``: one procedure under several names, or ``--signal none`` data) is tested in
    both families (every row vs ``reference``, default the first row by name; all pairs) by each test. The rate
    of columns with any mark estimates the family-wise error rate. Columns are split by the fewest events in a
    validation fold (below / at least :data:`~benchmark.analysis.significance.BOOTSTRAP_MIN_EVENTS`);
    ``unwithheld`` is the rate the marks would have without the events threshold.

    Returns
    -------
    DataFrame with columns family, test, events, columns, marked, rate, se, unwithheld, within.
    """
    tests = list(tests or STAT_TESTS)
    rows = []
    for index, column in enumerate(store_columns(results, methods)):
        data = column_data(column, predictions=True)
        ref = reference if reference in data.methods else sorted(data.methods)[0]
        usable = [t for t in tests if STAT_TESTS[t].check(data) is None]
        few = data.min_events is not None and data.min_events < BOOTSTRAP_MIN_EVENTS
        for outcome in _column_outcomes(data, ref, usable, alpha, n_boot, seed + index):
            rows.append({**outcome, "events": f"< {BOOTSTRAP_MIN_EVENTS}" if few else f">= {BOOTSTRAP_MIN_EVENTS}"})
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    both = frame.assign(events="all")
    out = []
    for (family, test, events), group in pd.concat([frame, both]).groupby(["family", "test", "events"], sort=False):
        rate = MarkingRate(int(group["marked"].sum()), len(group))
        out.append({"family": family, "test": test, "events per fold": events, "columns": rate.columns,
                    "marked": rate.marked, "rate": rate.rate, "se": rate.standard_error,
                    "unwithheld": float(group["marked_unwithheld"].mean()), "lost resamples": int(group["lost"].sum()),
                    "within": rate.within(alpha)})
    return pd.DataFrame(out)


def null_means(results: Iterable[Results], methods: Sequence[str] | None = None, metric: str = "c_index"
               ) -> pd.DataFrame:
    """Each method's table value (mean over folds) averaged over the columns of ``--signal none`` stores.

    With no signal every method's expected C-index is 0.5 whatever it learned: validation outcomes are
    independent of the features and of the training fold. A mean far from 0.5 (in units of ``se``, the standard
    error over columns) says the data or the pipeline leaks; the methods of one column share its folds, so their
    deviations are correlated.

    Returns
    -------
    DataFrame indexed by method with columns ``mean``, ``se`` (SD over columns / sqrt(n)) and ``columns``.
    """
    per_method: dict[str, list[float]] = defaultdict(list)
    for rows in store_columns(results, methods):
        for method, values in column_data(rows, metric, predictions=False).fold_values.items():
            per_method[method].append(float(np.mean(values)))
    frame = pd.DataFrame({"mean": {m: np.mean(v) for m, v in per_method.items()},
                          "se": {m: np.std(v, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
                                 for m, v in per_method.items()},
                          "columns": {m: len(v) for m, v in per_method.items()}})
    return frame.sort_index()


def design_mde(data: ColumnData, alpha: float = 0.05, power: float = 0.8, n_comparisons: int | None = None) -> MDE:
    """Minimum detectable difference of the corrected t on a column's design, from its observed fold variance.

    ``s_d`` is pooled over every pair of rows (the root mean of the pairs' per-fold-difference variances), so the
    number describes the design (J folds, K per repeat), not one lucky pair; pairs with identical fold values
    (the same model twice) are left out. ``n_comparisons``: the family's m (default all pairs), whose Holm
    first step tests at ``alpha / m``. The range states the uncertainty of ``s_d`` from few folds.
    """
    methods = data.methods
    m = n_comparisons or len(methods) * (len(methods) - 1) // 2
    variances = [np.var(np.subtract(data.fold_values[a], data.fold_values[b]), ddof=1)
                 for i, a in enumerate(methods) for b in methods[i + 1:]]
    variances = [v for v in variances if v > 0] or [0.0]
    return corrected_t_mde(float(np.sqrt(np.mean(variances))), data.n_units, data.n_folds, alpha, power, m)


# --------------------------------------------------------------------------------------------------
# Ranks over cohorts: Friedman + Nemenyi critical difference
# --------------------------------------------------------------------------------------------------
def mean_ranks(scores: pd.DataFrame) -> pd.Series:
    """Mean rank of each method (column) over datasets (rows); rank 1 = highest score, ties averaged."""
    if scores.isna().any().any():
        raise ValueError("mean ranks need every method scored on every dataset (found missing cells)")
    ranks = scores.rank(axis=1, ascending=False, method="average")
    return ranks.mean(axis=0).sort_values()


@dataclass
class RankSummary:
    """Mean ranks over data sets (cohorts) with the Friedman / Iman-Davenport test and the Nemenyi CD.

    Attributes
    ----------
    friedman : FriedmanResult or None
        None with fewer than 2 data sets.
    significant : bool
        Iman-Davenport rejects "all methods equivalent" at ``alpha`` (Demšar 2006: only then are post-hoc
        differences, and a ranking, meaningful).
    """

    scores: pd.DataFrame
    ranks: pd.Series
    critical_difference: float
    alpha: float
    friedman: FriedmanResult | None

    @property
    def friedman_statistic(self) -> float | None:
        return None if self.friedman is None else self.friedman.chi2

    @property
    def friedman_p_value(self) -> float | None:
        return None if self.friedman is None else self.friedman.chi2_p_value

    @property
    def significant(self) -> bool:
        return self.friedman is not None and self.friedman.significant(self.alpha)

    def describe(self) -> str:
        """One line: the test, its result, the CD, and what it allows to say."""
        n, k = self.scores.shape
        if self.friedman is None:
            return f"{k} methods on {n} data set: no Friedman test (needs >= 2 data sets); no ranking claimed."
        f = self.friedman
        verdict = ("significant: methods whose mean ranks differ by more than the CD differ" if self.significant
                   else "not significant: no method is shown to differ, the mean ranks are not a ranking")
        return (f"Iman-Davenport F = {f.f:.2f} (df {f.df1}, {f.df2}), p = {f.f_p_value:.3g} (Friedman chi2 = "
                f"{f.chi2:.2f}, p = {f.chi2_p_value:.3g}); {k} methods, N = {n} data sets; Nemenyi CD = "
                f"{self.critical_difference:.2f} at alpha {self.alpha:g}; {verdict}.")

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
    """Mean ranks, the Friedman test with the Iman-Davenport F (Demšar 2006, JMLR 7:1-30, sec. 3.2.2) and the
    Nemenyi critical difference.

    Parameters
    ----------
    scores : DataFrame
        Rows = data sets, columns = methods, values = mean fold C-index. Data sets must be independent
        problems: cohorts, with backbones averaged first or one summary per backbone (:func:`score_table`);
        cohort x backbone rows share patients and would shrink the CD.
    """
    ranks = mean_ranks(scores)
    friedman = None
    if scores.shape[0] >= 2 and scores.shape[1] >= 2:
        friedman = friedman_test(scores.to_numpy())
    cd = nemenyi_critical_difference(scores.shape[1], scores.shape[0], alpha)
    return RankSummary(scores, ranks, cd, alpha, friedman)


def _not_significant_figure(summary: RankSummary, title: str | None):
    """A figure that states the result instead of drawing a ranking the test does not support."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 1.6 + 0.18 * len(summary.ranks)))
    ax.axis("off")
    f = summary.friedman
    test = ("no Friedman test (one data set)" if f is None else
            f"Iman-Davenport p = {f.f_p_value:.3g} > alpha {summary.alpha:g}")
    ax.text(0.5, 0.95, f"not significant: {test}", ha="center", va="top", fontsize=12, weight="bold")
    listing = ", ".join(f"{name} {rank:.2f}" for name, rank in summary.ranks.items())
    ax.text(0.5, 0.55, f"mean ranks (not a ranking): {listing}", ha="center", va="top", fontsize=8, wrap=True,
            color="0.35")
    ax.set_title(title or "", fontsize=10)
    return fig


def critical_difference_diagram(summary: RankSummary, path: str | Path, title: str | None = None) -> Path:
    """Draw a Demšar critical-difference diagram to ``path`` (PNG; PDF too if the suffix says so).

    Methods sit on a rank axis (1 = best, left); a bar joins methods whose mean ranks differ by less than
    the Nemenyi critical difference (not significantly different); the CD is drawn above the axis. When the
    Iman-Davenport test does not reject (or cannot run), the figure says "not significant" and draws no ranking.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not summary.significant:
        fig = _not_significant_figure(summary, title)
        fig.savefig(path, dpi=150, bbox_inches="tight")
        plt.close(fig)
        return path

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
    subtitle = (f"Nemenyi alpha={summary.alpha:g}, N={summary.scores.shape[0]} cohorts; "
                f"Iman-Davenport p={summary.friedman.f_p_value:.3g}")
    ax.set_title((title + "\n" if title else "") + subtitle, fontsize=10)
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
    """Mean fold C-index per data set (rows: cohorts) and method (columns), for ranks over cohorts.

    Data sets are cohorts (Demšar 2006 needs independent data sets; the backbones of one cohort share its
    patients): with several backbones each method's cohort score is the mean over the backbones on which every
    ranked method has a complete cell (pass ``backbone`` for one summary per backbone). Only cells with every
    validation fold (repeat x fold) count: a mean over 1 of 5 folds is not comparable with a mean over 5.
    Methods with no complete cell are dropped, and so are cohorts where some remaining method has none.
    """
    records = results.select(
        method=methods, cohort=cohorts, backbone=backbone, recipe=recipe, selection=selection, seed=seed
    )
    groups = group_cells(records)
    protocols = {(k[3], k[4]) for k in groups}
    if len(protocols) > 1:
        raise ValueError(
            f"{results}: cells of several recipes/selection rules {sorted(protocols)}; "
            "choose one with --recipe and --selection (numbers of different protocols are not comparable)"
        )
    folds_done = {key: len({fold_order(r) for r in recs}) for key, recs in groups.items()}
    expected: dict[tuple, int] = defaultdict(int)  # (cohort, backbone) -> validation folds a complete cell has
    for key, recs in groups.items():
        expected[key[1:3]] = max(expected[key[1:3]], folds_done[key], recorded_n_folds(recs))
    table: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for key, recs in groups.items():
        complete = folds_done[key] >= expected[key[1:3]]  # an incomplete cell is never ranked
        table[key[1:3]][key[0]].append(float(np.mean([record_c_index(r) for r in recs])) if complete else math.nan)
    # several seeds of one method and data set are replicates: their means are averaged
    frame = pd.DataFrame({row: {m: float(np.mean(v)) for m, v in cols.items()} for row, cols in table.items()}).T
    frame = frame.reindex(columns=[m.lower() for m in methods])
    frame = frame.dropna(axis=1, how="all").dropna(axis=0, how="any")
    if frame.empty:
        return pd.DataFrame(columns=frame.columns)
    by_cohort = frame.groupby(level=0).mean()  # backbones averaged within each cohort
    by_cohort.index.name = None
    return by_cohort.sort_index()
