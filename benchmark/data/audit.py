"""Leakage audit and report card of a cohort's clinical table and split files.

Fatal problems (non-zero exit of ``python -m benchmark audit``): a patient in both train and val of a fold,
split IDs missing from the table, an empty train or validation split, a validation split without events
(its C-index is undefined). Warnings: val folds that overlap, patients in no val fold, a patient in neither
train nor val of a fold, a label column whose name contradicts its declared meaning. The audit writes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.data.clinical import ColumnMap, parse_columns, patient_table, read_clinical
from benchmark.data.splits import (
    GENERATOR, describe_origin, read_splits, read_splits_info, stratified_patient_folds,
)


@dataclass
class AuditReport:
    """Facts, per-fold table, fatal problems and warnings of one table + split set."""

    name: str
    clinical: str
    splits: str
    facts: dict
    folds: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: per fold after leaving out slides without features (``audit --features ... --missing-features drop``)
    feature_folds: pd.DataFrame | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _to_patients(ids: list[str], slides: pd.DataFrame) -> tuple[set[str], list[str]]:
    patients = set(slides["patient_id"])
    by_case = dict(zip(slides["case_id"], slides["patient_id"]))
    by_slide = dict(zip(slides["slide_id"], slides["patient_id"]))
    found, missing = set(), []
    for i in ids:
        p = i if i in patients else by_case.get(i, by_slide.get(i))
        if p is None:
            missing.append(i)
        else:
            found.add(p)
    return found, missing


def _fold_size_problems(k: int, train: set[str], val: set[str], val_events: int) -> list[str]:
    """A fold that cannot be evaluated: an empty train or validation split, or no event in validation."""
    if not train or not val:
        return [f"fold {k}: empty {'train' if not train else 'validation'} split"]
    if val_events == 0:
        return [f"fold {k}: no events in the validation split ({len(val)} censored patients): C-index undefined"]
    return []


def _facts(patients: pd.DataFrame, slides: pd.DataFrame, cmap: ColumnMap) -> dict:
    """The report card's facts: the column mapping, sizes, events, censoring, follow-up."""
    t = patients["time"]
    censored = patients["censorship"] == 1
    return {
        "column mapping": cmap.describe(),
        "patients": len(patients),
        "slides": len(slides),
        "events": int(patients["event"].sum()),
        "censored": int(censored.sum()),
        "event rate": float(patients["event"].mean()),
        "censoring": float(censored.mean()),
        "time quantiles (min/25/50/75/max, months)": [round(float(x), 2) for x in np.quantile(t, [0, .25, .5, .75, 1])],
        "median follow-up of censored (months)": round(float(t[censored].median()), 2) if censored.any() else None,
        "slides per patient (max)": int(patients["slide_ids"].map(len).max()),
    }


def audit(clinical: str | Path, splits: str | Path | None, name: str = "", columns=None, n_folds: int = 5,
          seed: int = 0, splits_given: bool = True) -> AuditReport:
    """Audit a clinical table against its split folder.

    ``splits`` None: the folds ``benchmark splits`` / ``run`` would generate (seed ``seed``), kept in memory and
    never written; ``splits_given``: whether the user named the folder (else it was found beside the table).
    ``columns``: the table's column mapping (:func:`benchmark.data.clinical.parse_columns`); a
    column whose name contradicts its declared meaning is a warning.
    """
    cmap = parse_columns(columns) or ColumnMap()
    slides = read_clinical(clinical, columns=None if cmap.is_default else cmap)
    patients = patient_table(slides, source=clinical)
    if splits is None:
        raw = stratified_patient_folds(patients[["time", "event"]], n_folds, seed)
        splits_label = (f"(generated in memory: {GENERATOR}, seed {seed}, {n_folds} folds; nothing written; "
                        "write them with `benchmark splits`)")
    else:
        raw = read_splits(splits)
        info = read_splits_info(splits)
        splits_label = describe_origin(splits, splits_given, info)
    report = AuditReport(name, str(clinical), splits_label, _facts(patients, slides, cmap), pd.DataFrame())
    report.warnings += cmap.warnings()
    _audit_folds(report, raw, slides, patients, clinical)
    return report


