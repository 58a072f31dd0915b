"""Clinical-table reader for MCAT / PORPOISE / CrossFusion label tables.

Accepted input: a CSV (or a zipped CSV, read by pandas without extracting: member names may hold ``../``)
with one row per slide and at least the columns ``case_id, slide_id, survival_months, censorship``
(``censorship`` 1 = censored, 0 = event). Leading ``Unnamed: *`` index columns and omics columns
(``*_rnaseq``, ``*_cnv``, ``*_mut``) are ignored. CrossFusion's COAD table (``case_id`` = slide barcode,
integer months) reads the same way; its patient ID is the 12-character TCGA barcode.

Any other table is read through a :class:`ColumnMap` that names its columns and says what they mean: the patient,
the slide, the follow-up time and its unit, and **either** ``event`` (1 = event observed) **or** ``censorship``
(1 = censored). ``--columns patient=patient,slide=slide,time=os_months,event=dead,unit=months`` on the command
line, a ``[cohorts.<name>.columns]`` table in a registry file, or ``columns = "..."`` in an experiment file.
"""
from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.data.paths import check_slide_ids
from benchmark.naming import did_you_mean

REQUIRED_COLUMNS = ("case_id", "slide_id", "survival_months", "censorship")
#: Whole-slide-image file extensions stripped from ``slide_id`` to get the feature-file stem.
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".tiff", ".tif", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".czi")
_OMICS_SUFFIXES = ("_rnaseq", "_cnv", "_mut")
_TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-")


#: Months per unit of a clinical table's times (times are kept in months; a year is 12 months, a day 12/365.25).
TIME_UNITS = {"months": 1.0, "days": 12 / 365.25, "years": 12.0}
#: Words in a column name that mean "1 = the event happened" / "1 = censored (still alive)".
EVENT_WORDS = ("dead", "death", "died", "deceased", "event", "events", "status", "vital", "os", "dss", "pfi")
CENSOR_WORDS = ("censor", "censored", "censorship", "censoring", "alive", "living", "survived")


@dataclass(frozen=True)
class ColumnMap:
    """The columns of a clinical table and what they mean.

    Exactly one of ``event`` (1 = event observed, 0 = censored) and ``censorship`` (1 = censored, 0 = event) is
    set; ``unit`` is the unit of ``time`` (``months``, ``days`` or ``years``; times are converted to months).
    The defaults are the MCAT / PORPOISE columns.
    """

    patient: str = "case_id"
    slide: str = "slide_id"
    time: str = "survival_months"
    event: str | None = None
    censorship: str | None = "censorship"
    unit: str = "months"

    def __post_init__(self) -> None:
        if (self.event is None) == (self.censorship is None):
            raise ValueError("--columns: give exactly one of event=COLUMN (1 = event observed) and "
                             "censorship=COLUMN (1 = censored)")
        if self.unit not in TIME_UNITS:
            raise ValueError(f"--columns unit={self.unit}: must be one of {', '.join(TIME_UNITS)}")

    @property
    def is_default(self) -> bool:
        return self == ColumnMap()

    def spec(self) -> str:
        """Canonical ``key=value,...`` text (what a record stores and ``--columns`` takes)."""
        label = f"event={self.event}" if self.event is not None else f"censorship={self.censorship}"
        return f"patient={self.patient},slide={self.slide},time={self.time},{label},unit={self.unit}"

    def describe(self) -> str:
        """One readable line: which column means what."""
        label = (f"event <- {self.event!r} (1 = event observed)" if self.event is not None
                 else f"censorship <- {self.censorship!r} (1 = censored)")
        return (f"patient <- {self.patient!r}, slide <- {self.slide!r}, time <- {self.time!r} ({self.unit}), "
                + label)

    def warnings(self) -> list[str]:
        """A column whose name contradicts its declared meaning (``dead`` declared as censorship, ...)."""
        column, declared = (self.event, "event") if self.event is not None else (self.censorship, "censorship")
        words = [w for w in re.split(r"[^a-z0-9]+", column.lower()) if w]
        if declared == "censorship" and any(w in EVENT_WORDS for w in words):
            return [f"column {column!r} is declared as censorship (1 = censored), but its name suggests 1 = event "
                    f"(died); if 1 means the event happened, map it as event={column}"]
        if declared == "event" and any(w.startswith(CENSOR_WORDS) for w in words):
            return [f"column {column!r} is declared as event (1 = event observed), but its name suggests 1 = "
                    f"censored; if 1 means censored, map it as censorship={column}"]
        return []


