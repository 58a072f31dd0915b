"""Cohort registry, read from the data files ``datasets/*.toml`` (tables ``[cohorts.<name>]``).

Each cohort carries its TCGA project(s) and the facts of its real label table (patients, slides, events,
censoring rate, follow-up), which the synthetic generator mirrors, and optionally where its real table and
splits lie inside a directory laid out like ``shared/data/tcga_clinical/``.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from benchmark.naming import did_you_mean

#: Folder of the cohort / backbone definition files (data, not code).
DATASETS_DIR = Path(__file__).resolve().parents[2] / "datasets"
#: Environment variable naming a directory laid out like ``shared/data/tcga_clinical`` (real tables, splits).
REAL_TABLES_ENV = "MIL_BENCHMARK_TCGA_TABLES"


def load_definitions(section: str) -> dict[str, dict]:
    """Merge the ``[<section>.<name>]`` tables of every ``datasets/*.toml`` file (sorted by file name)."""
    merged: dict[str, dict] = {}
    for path in sorted(DATASETS_DIR.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from exc
        for name, body in data.get(section, {}).items():
            if name.lower() in merged:
                raise ValueError(f"{path}: {section[:-1]} {name!r} is defined twice")
            merged[name.lower()] = dict(body, _file=str(path))
    return merged


@dataclass(frozen=True)
class Cohort:
    """One cohort's definition and the facts of its real table (times in months)."""

    name: str
    title: str
    projects: tuple[str, ...]
    patients: int
    slides: int
    events: int
    censoring: float
    time_min: float
    time_median: float
    time_max: float
    real_clinical: str | None = None
    real_splits: str | None = None
    table_source: str = ""

    def real_paths(self, tables_dir: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
        """Real clinical table and split folder inside ``tables_dir`` (default ``$MIL_BENCHMARK_TCGA_TABLES``)."""
        base = tables_dir or os.environ.get(REAL_TABLES_ENV)
        if not base:
            raise FileNotFoundError(
                f"no real-table directory given for cohort {self.name!r}: pass one or set ${REAL_TABLES_ENV}"
            )
        if not self.real_clinical:
            raise FileNotFoundError(f"cohort {self.name!r} declares no real clinical table")
        base = Path(base)
        return base / self.real_clinical, (base / self.real_splits) if self.real_splits else None


@lru_cache(maxsize=1)
def _cohorts() -> dict[str, Cohort]:
    out = {}
    for name, body in load_definitions("cohorts").items():
        try:
            out[name] = Cohort(
                name=name,
                title=body.get("title", name),
                projects=tuple(body.get("projects", ())),
                patients=int(body["patients"]),
                slides=int(body["slides"]),
                events=int(body["events"]),
                censoring=float(body["censoring"]),
                time_min=float(body.get("time_min", 0.0)),
                time_median=float(body["time_median"]),
                time_max=float(body["time_max"]),
                real_clinical=body.get("real_clinical"),
                real_splits=body.get("real_splits"),
                table_source=body.get("table_source", ""),
            )
        except KeyError as exc:
            raise ValueError(f"{body['_file']}: cohort {name!r} lacks field {exc.args[0]!r}") from None
    return out


def cohort_names() -> list[str]:
    """Registered cohort names, in file order."""
    return list(_cohorts())


def get_cohort(name: str) -> Cohort:
    """The cohort named ``name`` (case-insensitive); an unknown name raises a did-you-mean error."""
    try:
        return _cohorts()[name.lower()]
    except KeyError:
        raise did_you_mean(name, cohort_names(), "dataset") from None


def resolve_cohorts(selection: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"all"`` or a comma list (or sequence) of names -> validated cohort names, in order."""
    if isinstance(selection, str):
        if selection.strip().lower() == "all":
            return cohort_names()
        selection = [s for s in selection.split(",") if s.strip()]
    return [get_cohort(s.strip()).name for s in selection]
