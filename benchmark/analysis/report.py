"""One Markdown page for a result store: tables, comparisons, Kaplan-Meier figures, cohort report cards and the
provenance of every number.

``python -m benchmark report --results DIR [--out report.md]``. Figures go to ``<out folder>/figures`` and are
linked relatively, so the page and its folder can be moved together.
"""
from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from benchmark.analysis import statistics as compare
from benchmark.analysis import tables
from benchmark.analysis.plots import SPLIT_DESCRIPTIONS, format_p, plot_km
from benchmark.analysis.significance import average_p_value, fisher_combined_p
from benchmark.store.query import Results, group_cells


def _md_table(frame: pd.DataFrame, index: bool = True) -> str:
    """A DataFrame as a Markdown table (no extra dependency)."""
    cols = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in zip(frame.index, frame.astype(object).itertuples(index=False)):  # keeps ints as ints
        cells = ([str(idx)] if index else []) + [_fmt(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.3f}"
    return str(value)


def data_description(record: dict) -> str:
    """Where a record's data came from, as recorded: the synthetic preset / seed / signal, or the real clinical
    table, feature folder(s), layout and column mapping, or the data root."""
    prov = record.get("provenance") or {}
    config = record.get("config") or {}
    root = prov.get("data_root", config.get("data_root"))
    data = prov.get("data") or {}
    synthetic = data.get("synthetic") or prov.get("synthetic")
    if isinstance(synthetic, dict):
        parts = [f"{k} {synthetic[k]}" for k in ("preset", "seed", "signal") if synthetic.get(k) is not None]
        return f"synthetic ({', '.join(parts)})" + (f" at {root}" if root else "")
    if data.get("clinical") and (config.get("clinical") or not root):
        return _real_source(data)
    if root:
        return f"data root {root}"
    return "synthetic (embedded demo)" if config.get("synthetic_version") is not None else "not recorded"


def _real_source(data: dict) -> str:
    """A real data source in words: clinical table, features, layout, column mapping."""
    features = data.get("features") or {}
    shown = ", ".join(v if k == "any" else f"{k} {v}" for k, v in features.items()) or "—"
    text = f"real data: clinical table {data['clinical']}, features {shown}"
    text += f" ({data['layout']} layout)" if data.get("layout") else ""
    return text + (f", columns {data['columns']}" if data.get("columns") else "")


def splits_description(record: dict) -> str:
    """Where a record's folds came from (given / found folder, generating command and seed), as recorded."""
    data = (record.get("provenance") or {}).get("data") or {}
    origin = data.get("splits_origin") or data.get("splits") or "—"
    return origin + (f" (repeat {record['repeat']}: generated with seed {record['repeat']})"
                     if record.get("repeat") else "")


def provenance_table(records: Sequence[dict]) -> pd.DataFrame:
    """One row per cell: folds ok / failed, data, git commit(s), versions, creation dates."""
    rows = []
    for key, recs in group_cells(records).items():
        ok = [r for r in recs if r.get("status") == "ok"]
        provs = [r.get("provenance") or {} for r in recs]
        commits = sorted({str(p.get("git_commit"))[:10] for p in provs if p.get("git_commit")})
        versions = (provs[0].get("versions") or {}) if provs else {}
        created = sorted(str(p.get("created")) for p in provs if p.get("created"))
        rows.append({
            "method": key[0], "cohort": key[1], "backbone": key[2], "recipe": key[3], "selection": key[4],
            "seed": key[5], "folds ok": len(ok), "folds failed": len(recs) - len(ok),
            "data": data_description(recs[0]),
            "splits": splits_description(recs[0]),
            "git commit": ", ".join(commits) or "—",
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("harness", "torch", "scikit-survival")) or "—",
            "created": f"{created[0][:10]} .. {created[-1][:10]}" if created else "—",
        })
    return pd.DataFrame(rows)


