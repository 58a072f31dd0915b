"""The paper's tables from the result store.

- Table 1: rows = methods, columns = cohorts (one backbone).
- Table 2: rows = the five backbones, columns = the cohorts + Mean (one method, CrossFusion by default).

Each cell is the mean ± population std (ddof 0) of the per-fold metric; when several seeds were run, the
folds' values are first averaged over seeds. Bold is a tested claim only with a significance hook: the rows not
significantly below the column's best in the all-pairs family (the set tied for best); without one, bold is the
highest mean and the footer says it is untested. A cell without any successful fold is shown as missing (never as zero); a cell with fewer
folds than the table's others is marked ``(k/n)``; ``paper-max`` selection (optimistic: the epoch is chosen
on the reported fold) is marked in the caption, the header and a note. A significance hook may mark cells.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from benchmark.analysis.significance import bounded_interval
from benchmark.analysis.statistics import folds_per_repeat
from benchmark.api.registry import get_method_spec
from benchmark.data.cohorts import DATASETS_DIR
from benchmark.store.query import fold_order, newest_data_records, recorded_n_folds
from benchmark.evaluation.metrics import NO_EVENTS_NOTE, aggregate

#: Higher-is-better per metric.
METRICS = {"c_index": True, "c_index_uno": True, "mean_auc": True, "ibs": False}
METRIC_NAMES = {"c_index": "C-index", "c_index_uno": "Uno's C-index", "mean_auc": "mean time-dependent AUC",
                "ibs": "integrated Brier score"}
TABLE2_BACKBONES = ("resnet50", "conch", "uni2-h", "quiltnet", "prov-gigapath")
MISSING = {"md": "—", "latex": "--", "csv": ""}
PAPER_MAX_MARK = "†"

#: ``significance(rows) -> result``: ``rows`` maps each row label of one column to that cell's ok fold records;
#: the result is a :class:`benchmark.analysis.significance.ColumnSignificance` (``marks`` row -> "worse" /
#: "better", ``footer(marker)``; :class:`benchmark.analysis.statistics.SignificanceOptions` is such a hook), a
#: set of row labels to mark as worse, or None (column not tested).
SignificanceHook = Callable[[Mapping[str, Sequence[dict]]], object]
#: How a row the declared family marks is shown: worse / better than the reference (``reference`` family).
DIRECTION_MARKS = {"worse": "↓", "better": "↑"}
LATEX_MARKS = {"↓": r"$\downarrow$", "↑": r"$\uparrow$"}


@dataclass
class TableCell:
    """One cell: aggregated over folds."""

    values: list[float]  # per validation fold (repeat x fold, seed-averaged), sorted
    n_expected: int
    n_errors: int = 0
    records: list[dict] = field(default_factory=list)
    folds_per_repeat: int = 0  # K of the K-fold split (the CI's Nadeau-Bengio correction needs it)

    def interval(self, confidence: float = 0.95) -> tuple[float, float, bool] | None:
        """Confidence interval of the fold mean (corrected t over the J fold values; None below 2 values),
        clipped to the metric's range [0, 1]: ``(low, high, clipped)``."""
        if len(self.values) < 2 or self.folds_per_repeat < 2:
            return None
        return bounded_interval(self.values, self.folds_per_repeat, confidence)[1:]

    @property
    def mean(self) -> float:
        return aggregate(self.values)[0]

    @property
    def std(self) -> float:
        return aggregate(self.values)[1]

    @property
    def present(self) -> bool:
        return len(self.values) > 0

    @property
    def complete(self) -> bool:
        return len(self.values) >= self.n_expected

    @property
    def mixed_configs(self) -> bool:
        """Folds run under different configurations (recipe fields, method options, data version). The folds of
        a tuned cell each run their own chosen setting under one tuning protocol: that is one configuration."""
        return len({tuning_id(r) or r.get("config_hash") for r in self.records if r.get("config_hash")}) > 1


