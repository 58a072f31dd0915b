"""The read-only result layer: read a store once, filter, group into cells.

Tables, comparisons, plots and the report take records from here; none of them opens a file of the store
itself. :class:`Results` holds every record of a store, read once, with the records of an older embedded
synthetic-data version left out and a note saying so (``notes``), so every consumer shows that note.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from benchmark.store.records import ResultStore

#: Fields identifying one cell (one method x cohort x backbone x recipe x selection x seed, all folds).
CELL_FIELDS = ("method", "cohort", "backbone", "recipe", "selection", "seed")


def cell_key(record: Mapping) -> tuple:
    """``(method, cohort, backbone, recipe, selection, seed)`` of a record."""
    return tuple(record.get(f) for f in CELL_FIELDS)


def group_cells(records: Iterable[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by :func:`cell_key`, each group sorted by fold."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[cell_key(r)].append(r)
    return {k: sorted(v, key=fold_order) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def fold_order(record: Mapping) -> tuple[int, int]:
    """``(repeat, fold)`` of a record: one validation fold of repeated cross-validation (repeat 0 for records
    without repeats)."""
    return int(record.get("repeat") or 0), int(record["fold"])


def recorded_n_folds(records: Iterable[Mapping]) -> int:
    """Validation folds a complete cell has: the cohort's fold count as the runner records it in each fold
    record, times the repeats present (0 when no record carries the count)."""
    records = list(records)
    per_repeat = max([int(r["n_folds"]) for r in records if r.get("n_folds")], default=0)
    return per_repeat * max(1, len({int(r.get("repeat") or 0) for r in records}))


def newest_data_records(records: Iterable[dict], among: Iterable[Mapping] | None = None) -> tuple[list[dict], str | None]:
    """Drop the fold records of an older embedded synthetic-data version than the newest one present.

    Numbers from two generator versions are not comparable (the planted signal differs), so a store caught
    half-way through a rerun must not mix them in one table. Records of real data (no synthetic version) are
    kept. ``among`` (default: ``records``) are the records that define the newest version, e.g. the whole store.
    Returns the kept records and a note naming what was left out (None when nothing was).
    """
    records = list(records)

    def version(r: Mapping) -> int | None:
        return (r.get("config") or {}).get("synthetic_version")

    versions = {version(r) for r in (records if among is None else among)} - {None}
    newest = max(versions, default=None)
    kept = [r for r in records if version(r) in (None, newest)]
    if len(kept) == len(records):
        return records, None
    old = ", ".join(str(v) for v in sorted(versions - {newest}))
    return kept, (f"{len(records) - len(kept)} fold record(s) of older synthetic data (version {old}) left out: "
                  f"not comparable with version {newest}; `benchmark run` reruns them.")


def _as_lower_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [str(v).lower() for v in ([value] if isinstance(value, str) else value)]


@dataclass(frozen=True)
class Results:
    """Every record of one result store, read once (read-only).

    Attributes
    ----------
    root : Path
        The store's root folder (it holds ``cells/``).
    records : tuple of dict
        Every record (``ok`` and ``error``) of the newest synthetic-data version (and every real-data record),
        each with ``_path`` added.
    notes : tuple of str
        What was left out while reading (older data versions, unreadable records), for table footers.
    """

    root: Path
    records: tuple[dict, ...]
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def open(cls, root: str | Path) -> "Results":
        """Read the store under ``root``; a clear error when there is none."""
        root = Path(root)
        if not (root / "cells").is_dir():
            raise FileNotFoundError(f"{root}: no result store here (missing {root / 'cells'}); "
                                    "run `python -m benchmark run` first")
        everything, unreadable = ResultStore(root).load_all()
        kept, note = newest_data_records(everything)
        notes = [n for n in (note,) if n]
        if unreadable:
            notes.append(f"{len(unreadable)} unreadable record(s) left out (first: {unreadable[0]}); "
                         "`benchmark run` redoes them.")
        return cls(root, tuple(kept), tuple(notes))

    def select(self, status: str | None = "ok", *, method=None, cohort=None, backbone=None, **filters) -> list[dict]:
        """Records matching ``status`` and the filters (a value, or a list of accepted values; None = any).

        ``method``, ``cohort`` and ``backbone`` match case-insensitively. Sorted by cell, then fold.
        """
        out = ResultStore.select(list(self.records), status, method=_as_lower_list(method),
                                 cohort=_as_lower_list(cohort), backbone=_as_lower_list(backbone), **filters)
        out.sort(key=lambda r: (tuple(str(r.get(f)) for f in CELL_FIELDS), fold_order(r)))
        return out

    def cells(self, status: str | None = "ok", **filters) -> dict[tuple, list[dict]]:
        """The selected records grouped by :func:`cell_key`."""
        return group_cells(self.select(status, **filters))

    def cell(self, method: str, cohort: str, **filters) -> list[dict]:
        """The ``ok`` fold records of exactly one cell; a clear error when none or several cells match."""
        groups = self.cells(method=method, cohort=cohort, **filters)
        given = "".join(f" {k}={v!r}" for k, v in filters.items() if v is not None)
        if not groups:
            raise FileNotFoundError(
                f"{self.root}: no successful records for method={method!r} cohort={cohort!r}{given}")
        if len(groups) > 1:
            options = "; ".join(f"--backbone {k[2]} --recipe {k[3]} --selection {k[4]} --seed {k[5]}" for k in groups)
            raise ValueError(f"{self.root}: several cells match {method}/{cohort}; choose one with {options}")
        return next(iter(groups.values()))


def read_records(results: str | Path | Results, status: str | None = "ok", **filters) -> list[dict]:
    """Shorthand for ``Results.open(results).select(status, **filters)`` (accepts an open :class:`Results`)."""
    view = results if isinstance(results, Results) else Results.open(results)
    return view.select(status, **filters)


def select_cell(results: str | Path | Results, method: str, cohort: str, **filters) -> list[dict]:
    """Shorthand for ``Results.open(results).cell(method, cohort, **filters)``."""
    view = results if isinstance(results, Results) else Results.open(results)
    return view.cell(method, cohort, **filters)