def report_card_from_records(records: Sequence[dict]) -> pd.DataFrame:
    """A cohort's report card read off the out-of-fold predictions of one cell (every patient once).

    Columns: patients, samples, events, censoring, median follow-up (months), and per fold ``fold k``
    = ``patients/events`` of the validation split.
    """
    pooled = compare.pooled_predictions(records)
    patients = pooled.groupby("patient_id").agg(time=("time", "first"), event=("event", "first"), fold=("fold", "first"))
    card = {
        "patients": len(patients), "samples": len(pooled), "events": int(patients["event"].sum()),
        "censoring": f"{1 - patients['event'].mean():.1%}",
        "median follow-up (months)": f"{patients['time'].median():.1f}",
    }
    for k, grp in patients.groupby("fold"):
        card[f"fold {k} (patients/events)"] = f"{len(grp)}/{int(grp['event'].sum())}"
    return pd.DataFrame([card])


def _report_card(cohort: str, records: Sequence[dict], use_audit: bool) -> tuple[str, str]:
    """(source, Markdown) of a cohort's report card: the data layer's audit of the clinical table and splits the
    cell was trained on (paths from the record's provenance) when they are reachable, else the records."""
    data = (records[0].get("provenance") or {}).get("data") or {}
    clinical, splits = data.get("clinical"), data.get("splits")
    sizes = trained_sizes_text(records)
    if use_audit and clinical and Path(clinical).exists():
        from benchmark.data.audit import audit

        rep = audit(clinical, splits if splits and Path(splits).is_dir() else None, name=cohort,
                    columns=data.get("columns"))
        facts = pd.DataFrame([{k: ("/".join(str(x) for x in v) if isinstance(v, list) else
                                   f"{v:.1%}" if k in ("censoring", "event rate") else v) for k, v in rep.facts.items()}])
        text = _md_table(facts, index=False) + "\nFolds of the split files (before any slide without features is left " \
            "out):\n\n" + _md_table(rep.folds, index=False)
        text += "".join(f"\n- warning: {w}" for w in rep.warnings)
        text += "".join(f"\n- **problem**: {p}" for p in rep.problems)
        return f"audit of {clinical}", text + sizes
    return "records", _md_table(report_card_from_records(records), index=False) + sizes


def trained_sizes(records: Sequence[dict]) -> pd.DataFrame:
    """Per fold of one cell, the samples that trained and were evaluated (after ``--missing-features drop``),
    from the records (``data_sizes``), and the slides each fold lost."""
    rows = []
    for r in sorted(records, key=lambda r: (int(r.get("repeat") or 0), int(r["fold"]))):
        sizes = r.get("data_sizes") or {}
        lost = ((r.get("missing_features") or {}).get("fold") or {})
        rows.append({"repeat": int(r.get("repeat") or 0), "fold": int(r["fold"]), "train": sizes.get("n_train"),
                     "val": sizes.get("n_val"), "dropped (train/val)": f"{lost['train_dropped']}/{lost['val_dropped']}"
                     if lost else "0/0"})
    return pd.DataFrame(rows)


def trained_sizes_text(records: Sequence[dict]) -> str:
    """The Markdown of :func:`trained_sizes` (nothing when the records hold no sizes)."""
    frame = trained_sizes(records)
    if frame.empty or frame["train"].isna().all():
        return ""
    return ("\n\nSizes that trained (per fold of this cell, after leaving out slides without features):\n\n"
            + _md_table(frame, index=False))


#: Censored fraction of a cell's validation samples from which the report calls its D-calibration test powerless:
#: censored samples spread their mass over the low bins, so even calibrated curves almost never fail (simulated
#: false-alarm rate of calibrated exponential curves, 60-patient folds: 0.046 uncensored, 0.014 at 20 %,
#: 0.004 at 38 %, 0 at 53 % censoring; tests/evaluation/test_metrics.py).
DCAL_POWERLESS_CENSORING = 0.3