@dataclass
class ResultTable:
    """A rendered-agnostic table: rows x columns of :class:`TableCell` (None = no record at all)."""

    title: str
    row_header: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], TableCell | None]
    metric: str = "c_index"
    recipe: str = ""
    selection: str = ""
    mean_column: bool = False
    marks: dict[tuple[str, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ci: float | None = None  # show this confidence interval instead of ± std
    #: published (mean, std) per cell, shown beside ours (``--published``, :func:`add_published`)
    published: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    backbone: str = ""  # Table 1's backbone
    #: Column -> rows tied for best by the declared all-pairs test; None = bold is the untested highest mean.
    tested_best: dict[str, set[str]] | None = None

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def value(self, row: str, column: str) -> float | None:
        """Mean of a cell (the Mean column: mean over the cohorts' means, only when every cohort is present)."""
        if column == "Mean":
            vals = [self.value(row, c) for c in self.columns]
            return float(np.mean(vals)) if vals and all(v is not None for v in vals) else None
        cell = self.cells.get((row, column))
        return cell.mean if cell is not None and cell.present else None

    def _complete(self, row: str, column: str) -> bool:
        cols = self.columns if column == "Mean" else [column]
        return all(self.cells.get((row, c)) is not None and self.cells[(row, c)].complete for c in cols)

    def all_columns(self) -> list[str]:
        return self.columns + (["Mean"] if self.mean_column else [])

    def highest(self, column: str, decimals: int = 3) -> set[str]:
        """Rows with the best displayed (rounded) mean of ``column``, untested. Only cells with every fold
        compete (an incomplete cell is marked, never bold)."""
        vals = {r: self.value(r, column) if self._complete(r, column) else None for r in self.rows}
        shown = [round(v, decimals) for v in vals.values() if v is not None]
        if not shown:
            return set()
        best = max(shown) if self.higher_is_better else min(shown)
        return {r for r, v in vals.items() if v is not None and round(v, decimals) == best}

    def bold(self, column: str, decimals: int = 3) -> set[str]:
        """The rows shown bold: the set tied for best by the declared test when one ran (none in a column it did
        not test), else the untested highest mean."""
        if self.tested_best is None:
            return self.highest(column, decimals)
        return self.tested_best.get(column, set())


#: Marks a cell whose folds were run under different configurations (never averaged silently).
MIXED_MARK = " §"
#: Marks a tuned row (``benchmark tune``); the footer states the tuning budget.
TUNED_MARK = "‡"


def tuning_id(record: Mapping) -> str | None:
    """The tuning protocol of a tuned record (``benchmark.tuning.study``), None for an untuned one."""
    return ((record.get("config") or {}).get("tuning") or {}).get("id")


def tuned_or_default(records: list[dict], tuned: bool, row_key: str) -> tuple[list[dict], list[str]]:
    """Keep, for each row (a method in Table 1, a backbone in Table 2), either its tuned or its untuned records,
    never both, so a tuned and an untuned cell of one method are never ranked together.

    ``tuned=False``: the untuned records (a note counts the tuned ones left out). ``tuned=True``: the tuned
    records of every row that has some, the untuned ones of the others; notes state the budget.
    """
    if not tuned:
        kept = [r for r in records if not tuning_id(r)]
        left_out = len(records) - len(kept)
        if records and not kept:
            raise ValueError("these results hold only tuned cells: show them with `table --tuned`")
        return kept, ([f"{left_out} tuned fold record(s) not shown (`table --tuned` shows the tuned rows)."]
                      if left_out else [])
    tuned_rows = {str(r[row_key]) for r in records if tuning_id(r)}
    if not tuned_rows:
        raise ValueError("no tuned records among these results: run `python -m benchmark tune` first")
    kept = [r for r in records if bool(tuning_id(r)) == (str(r[row_key]) in tuned_rows)]
    return kept, _tuning_notes(kept, row_key)


def _tuning_notes(records: list[dict], row_key: str) -> list[str]:
    """The tuning budget of the tuned rows (one line when they share it), and which rows were not tuned."""
    budgets: dict[str, set[str]] = {}
    for r in records:
        if tuning_id(r):
            budget = (r.get("tuning") or {}).get("budget") or "budget not recorded"
            budgets.setdefault(budget, set()).add(str(r[row_key]))
    if len(budgets) == 1:
        notes = [f"{TUNED_MARK} tuned, every tuned row with the same budget: {next(iter(budgets))}. Each outer fold's "
                 "best inner setting was retrained on its whole training fold and evaluated once on its validation "
                 "fold; chosen settings and trial histories are in each record (`tuning`)."]
    else:
        notes = [f"{TUNED_MARK} tuned under DIFFERENT budgets (not an equal-budget comparison): "
                 + "; ".join(f"{', '.join(sorted(rows))}: {b}" for b, rows in sorted(budgets.items()))]
    untuned = sorted({str(r[row_key]) for r in records if not tuning_id(r)})
    if untuned:
        notes.append(f"Rows without {TUNED_MARK} run the recipe's defaults (not tuned): {', '.join(untuned)}.")
    return notes


def _mark_tuned_rows(records: list[dict]) -> None:
    for r in records:
        if tuning_id(r) and not r["_row"].endswith(TUNED_MARK):
            r["_row"] = f"{r['_row']} {TUNED_MARK}"


def _choose_one(records: list[dict], key: str, wanted: str | None, what: str) -> str:
    if wanted is not None:
        return wanted
    found = sorted({str(r[key]) for r in records})
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"no result records to choose a {what} from")
    raise ValueError(f"the results hold several {what}s ({', '.join(found)}); choose one with --{what}")


def build_table(
    records: Iterable[dict],
    row_key: str,
    column_key: str,
    rows: Sequence[str],
    columns: Sequence[str],
    metric: str = "c_index",
    n_expected: int | None = None,
) -> dict[tuple[str, str], TableCell | None]:
    """Cells of a rows x columns table from records (ok and error) already filtered to one recipe/selection."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    grouped: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        grouped.setdefault((str(r[row_key]), str(r[column_key])), []).append(r)
    per_cell: dict[tuple[str, str], tuple[list[float], int, list[dict]]] = {}
    for key, recs in grouped.items():
        by_fold: dict[tuple[int, int], list[float]] = {}
        ok = [r for r in recs if r.get("status") == "ok"]
        for r in ok:
            v = (r.get("metrics") or {}).get(metric)
            if v is not None and math.isfinite(v):
                by_fold.setdefault(fold_order(r), []).append(float(v))  # seeds of one fold averaged
        values = [float(np.mean(by_fold[k])) for k in sorted(by_fold)]
        n_err = sum(1 for r in recs if r.get("status") == "error")
        per_cell[key] = (values, n_err, ok)
    # Folds a cell should have: the cohort's fold count recorded by the runner (older records: the most folds
    # any cell of the table has), so a grid run on fold 0 only is shown as 1/5, not as complete.
    fallback = max([len(v[0]) for v in per_cell.values()] + [1])
    recorded: dict[str, int] = {}
    for (_, col), recs in grouped.items():
        recorded[col] = max(recorded.get(col, 0), recorded_n_folds(recs))
    out: dict[tuple[str, str], TableCell | None] = {}
    for row in rows:
        for col in columns:
            if (row, col) in per_cell:
                values, n_err, ok = per_cell[(row, col)]
                expected = n_expected or max(recorded.get(col, 0), fallback)
                out[(row, col)] = TableCell(values, expected, n_err, ok, folds_per_repeat(ok) if ok else 0)
            else:
                out[(row, col)] = None
    return out


def _recipe_name(store_key: str) -> str:
    """The named recipe of a configuration's store folder key (``demo+1a2b3c`` -> ``demo``)."""
    return str(store_key).split("+", 1)[0]


def _one_recipe_and_selection(recs: list[dict], recipe: str | None,
                              selection: str | None) -> tuple[list[dict], str, str]:
    """Keep the records of one recipe and one selection rule (the given ones, or the only ones present).

    ``recipe`` is a recipe name (every configuration of it: each method's own options, overrides) or one
    configuration's store key (``demo+1a2b3c``).
    """
    if recipe is not None and "+" in recipe:
        recs = [r for r in recs if str(r["recipe"]) == recipe]
    else:
        recipe = _choose_one([{"recipe": _recipe_name(r["recipe"])} for r in recs], "recipe", recipe, "recipe")
        recs = [r for r in recs if _recipe_name(r["recipe"]) == recipe]
    selection = _choose_one(recs, "selection", selection, "selection")
    return [r for r in recs if str(r["selection"]) == selection], recipe, selection


def _label(record: Mapping) -> str:
    """A record's readable configuration label (older records: their folder key)."""
    return str(record.get("label") or record["recipe"])


def label_rows(records: list[dict], row_key: str) -> tuple[list[dict], list[str]]:
    """Copies of ``records`` with a ``_row`` field: the ``row_key`` value, or ``value [label]`` when several
    configurations share it (they are different rows, never averaged together); and footer notes naming the
    configuration of every row whose label is not the plain recipe name."""
    keys: dict[str, set[str]] = {}
    for r in records:
        keys.setdefault(str(r[row_key]), set()).add(str(r["recipe"]))
    out, notes, tissue = [], {}, {}
    for r in records:
        value, label = str(r[row_key]), _label(r)
        row = value if len(keys[value]) == 1 else f"{value} [{label}]"
        out.append({**r, "_row": row})
        if label != _recipe_name(r["recipe"]):
            notes[row] = f"{row}: configuration {label}."
        tissue.setdefault(row, set()).update((r.get("data_sizes") or {}).get("tissue_types") or ())
    notes.update({f"{row}/tissue": f"{row}: tissue types from {', '.join(sorted(s))}." for row, s in tissue.items() if s})
    return out, sorted(set(notes.values()))


#: The paper's cohorts, in the order of its tables' columns.
PAPER_COHORT_ORDER = ("blca", "brca", "coad", "gbmlgg", "luad", "ucec")


def _cohort_columns(records: list[dict]) -> list[str]:
    """The cohorts present in the records: the paper's six in the paper's order, then any other by name."""
    seen = {str(r["cohort"]) for r in records}
    return [c for c in PAPER_COHORT_ORDER if c in seen] + sorted(seen - set(PAPER_COHORT_ORDER))


def filter_datasets(records: Iterable[dict], datasets: str | Sequence[str] | None) -> list[dict]:
    """The records of the cohorts named in ``datasets`` (``--dataset``: a comma list; None = every cohort); a
    cohort the records do not hold is an error naming the ones they hold."""
    records = list(records)
    if not datasets:
        return records
    wanted = [d.strip().lower() for d in (datasets.split(",") if isinstance(datasets, str) else datasets)]
    present = sorted({str(r["cohort"]) for r in records})
    absent = [d for d in wanted if d and d not in present]
    if absent:
        raise ValueError(f"--dataset {','.join(absent)}: no records of this cohort in the store (it holds "
                         f"{', '.join(present) or 'none'})")
    return [r for r in records if str(r["cohort"]) in wanted]


def other_slices_note(records: Iterable[dict], backbone: str | None, recipe: str, selection: str) -> str | None:
    """A footer line when the store holds backbones, recipes or selection rules other than the table's."""
    records = list(records)
    parts = []
    for what, key, shown, option in (("backbone", "backbone", backbone, "--backbone"),
                                     ("recipe", "recipe", recipe, "--recipe"),
                                     ("selection", "selection", selection, "--selection")):
        values = {str(r[key]) if key != "recipe" else _recipe_name(r[key]) for r in records}
        others = sorted(values - {shown}) if shown is not None else []
        if others:
            parts.append(f"{what}(s) {', '.join(others)} ({option})")
    return ("Not shown: the store also holds " + "; ".join(parts) + ".") if parts else None


def _method_order(method: str) -> tuple[int, int, str]:
    """Sort key: paper rows first (in the paper's order), then other methods by name, chance floors last."""
    try:
        spec = get_method_spec(method)
    except KeyError:  # a plugin method that is not loaded in this process
        return (1, 0, method)
    if spec.chance_floor:
        return (2, 0, method)
    return (0, spec.paper_row, method) if spec.paper_row is not None else (1, 0, method)


def _method_rows(records: list[dict]) -> list[str]:
    """Row names (``_row``) in the paper's method order (each method's registered ``paper_row``), other methods
    by name, chance-level floors last."""
    ordered = sorted({str(r["method"]) for r in records}, key=_method_order)
    return [row for m in ordered for row in sorted({r["_row"] for r in records if r["method"] == m})]


def _no_event_notes(table: ResultTable) -> list[str]:
    """One footer line per cell with validation folds without events (left out of its mean)."""
    notes = []
    for (row, col), cell in table.cells.items():
        if cell is None:
            continue
        folds = sorted({int(r["fold"]) for r in cell.records if NO_EVENTS_NOTE in (r.get("notes") or [])})
        if folds:
            notes.append(f"{row} / {col}: fold(s) {', '.join(map(str, folds))} have no events in validation "
                         f"({NO_EVENTS_NOTE}); the mean leaves them out.")
    return notes


def _finish(table: ResultTable, significance: SignificanceHook | None, marker: str) -> ResultTable:
    if table.selection == "paper-max":
        table.notes.append(
            f"{PAPER_MAX_MARK} selection paper-max: each fold reports its best epoch on the reported fold itself "
            "(as the CrossFusion code); optimistic, not comparable with 'last' or 'inner'."
        )
    incomplete = [k for k, c in table.cells.items() if c is not None and c.present and not c.complete]
    if incomplete:
        table.notes.append("(k/n): k of the n validation folds have a value of the metric (unfinished folds, or "
                           "folds where it is undefined: reasons below).")
    if any(c is not None and c.mixed_configs for c in table.cells.values()):
        table.notes.append(f"{MIXED_MARK}: the folds of this cell ran under different configurations (recipe fields, "
                           "method options or data version); rerun `benchmark run` to make them consistent.")
    if any(c is not None and c.n_errors for c in table.cells.values()):
        table.notes.append("err: at least one fold of this cell failed (see the error records).")
    if table.ci is not None:
        table.notes.append(f"[low, high]: {table.ci:.0%} confidence interval of the fold mean, t-interval over the "
                           "repeat x fold values with the Nadeau-Bengio variance correction (1/J + 1/(K-1)); "
                           f"{CLIPPED_MARK} = the interval left [0, 1] and is clipped there (not a confidence "
                           "statement at the clipped end).")
    table.notes += _no_event_notes(table) + _metric_error_notes(table)
    if significance is not None:
        _apply_significance(table, significance, marker)
    else:
        table.notes.insert(0, "Bold: the highest mean of the column, NOT tested (add --significance for tested "
                              "claims).")
    return table


#: Marks an interval clipped to the metric's range [0, 1].
CLIPPED_MARK = "^"


def _metric_error_notes(table: ResultTable) -> list[str]:
    """Why a finished fold has no value of the table's metric (the reasons the records keep in
    ``metric_errors``), one line per cell, instead of a bare "(k/n)"."""
    notes = []
    for (row, col), cell in table.cells.items():
        if cell is None:
            continue
        reasons: dict[str, list[str]] = {}
        for r in cell.records:
            value = (r.get("metrics") or {}).get(table.metric)
            if table.metric == "c_index" and NO_EVENTS_NOTE in (r.get("notes") or []):
                continue  # said by the no-event note
            if value is None or not math.isfinite(value):
                why = (r.get("metric_errors") or {}).get(table.metric) or "no reason recorded"
                reasons.setdefault(why, []).append(f"{int(r.get('repeat') or 0)}/{int(r['fold'])}")
        for why, folds in sorted(reasons.items()):
            notes.append(f"{row} / {col}: {METRIC_NAMES[table.metric]} undefined in finished fold(s) (repeat/fold) "
                         f"{', '.join(sorted(folds))}: {why.rstrip('.')}.")
    return notes


def _apply_significance(table: ResultTable, significance: SignificanceHook, marker: str) -> None:
    """Mark the rows each column's declared family of tests marks, bold the rows it ties for best, and state the
    test, its MDE and what bold means under the table."""
    footers, untested, mdes, details = [], [], [], []
    table.tested_best = {}
    for col in table.columns:
        rows = {r: table.cells[(r, col)].records for r in table.rows
                if table.cells.get((r, col)) is not None and table.cells[(r, col)].present}
        try:
            result = significance(rows)
        except ValueError as exc:  # e.g. fewer than 2 folds shared by the rows: say so, keep the table
            untested.append(f"{col} ({exc})")
            continue
        if result is None:
            untested += [col] if rows else []
            continue
        marks = getattr(result, "marks", None)
        if marks is None:  # a plain set of rows: worse, as a legacy hook says
            marks = {r: "worse" for r in result}
        reference_family = getattr(result, "family", None) == "reference"
        for r, direction in marks.items():
            table.marks[(r, col)] = DIRECTION_MARKS[direction] if reference_family else marker
        if getattr(result, "tied_best", None) is not None:
            table.tested_best[col] = set(result.tied_best)
        if getattr(result, "mde", None) is not None:
            mde = result.mde
            mdes.append(f"{col.upper()} {mde.value:.3f}" + (f" ({mde.low:.3f}-{mde.high:.3f})" if mde.high > mde.low
                                                             else ""))
        if hasattr(result, "details"):
            details.append(f"{col.upper()}: {result.details()}")
        footer = (result.footer(marker, details=False) if hasattr(result, "details") else
                  result.footer(marker) if hasattr(result, "footer") else f"{marker}: significantly worse (paired test).")
        footers += [footer] if footer not in footers else []
    table.notes.insert(0, "Bold: the rows not significantly below the column's best mean (the set statistically "
                          "tied for best: Holm-adjusted all-pairs tests below); no bold in a column without that "
                          "test (the reference family tests rows against the reference only).")
    table.notes += footers + details
    if mdes:
        table.notes.append("Minimum detectable difference of the test that ran (80 % power, Holm's first step "
                           "alpha / m; in brackets its range from the uncertainty of the spread of few folds): "
                           + ", ".join(mdes) + ".")
    if untested:
        table.notes.append(f"not tested (fewer than 2 rows, or the reference absent): {', '.join(untested)}.")


def _spread_words(ci: float | None) -> str:
    return "mean ± population std over folds" if ci is None else f"mean [{ci:.0%} CI] over folds"


def _protocol_words(recipe: str, selection: str, tuned: bool) -> str:
    """The end of a table title: the recipe, the selection rule, and the tuned-row mark when rows are tuned."""
    return f"recipe {recipe}, selection {selection}" + (f", {TUNED_MARK} tuned rows" if tuned else "")


def table1(
    records: Iterable[dict],
    recipe: str | None = None,
    selection: str | None = None,
    backbone: str | None = None,
    seed: int | None = None,
    metric: str = "c_index",
    significance: SignificanceHook | None = None,
    marker: str = "*",
    ci: float | None = None,
    tuned: bool = False,
) -> ResultTable:
    """Table 1: rows = methods, columns = cohorts, for one backbone / recipe / selection; ``tuned``: each
    method's tuned cells where it has some (see :func:`tuned_or_default`)."""
    recs = [r for r in records if seed is None or int(r["seed"]) == seed]
    everything = list(recs)
    if backbone is None:
        backbones = {str(r["backbone"]) for r in recs}
        backbone = "resnet50" if "resnet50" in backbones or not backbones else _choose_one(recs, "backbone", None, "backbone")
    recs = [r for r in recs if str(r["backbone"]) == backbone]
    recs, stale_note = newest_data_records(recs)
    recs, tuning_notes = tuned_or_default(recs, tuned, "method")
    recs, recipe, selection = _one_recipe_and_selection(recs, recipe, selection)
    if not recs:
        raise ValueError(f"no records for backbone {backbone}, recipe {recipe}, selection {selection}")
    recs, config_notes = label_rows(recs, "method")
    _mark_tuned_rows(recs)
    rows, columns = _method_rows(recs), _cohort_columns(recs)
    mark = PAPER_MAX_MARK if selection == "paper-max" else ""
    table = ResultTable(
        title=f"Table 1. {METRIC_NAMES[metric]}{mark} ({_spread_words(ci)}), backbone {backbone}, "
              + _protocol_words(recipe, selection, tuned),
        row_header="Method" + mark, rows=rows, columns=columns,
        cells=build_table(recs, "_row", "cohort", rows, columns, metric), metric=metric, recipe=recipe,
        selection=selection, ci=ci,
    )
    table.notes += ([stale_note] if stale_note else []) + tuning_notes + config_notes
    table.notes += [n for n in (other_slices_note(everything, backbone, recipe, selection),) if n]
    table.backbone = backbone
    return _finish(table, significance, marker)


def table2(
    records: Iterable[dict],
    method: str = "crossfusion",
    recipe: str | None = None,
    selection: str | None = None,
    seed: int | None = None,
    metric: str = "c_index",
    backbones: Sequence[str] = TABLE2_BACKBONES,
    significance: SignificanceHook | None = None,
    marker: str = "*",
    ci: float | None = None,
    tuned: bool = False,
) -> ResultTable:
    """Table 2: rows = backbones, columns = cohorts + Mean, for one method / recipe / selection; ``tuned``: the
    tuned cells of each backbone that has some."""
    recs = [r for r in records if str(r["method"]) == method.lower() and (seed is None or int(r["seed"]) == seed)]
    if not recs:
        raise ValueError(f"no records for method {method!r}")
    everything = list(recs)
    recs, stale_note = newest_data_records(recs)
    recs, tuning_notes = tuned_or_default(recs, tuned, "backbone")
    recs, recipe, selection = _one_recipe_and_selection(recs, recipe, selection)
    recs, config_notes = label_rows(recs, "backbone")
    _mark_tuned_rows(recs)
    rows = [row for b in backbones for row in (sorted({r["_row"] for r in recs if r["backbone"] == b}) or [b])]
    rows += sorted({r["_row"] for r in recs if r["backbone"] not in backbones})
    columns = _cohort_columns(recs)
    mark = PAPER_MAX_MARK if selection == "paper-max" else ""
    table = ResultTable(
        title=f"Table 2. {METRIC_NAMES[metric]}{mark} of {method} per backbone ({_spread_words(ci)}), "
              + _protocol_words(recipe, selection, tuned),
        row_header="Backbone" + mark, rows=rows, columns=columns,
        cells=build_table(recs, "_row", "cohort", rows, columns, metric), metric=metric, recipe=recipe,
        selection=selection, mean_column=True, ci=ci,
    )
    table.notes.append("Mean: mean of the cohort means, shown only when every cohort is present.")
    table.notes += ([stale_note] if stale_note else []) + tuning_notes + config_notes
    table.notes += [n for n in (other_slices_note(everything, None, recipe, selection),) if n]
    return _finish(table, significance, marker)


# -------------------------------------------------------------------------------------------------------
# published numbers beside ours
# -------------------------------------------------------------------------------------------------------
#: Published result files (``datasets/published/``, with their citation in its README.md).
PUBLISHED_DIR = DATASETS_DIR / "published"
PUBLISHED = {"crossfusion": ("crossfusion_tables.csv",
                             "Soraki et al., CrossFusion, arXiv 2503.02064, Tables 1-2 (mean ± std over 5 folds)")}
#: Level of the interval the published mean is compared with.
PUBLISHED_CI = 0.95


def read_published(name: str) -> dict[tuple[int, str, str, str], tuple[float, float]]:
    """``{(table, row, cohort, backbone): (mean, std)}`` of a published result file, names lower case."""
    if name.lower() not in PUBLISHED:
        raise ValueError(f"--published {name}: unknown; known: {', '.join(PUBLISHED)}")
    out = {}
    with open(PUBLISHED_DIR / PUBLISHED[name.lower()][0], newline="") as handle:
        for row in csv.DictReader(handle):
            key = (int(row["table"]), row["row"].lower(), row["cohort"].lower(), row["backbone"].lower())
            out[key] = (float(row["c_index_mean"]), float(row["c_index_std"]))
    return out


def add_published(table: ResultTable, name: str, number: int, method: str | None = None) -> ResultTable:
    """Put the published C-index (mean, std) beside each cell of Table ``number`` that the paper reports, and
    whether the published mean lies inside our cell's 95 % confidence interval (corrected t over folds)."""
    if table.metric != "c_index":
        raise ValueError(f"--published: the paper reports the C-index, not {table.metric}")
    published = read_published(name)
    backbone = table.backbone.lower()
    for row in table.rows:
        key_row = row.split(" ")[0]
        for col in table.columns:
            key = (1, key_row, col, backbone) if number == 1 else (2, (method or "").lower(), col, key_row)
            if key in published:
                table.published[(row, col)] = published[key]
    table.notes.append(f"paper: the published C-index ({PUBLISHED[name.lower()][1]}; datasets/published/); "
                       f"in CI / outside CI: whether the paper's mean lies inside our cell's {PUBLISHED_CI:.0%} "
                       "confidence interval (corrected t over folds); no CI: fewer than 2 folds.")
    return table


def _published_csv(table: ResultTable, row: str, col: str) -> list[str]:
    """The published columns of a CSV row (none when the table shows no published numbers)."""
    if not table.published:
        return []
    if (row, col) not in table.published:
        return ["", "", ""]
    mean, std = table.published[(row, col)]
    verdict = _published_text(table, row, col).rsplit(", ", 1)[1].rstrip(")")
    return [f"{mean:.3f}", f"{std:.3f}", {"in CI": "yes", "outside CI": "no"}.get(verdict, "")]


def _published_text(table: ResultTable, row: str, col: str, decimals: int = 3) -> str:
    """`` (paper 0.559 ± 0.059, in CI)`` for a cell the paper reports (nothing otherwise)."""
    if (row, col) not in table.published:
        return ""
    mean, std = table.published[(row, col)]
    cell = table.cells.get((row, col))
    interval = cell.interval(PUBLISHED_CI) if cell is not None and cell.present else None
    verdict = "no CI" if interval is None else "in CI" if interval[0] <= mean <= interval[1] else "outside CI"
    return f" (paper {mean:.{decimals}f} ± {std:.{decimals}f}, {verdict})"


# -------------------------------------------------------------------------------------------------------
# rendering
# -------------------------------------------------------------------------------------------------------
def _cell_text(table: ResultTable, row: str, col: str, fmt: str, decimals: int = 3) -> str:
    text = _own_cell_text(table, row, col, fmt, decimals)
    paper = _published_text(table, row, col, decimals)
    return text + (paper.replace("±", r"$\pm$") if fmt == "latex" else paper)


def _own_cell_text(table: ResultTable, row: str, col: str, fmt: str, decimals: int = 3) -> str:
    value = table.value(row, col)
    cell = table.cells.get((row, col)) if col != "Mean" else None
    if value is None:
        text = MISSING[fmt]
        if cell is not None and cell.n_errors:
            text += " err"
        return text
    if col == "Mean":
        text = f"{value:.{decimals}f}"
    else:
        text = f"{value:.{decimals}f}{_spread_text(table, cell, fmt, decimals)}"
    if row in table.bold(col, decimals):
        text = f"**{text}**" if fmt == "md" else rf"\textbf{{{text}}}"
    if cell is not None:
        mark = table.marks.get((row, col), "")
        text += LATEX_MARKS.get(mark, mark) if fmt == "latex" else mark
        if not cell.complete:
            text += f" ({len(cell.values)}/{cell.n_expected})"
        if cell.mixed_configs:
            text += MIXED_MARK
        if cell.n_errors:
            text += " err"
    return text


def _spread_text(table: ResultTable, cell: TableCell, fmt: str, decimals: int) -> str:
    """`` ± std``, or `` [low, high]`` with ``table.ci``; nothing for one fold (no spread, not a misleading 0)."""
    if table.ci is not None:
        interval = cell.interval(table.ci)
        return "" if interval is None else (f" [{interval[0]:.{decimals}f}, {interval[1]:.{decimals}f}]"
                                            + (CLIPPED_MARK if interval[2] else ""))
    pm = r" $\pm$ " if fmt == "latex" else " ± "
    return f"{pm}{cell.std:.{decimals}f}" if len(cell.values) > 1 else ""


def _col_title(col: str) -> str:
    return col if col == "Mean" else col.upper()


def render(table: ResultTable, fmt: str = "md") -> str:
    """The table as Markdown (``md``), LaTeX (``latex``) or tidy CSV (``csv``)."""
    if fmt == "md":
        lines = [f"**{table.title}**", "", "| " + " | ".join([table.row_header] + [_col_title(c) for c in table.all_columns()]) + " |",
                 "|" + "---|" * (1 + len(table.all_columns()))]
        for row in table.rows:
            lines.append("| " + " | ".join([row] + [_cell_text(table, row, c, "md") for c in table.all_columns()]) + " |")
        lines += [""] + [f"- {n}" for n in ["— = missing (no finished fold)."] + table.notes]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        esc = lambda s: (s.replace("_", r"\_").replace("±", r"$\pm$").replace(PAPER_MAX_MARK, r"$^\dagger$")  # noqa: E731
                         .replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$").replace("%", r"\%"))
        cols = table.all_columns()
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(table.title)}}}",
                 r"\begin{tabular}{l" + "c" * len(cols) + "}", r"\toprule",
                 " & ".join([esc(table.row_header)] + [_col_title(c) for c in cols]) + r" \\", r"\midrule"]
        for row in table.rows:
            lines.append(" & ".join([esc(row)] + [_cell_text(table, row, c, "latex") for c in cols]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [rf"\par\footnotesize {esc(n)}" for n in table.notes]
        lines.append(r"\end{table}")
        return "\n".join(lines) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["row", "column", "metric", "mean", "std", "n_folds", "n_expected", "n_errors", "bold",
                         "marker", "recipe", "selection"] + (["paper_mean", "paper_std", "paper_in_ci"]
                                                             if table.published else []))
        for row in table.rows:
            for col in table.all_columns():
                value = table.value(row, col)
                cell = table.cells.get((row, col)) if col != "Mean" else None
                writer.writerow([
                    row, col, table.metric, "" if value is None else f"{value:.6f}",
                    f"{cell.std:.6f}" if cell is not None and cell.present else "",
                    "" if col == "Mean" else (len(cell.values) if cell is not None else 0),
                    cell.n_expected if cell is not None else "", cell.n_errors if cell is not None else 0,
                    int(row in table.bold(col)), table.marks.get((row, col), ""), table.recipe, table.selection,
                ] + _published_csv(table, row, col))
        return buffer.getvalue()
    raise ValueError(f"unknown table format {fmt!r}; expected md, latex or csv")