def _audit_folds(report: AuditReport, raw: list, slides: pd.DataFrame, patients: pd.DataFrame, clinical) -> None:
    """Per fold: sizes, events, IDs missing from the table, leaks, patients in neither part; then the checks
    across folds."""
    rows, all_missing, val_seen = [], set(), {}
    for k, (train, val) in enumerate(raw):
        tr, miss_t = _to_patients(train, slides)
        va, miss_v = _to_patients(val, slides)
        missing = sorted(set(miss_t + miss_v))
        all_missing.update(missing)
        leak = sorted(tr & va)
        if leak:
            report.problems.append(f"fold {k}: {len(leak)} patient(s) in both train and val, e.g. {leak[:3]}")
        neither = sorted(set(patients.index) - tr - va)
        if neither:
            report.warnings.append(f"fold {k}: {len(neither)} patient(s) of the table are in neither train nor val "
                                   f"(unused by this fold), e.g. {neither[:3]}")
        for p in va:
            val_seen.setdefault(p, []).append(k)
        ev = patients.loc[sorted(va), "event"]
        report.problems += _fold_size_problems(k, tr, va, int(ev.sum()))
        rows.append({"fold": k, "train IDs": len(train), "val IDs": len(val), "train pat.": len(tr),
                     "val pat.": len(va), "val events": int(ev.sum()),
                     "val cens.": round(float(1 - ev.mean()), 3) if len(ev) else None,
                     "missing": len(missing), "leaked": len(leak), "unused": len(neither)})
    report.folds = pd.DataFrame(rows)
    if all_missing:
        report.problems.append(
            f"{len(all_missing)} split ID(s) are not in the clinical table {clinical}, e.g. {sorted(all_missing)[:3]}"
        )
    multi = [p for p, ks in val_seen.items() if len(ks) > 1]
    if multi:
        report.warnings.append(f"{len(multi)} patient(s) are in the val set of several folds, e.g. {multi[:3]}")
    never = sorted(set(patients.index) - set(val_seen))
    if never:
        report.warnings.append(f"{len(never)} patient(s) of the table are in no val fold, e.g. {never[:3]}")


def audit_features(report: AuditReport, dataset: str, clinical, splits, *, features, backbone: str = "resnet50",
                   layout: str = "auto", missing_features: str = "error", columns=None) -> AuditReport:
    """Add the feature files to ``report``: how the layout was found, the slides without a file (a problem with
    ``missing_features="error"``), and with ``"drop"`` each fold's sizes and events once they are left out.
    Every feature file's dim is read from its header first: one that differs from the backbone's raises
    ValueError naming the file and both dims. Nothing is written (generated splits stay in memory)."""
    from benchmark.data.loader import load_cohort

    cohort = load_cohort(dataset, clinical=clinical, splits=splits, features=features, backbone=backbone,
                         layout=layout, missing_features="drop", columns=columns, generate_splits="memory")
    report.facts["features"] = cohort.provenance["layout_detection"]
    report.facts["feature dims"] = f"every file {cohort.backbone.dim}-d ({backbone})"
    dropped = cohort.provenance["missing_features"]
    if not dropped:
        report.facts["slides without features"] = 0
        return report
    report.facts["slides without features"] = dropped["slides_dropped"]
    if missing_features == "error":
        report.problems.append(f"{dropped['slides_dropped']} slide(s) have no {backbone} feature file, e.g. "
                               f"{dropped['examples'][:3]}; pass --missing-features drop to leave them out")
        return report
    report.warnings.append(f"{dropped['slides_dropped']} slide(s) without a feature file are left out "
                           f"({dropped['samples_dropped']} sample(s))")
    events = cohort.samples["event"]
    rows = []
    for fold, row in zip(cohort.folds, dropped["folds"]):
        val_events = int(events.loc[fold.val].sum()) if fold.val else 0
        rows.append({**row, "val events": val_events})
        report.problems += [f"after dropping slides without features, {p}"
                            for p in _fold_size_problems(fold.k, set(fold.train), set(fold.val), val_events)]
    report.feature_folds = pd.DataFrame(rows)
    return report


def print_report(report: AuditReport) -> None:
    """Print the report card with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"audit: {report.name}" if report.name else "audit"
    facts = Table(title=title, show_header=False)
    for k, v in report.facts.items():
        if k != "column mapping":  # printed as one line below
            facts.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(facts)
    f = report.facts
    console.print(f"clinical table: {report.clinical}")
    console.print(f"splits: {report.splits}")
    console.print(f"columns: {f['column mapping']}")
    console.print(f"labels: {f['events']} events, {f['censored']} censored, event rate {f['event rate']:.3f} "
                  f"({f['patients']} patients)")
    folds = Table(title="folds")
    for c in report.folds.columns:
        folds.add_column(str(c), justify="right")
    for r in report.folds.astype(object).itertuples(index=False):
        folds.add_row(*["" if v is None else str(v) for v in r])
    console.print(folds)
    if report.feature_folds is not None:
        kept = Table(title="folds without the slides that have no feature file")
        for c in report.feature_folds.columns:
            kept.add_column(str(c), justify="right")
        for r in report.feature_folds.itertuples(index=False):
            kept.add_row(*[str(v) for v in r])
        console.print(kept)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    for p in report.problems:
        console.print(f"[red]FAIL:[/red] {p}")
    console.print("[green]OK[/green]: no leakage, every split ID is in the table, every validation split has events"
                  if report.ok
                  else f"[red]{len(report.problems)} problem(s)[/red]")