def parse_columns(spec, option: str = "--columns") -> ColumnMap | None:
    """``--columns`` text (``patient=..,slide=..,time=..,event=..|censorship=..,unit=..``), a mapping (registry
    table, experiment file), a :class:`ColumnMap` or None (None: the MCAT columns). Keys not given keep the
    MCAT names; giving ``event`` drops the default ``censorship``."""
    if spec is None or isinstance(spec, ColumnMap):
        return spec
    if isinstance(spec, str):
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not value.strip():
                raise ValueError(f"{option} {spec}: {part!r} is not KEY=COLUMN")
            items[key.strip().lower()] = value.strip()
    else:
        items = {str(k).lower(): str(v) for k, v in dict(spec).items()}
    known = [f.name for f in dataclasses.fields(ColumnMap)]
    for key in items:
        if key not in known:
            raise ValueError(f"{option}: {did_you_mean(key, known, 'column key')}")
    if "event" in items:
        items.setdefault("censorship", None)
    try:
        return ColumnMap(**items)
    except ValueError as exc:
        raise ValueError(str(exc).replace("--columns", option, 1)) from None


def slide_stem(slide_file: str) -> str:
    """Feature-file stem of a slide: the file name minus its WSI extension (a suffix, not ``rstrip``)."""
    for ext in SLIDE_EXTENSIONS:
        if slide_file.lower().endswith(ext):
            return slide_file[: -len(ext)]
    return slide_file


def patient_of(case_id: str) -> str:
    """Patient ID of a ``case_id``: the 12-character TCGA barcode when ``case_id`` is a longer TCGA slide
    barcode (CrossFusion COAD), else ``case_id`` itself."""
    m = _TCGA_PATIENT.match(case_id)
    return m.group(1) if m and len(case_id) > 12 else case_id


def read_clinical(
    path: str | os.PathLike,
    *,
    time_column: str = "survival_months",
    censorship_column: str = "censorship",
    primary_only: bool = False,
    columns: ColumnMap | None = None,
) -> pd.DataFrame:
    """Read and validate a clinical table.

    Parameters
    ----------
    path : path to a ``.csv`` or zipped ``.csv.zip``.
    time_column, censorship_column : label columns (e.g. ``survival_months_dss`` for SurvPath's DSS).
    primary_only : drop non-primary slides (``-02Z-`` recurrent tumour etc.); MCAT keeps them.
    columns : the table's columns and their meaning (overrides ``time_column`` / ``censorship_column``).

    Returns
    -------
    DataFrame, one row per slide, columns ``patient_id, case_id, slide_id`` (feature-file stem),
    ``slide_file``, ``time`` (months), ``event`` (1 = event), ``censorship`` (1 = censored), in table order.

    Raises
    ------
    FileNotFoundError, ValueError
        With the file and the problem: missing columns, missing or negative times, event / censorship not 0/1,
        duplicate slide IDs, slide IDs that are not plain file names (path separators, ``..``, absolute
        paths), an empty table.
    """
    path = Path(path)
    cmap = columns if columns is not None else ColumnMap(time=time_column, censorship=censorship_column)
    df = _read_table(path, (cmap.patient, cmap.slide, cmap.time, cmap.event or cmap.censorship),
                     mapped=columns is not None)
    slide_file, stems = _slide_ids(df[cmap.slide], path)
    time, cens = _labels(df, path, cmap, slide_file)
    case = df[cmap.patient].astype(str).str.strip()
    out = pd.DataFrame(
        {
            "patient_id": case.map(patient_of),
            "case_id": case,
            "slide_id": stems,
            "slide_file": slide_file,
            "time": time.astype(float) * TIME_UNITS[cmap.unit],
            "event": (1 - cens).astype(int),
            "censorship": cens.astype(int),
        }
    ).reset_index(drop=True)
    if primary_only:
        out = out[~out["slide_id"].str.contains(r"^TCGA-\w\w-\w{4}-0[2-9]", regex=True)].reset_index(drop=True)
    return out