def calibration_table(records: Sequence[dict]) -> pd.DataFrame:
    """D-calibration per cell (methods x cohorts): Fisher's combination of the folds' chi-square p-values within
    one repeat and seed (Haider et al. 2020; disjoint validation patients, independent tests), then twice the
    mean over repeats and seeds (:func:`~benchmark.analysis.significance.average_p_value`, valid when the same
    patients recur). Small = miscalibrated survival curves. A cell whose validation samples are at least
    :data:`DCAL_POWERLESS_CENSORING` censored is marked ``(no power)``: there a large p says nothing."""
    runs: dict[tuple[str, str], dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    censored: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in records:
        value = (r.get("metrics") or {}).get("d_calibration_p")
        if value is not None and math.isfinite(value):
            runs[(r["method"], r["cohort"])][(int(r.get("repeat") or 0), int(r.get("seed") or 0))].append(float(value))
            censored[(r["method"], r["cohort"])] += [1 - int(p.get("event") or 0) for p in r.get("predictions") or []]
    cells = {}
    for key, by_run in runs.items():
        p = average_p_value([fisher_combined_p(ps) for ps in by_run.values()])
        share = float(np.mean(censored[key])) if censored[key] else 0.0
        cells[key] = f"{p:.3f}" + (f" (no power: {share:.0%} censored)" if share >= DCAL_POWERLESS_CENSORING else "")
    columns: dict[str, dict[str, str]] = defaultdict(dict)  # one value per method and cohort
    for (method, cohort), text in cells.items():
        columns[cohort][method] = text
    frame = pd.DataFrame(columns)
    if frame.empty:
        return frame
    frame = frame.reindex(sorted({m for m, _ in cells}))
    frame.index.name = "method"
    return frame.reindex(columns=sorted(frame.columns))


def mde_table(results: Results, methods: Sequence[str], alpha: float, **filters) -> pd.DataFrame:
    """Per cohort: validation folds and the minimum detectable difference of the design (80 % power), from the
    observed fold variance of every pair of methods (:func:`benchmark.analysis.statistics.design_mde`)."""
    rows = []
    for cohort in sorted({r["cohort"] for r in results.select(method=methods, **filters)}):
        cells = {m: results.select(method=m, cohort=cohort, **filters) for m in methods}
        try:
            data = compare.column_data({m: recs for m, recs in cells.items() if recs}, predictions=False)
        except ValueError:  # fewer than two methods, or no shared folds: no design variance to read
            continue
        mde = compare.design_mde(data, alpha=alpha)
        rows.append({"cohort": cohort, "methods": len(data.methods), "validation folds":
                     len(data.fold_values[data.methods[0]]), "folds per repeat": data.n_folds,
                     "MDE (C-index)": mde.value, "MDE range (spread of few folds)": f"{mde.low:.3f}-{mde.high:.3f}"})
    return pd.DataFrame(rows).set_index("cohort") if rows else pd.DataFrame()


def _protocols(records: Sequence[dict]) -> list[tuple[str, str]]:
    return sorted({(str(r["recipe"]), str(r["selection"])) for r in records})


def _ranks_section(scores: pd.DataFrame, methods: Sequence[str], label: str, fig_dir: Path, rel, alpha: float
                   ) -> list[str]:
    """Mean ranks over cohorts, the Iman-Davenport verdict and the CD diagram (or its "not significant")."""
    if scores.shape[1] < 2 or not len(scores):
        return []
    summary = compare.rank_summary(scores, alpha=alpha)
    name = f"cd_{label.replace(', ', '_').replace(' ', '-')}.png".replace("/", "-")
    compare.critical_difference_diagram(summary, fig_dir / name, title=f"Mean rank ({label})")
    ranks = pd.DataFrame({"mean rank": summary.ranks, "mean C-index": scores.mean(axis=0)[summary.ranks.index]})
    ranks.index.name = "method"
    lines = [f"**Mean ranks over {len(scores)} cohort(s), {label}** (1 = best). {summary.describe()}", "",
             _md_table(ranks), f"![critical-difference diagram]({rel(fig_dir / name)})", ""]
    left_out = [m for m in methods if m not in scores.columns]
    if left_out:
        lines += [f"Not ranked (no cohort where every fold finished): {', '.join(left_out)}. Only cohorts "
                  "where every ranked method finished every fold are ranked.", ""]
    return lines


def _design_section(results: Results, records: Sequence[dict], methods: Sequence[str], label: str, alpha: float,
                    filters: dict) -> list[str]:
    """The minimum detectable difference of the design and the D-calibration of each cell."""
    lines = []
    mde = mde_table(results, methods, alpha, **filters) if len(methods) >= 2 else pd.DataFrame()
    if len(mde):
        lines += [f"**Design, {label}**: the smallest C-index difference a paired corrected t-test detects with "
                  f"80 % power at Holm's first step (alpha {alpha:g} / m, m = every pair of methods), from the "
                  "observed variance of the per-fold differences (pooled over the pairs of methods); the range "
                  "is the MDE at the ends of the 95 % interval of that spread, which few folds estimate poorly. "
                  "Smaller true differences cannot be ranked by this design.",
                  "", _md_table(mde), ""]
    calibration = calibration_table(records)
    if len(calibration):
        lines += [f"**D-calibration, {label}** (Haider et al. 2020; Fisher-combined p over the folds of one repeat "
                  "and seed, twice the mean over repeats and seeds; small = the predicted survival curves are "
                  "miscalibrated; — = no survival curve, e.g. a Cox head; \"no power\": at "
                  f"{DCAL_POWERLESS_CENSORING:.0%} or more censored validation samples the test almost never fails "
                  "even when the curves are wrong, so a large p is no evidence of calibration):", "",
                  _md_table(calibration), ""]
    return lines


def build_report(
    results: Results,
    out: str | Path | None = None,
    *,
    km_methods: Sequence[str] | None = None,
    split: str = "train-median",
    n_boot: int = 1000,
    alpha: float = 0.05,
    boot_seed: int = 0,
    audit_cards: bool = True,
    reference: str | None = None,
) -> Path:
    """Write the Markdown report of a result store and return its path.

    Parameters
    ----------
    results : path
        Result-store root.
    out : path, optional
        Markdown file (default ``<results>/report.md``); figures go to ``<its folder>/figures``.
    km_methods : list of str, optional
        Methods with Kaplan-Meier figures (default: the best method by mean C-index of each backbone/protocol).
    split : {"train-median", "pooled-median"}
        Kaplan-Meier threshold rule.
    n_boot, alpha, boot_seed : settings of the significance markers (all pairs of methods, Holm-adjusted per
        column, default test: see :mod:`benchmark.analysis.significance`) and of the rank statistics.
    reference : str, optional
        Mark every method against this one in Table 1 instead of all pairs (Table 2, rows = backbones: all pairs).
    audit_cards : bool
        Build each cohort's report card with the data layer's audit of the clinical table and splits named in
        the records' provenance (when reachable); False reads it off the stored predictions (evaluated
        patients only).
    """
    out = Path(out) if out is not None else results.root / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = out.parent / "figures"
    all_records = results.select(status=None)
    ok = [r for r in all_records if r.get("status") == "ok"]
    if not ok:
        raise FileNotFoundError(f"{results.root}: no successful records to report")
    significance = compare.SignificanceOptions(family="reference" if reference else "all-pairs", reference=reference,
                                               alpha=alpha, n_boot=n_boot, seed=boot_seed)
    # Table 2's rows are backbones: a method reference means nothing there, so its family is all pairs
    backbone_significance = compare.SignificanceOptions(alpha=alpha, n_boot=n_boot, seed=boot_seed)
    rel = lambda p: Path(p).resolve().relative_to(out.parent.resolve()).as_posix()  # noqa: E731

    lines = [
        "# Benchmark report", "",
        f"Result store `{results.root}`: {len(ok)} successful fold records, {len(all_records) - len(ok)} failed; "
        f"generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}.", "",
        "Every number is a C-index (Harrell) on the validation split of its fold; which recipe, selection rule, "
        "data and code produced it is listed under [Provenance](#provenance).", "",
    ]
    lines += _tables_section(all_records, ok, significance, backbone_significance)
    comparisons, km_plan = _comparisons_section(results, ok, km_methods, fig_dir, rel, alpha)
    lines += comparisons
    lines += _km_section(results, ok, km_plan, split, fig_dir, rel)
    lines += _cards_section(ok, audit_cards)
    lines += ["## Provenance", "", "Each row is one cell (all its folds). `paper-max` selection picks the epoch on "
              "the reported fold itself (optimistic).", "", _md_table(provenance_table(all_records), index=False), ""]
    out.write_text("\n".join(lines))
    return out


def _tables_section(all_records: list[dict], ok: list[dict], significance, backbone_significance) -> list[str]:
    """Table 1 per protocol and backbone; Table 2 for every method run on several backbones."""
    lines = ["## Tables", ""]
    backbones = sorted({str(r["backbone"]) for r in ok})
    for recipe, selection in _protocols(ok):
        recs = [r for r in all_records if r["recipe"] == recipe and r["selection"] == selection]
        for backbone in backbones:
            sub = [r for r in recs if r["backbone"] == backbone]
            if any(r.get("status") == "ok" for r in sub):
                t = tables.table1(sub, recipe=recipe, selection=selection, backbone=backbone,
                                  significance=significance, marker=compare.SIGNIFICANCE_MARKER)
                lines += [tables.render(t, "md"), ""]
        finished = [r for r in recs if r.get("status") == "ok"]
        for method in sorted({r["method"] for r in finished}):
            if len({r["backbone"] for r in finished if r["method"] == method}) > 1:
                t = tables.table2(recs, method=method, recipe=recipe, selection=selection,
                                  significance=backbone_significance, marker=compare.SIGNIFICANCE_MARKER)
                lines += [tables.render(t, "md"), ""]
    return lines


def _comparisons_section(results: Results, ok: list[dict], km_methods, fig_dir: Path, rel,
                         alpha: float) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    """Ranks, CD diagram and design per backbone and protocol; which method of each gets Kaplan-Meier curves."""
    lines = ["## Paired comparisons", ""]
    km_plan: list[tuple[str, str, str, str]] = []  # method, backbone, recipe, selection
    for recipe, selection in _protocols(ok):
        for backbone in sorted({str(r["backbone"]) for r in ok}):
            sub = [r for r in ok if r["recipe"] == recipe and r["selection"] == selection and r["backbone"] == backbone]
            methods = sorted({r["method"] for r in sub})
            if not methods:
                continue
            scores = compare.score_table(results, methods, backbone=backbone, recipe=recipe, selection=selection)
            label = f"backbone {backbone}, recipe {recipe}, selection {selection}"
            lines += _ranks_section(scores, methods, label, fig_dir, rel, alpha)
            lines += _design_section(results, sub, methods, label, alpha,
                                     dict(backbone=backbone, recipe=recipe, selection=selection))
            best = scores.mean(axis=0).idxmax() if len(scores) else methods[0]
            km_plan += [(m, backbone, recipe, selection) for m in (km_methods or [best]) if m in methods]
    if not any(line.startswith(("**Mean ranks", "**Design")) for line in lines):
        lines += ["Fewer than two methods share a cohort: nothing to compare.", ""]
    return lines, km_plan


def _km_section(results: Results, ok: list[dict], km_plan, split: str, fig_dir: Path, rel) -> list[str]:
    """Kaplan-Meier figures and log-rank tests of the planned methods."""
    lines = ["## Kaplan-Meier curves", "", f"High vs low predicted risk, {SPLIT_DESCRIPTIONS[split]}; "
             "log-rank test (lifelines). One figure per cohort.", ""]
    for method, backbone, recipe, selection in km_plan:
        cohorts = sorted({r["cohort"] for r in ok if (r["method"], r["backbone"], r["recipe"], r["selection"]) ==
                          (method, backbone, recipe, selection)})
        kms = plot_km(results, method, cohorts, split=split, out=fig_dir / f"km_{backbone}_{recipe}_{selection}",
                      layout="figures", backbone=backbone, recipe=recipe, selection=selection)
        table = pd.DataFrame([{"cohort": k.cohort, "high risk (n/events)": f"{k.n_high}/{k.events_high}",
                               "low risk (n/events)": f"{k.n_low}/{k.events_low}", "log-rank p": format_p(k.p_value)}
                              for k in kms]).set_index("cohort")
        lines += [f"**{method}**, backbone {backbone}, recipe {recipe}, selection {selection}", "", _md_table(table), ""]
        for k in kms:
            png = next(f for f in k.files if f.suffix == ".png")
            lines += [f"![Kaplan-Meier {method} {k.cohort}]({rel(png)})", ""]
    return lines


def _cards_section(ok: list[dict], audit_cards: bool) -> list[str]:
    """One report card per cohort (audit of its table and splits, or read off the predictions)."""
    lines = ["## Cohort report cards", ""]
    by_cohort: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        by_cohort[r["cohort"]].append(r)
    for cohort, recs in sorted(by_cohort.items()):
        first_cell = next(iter(group_cells(recs).values()))
        source, text = _report_card(cohort, first_cell, audit_cards)
        note = (f" ({source})" if source != "records"
                else " (read off the stored out-of-fold predictions: evaluated patients only)")
        lines += [f"**{cohort.upper()}**{note}; data: {data_description(first_cell[0])}", "", text, ""]
    return lines