def _read_table(path: Path, required: tuple[str, ...], mapped: bool = False) -> pd.DataFrame:
    """The table's rows with the ``required`` columns (index and omics columns left out); each problem names
    the file. ``mapped``: the columns come from a column mapping (a missing one is named with a did-you-mean)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: clinical table {'is not a file' if path.exists() else 'does not exist'}")
    try:
        df = pd.read_csv(path, usecols=lambda c: c in required or not str(c).endswith(_OMICS_SUFFIXES),
                         low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{path}: could not be read as a CSV table: {exc}") from exc
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed")]]
    missing = [c for c in dict.fromkeys(required) if c not in df.columns]
    if missing and mapped:
        found = [str(c) for c in df.columns]
        hint = str(did_you_mean(missing[0], found, "column")).split(" Known columns")[0]
        raise ValueError(f"{path}: --columns: {hint} The table's columns: {', '.join(found[:12])}")
    if missing:
        raise ValueError(
            f"{path}: missing required column(s) {missing}; a clinical table needs {list(required)} "
            f"(found {list(df.columns)[:12]}); name other columns with --columns"
        )
    if df.empty:
        raise ValueError(f"{path}: the table has no rows")
    for col in required[:2]:
        if df[col].isna().any():
            raise ValueError(f"{path}: column {col!r} is empty in {int(df[col].isna().sum())} row(s)")
    return df


def _slide_ids(column: pd.Series, path: Path) -> tuple[pd.Series, pd.Series]:
    """``(slide file names, slide IDs)``; unsafe or duplicate slide IDs are errors."""
    slide_file = column.astype(str).str.strip()
    stems = slide_file.map(slide_stem)
    check_slide_ids(stems, path)  # a slide ID becomes a file name: no '..', separators or absolute paths
    dup = stems[stems.duplicated(keep=False)]
    if len(dup):
        raise ValueError(f"{path}: duplicate slide IDs ({dup.nunique()}), e.g. {sorted(set(dup))[:3]}")
    return slide_file, stems


def _labels(df: pd.DataFrame, path: Path, cmap: ColumnMap, slide_file: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``(time, censorship)`` as numbers; missing, non-finite or negative times and event / censorship other
    than 0/1 are errors naming a slide."""
    time_column = cmap.time
    time = pd.to_numeric(df[time_column], errors="coerce")
    bad_time = time.isna() | ~np.isfinite(time.fillna(0).to_numpy(dtype=float))
    if bad_time.any():
        raise ValueError(
            f"{path}: missing or non-numeric {time_column!r} in {int(bad_time.sum())} row(s), "
            f"e.g. slide {slide_file[bad_time].iloc[0]!r}"
        )
    if (time < 0).any():
        neg = time < 0
        raise ValueError(
            f"{path}: negative {time_column!r} in {int(neg.sum())} row(s), e.g. slide "
            f"{slide_file[neg].iloc[0]!r} has {time[neg].iloc[0]}"
        )
    column = cmap.event or cmap.censorship
    meaning = "1 (event observed) or 0 (censored)" if cmap.event else "0 (event) or 1 (censored)"
    values = pd.to_numeric(df[column], errors="coerce")
    bad = ~values.isin([0, 1])
    if bad.any():
        raise ValueError(
            f"{path}: {column!r} must be {meaning}; {int(bad.sum())} row(s) hold other values, "
            f"e.g. {_plain(df[column][bad].iloc[0])!r}"
        )
    return time, (1 - values) if cmap.event else values


def _plain(value):
    """A table value as a plain Python value (``2``, not ``np.int64(2)``, in messages)."""
    return value.item() if isinstance(value, np.generic) else value


def patient_table(slides: pd.DataFrame, *, source: object = "") -> pd.DataFrame:
    """One row per patient, indexed by ``patient_id``: ``case_id``, ``slide_ids`` (tuple, table order),
    ``time``, ``event``, ``censorship``. MCAT silently keeps the first row's labels; labels that disagree
    between a patient's slides are an error naming the patient (none of the real tables has any)."""
    first = slides.drop_duplicates("patient_id", keep="first").set_index("patient_id")
    check = slides.groupby("patient_id", sort=False).agg(t=("time", "nunique"), c=("censorship", "nunique"))
    bad = check[(check["t"] > 1) | (check["c"] > 1)]
    if len(bad):
        raise ValueError(
            f"{source}: {len(bad)} patient(s) have different survival labels on different slides, "
            f"e.g. {bad.index[0]!r}"
        )
    first["slide_ids"] = slides.groupby("patient_id", sort=False)["slide_id"].agg(tuple)
    return first[["case_id", "slide_ids", "time", "event", "censorship"]]
