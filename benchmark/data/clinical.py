"""Clinical-table reader for MCAT / PORPOISE / CrossFusion label tables.

Accepted input: a CSV (or a zipped CSV, read by pandas without extracting: member names may hold ``../``)
with one row per slide and at least the columns ``case_id, slide_id, survival_months, censorship``
(``censorship`` 1 = censored, 0 = event). Leading ``Unnamed: *`` index columns and omics columns
(``*_rnaseq``, ``*_cnv``, ``*_mut``) are ignored. CrossFusion's COAD table (``case_id`` = slide barcode,
integer months) reads the same way; its patient ID is the 12-character TCGA barcode.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.data.paths import check_slide_ids

REQUIRED_COLUMNS = ("case_id", "slide_id", "survival_months", "censorship")
#: Whole-slide-image file extensions stripped from ``slide_id`` to get the feature-file stem.
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".tiff", ".tif", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".czi")
_OMICS_SUFFIXES = ("_rnaseq", "_cnv", "_mut")
_TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-")


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
) -> pd.DataFrame:
    """Read and validate a clinical table.

    Parameters
    ----------
    path : path to a ``.csv`` or zipped ``.csv.zip``.
    time_column, censorship_column : label columns (e.g. ``survival_months_dss`` for SurvPath's DSS).
    primary_only : drop non-primary slides (``-02Z-`` recurrent tumour etc.); MCAT keeps them.

    Returns
    -------
    DataFrame, one row per slide, columns ``patient_id, case_id, slide_id`` (feature-file stem),
    ``slide_file``, ``time`` (months), ``event`` (1 = event), ``censorship`` (1 = censored), in table order.

    Raises
    ------
    FileNotFoundError, ValueError
        With the file and the problem: missing columns, missing or negative times, censorship not 0/1,
        duplicate slide IDs, slide IDs that are not plain file names (path separators, ``..``, absolute
        paths), an empty table.
    """
    path = Path(path)
    df = _read_table(path, ("case_id", "slide_id", time_column, censorship_column))
    slide_file, stems = _slide_ids(df, path)
    time, cens = _labels(df, path, time_column, censorship_column, slide_file)
    case = df["case_id"].astype(str).str.strip()
    out = pd.DataFrame(
        {
            "patient_id": case.map(patient_of),
            "case_id": case,
            "slide_id": stems,
            "slide_file": slide_file,
            "time": time.astype(float),
            "event": (1 - cens).astype(int),
            "censorship": cens.astype(int),
        }
    ).reset_index(drop=True)
    if primary_only:
        out = out[~out["slide_id"].str.contains(r"^TCGA-\w\w-\w{4}-0[2-9]", regex=True)].reset_index(drop=True)
    return out


def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """The table's rows with the ``required`` columns (index and omics columns left out); each problem names
    the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: clinical table {'is not a file' if path.exists() else 'does not exist'}")
    try:
        df = pd.read_csv(path, usecols=lambda c: c in required or not str(c).endswith(_OMICS_SUFFIXES),
                         low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{path}: could not be read as a CSV table: {exc}") from exc
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed")]]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: missing required column(s) {missing}; a clinical table needs {list(required)} "
            f"(found {list(df.columns)[:12]})"
        )
    if df.empty:
        raise ValueError(f"{path}: the table has no rows")
    for col in ("case_id", "slide_id"):
        if df[col].isna().any():
            raise ValueError(f"{path}: column {col!r} is empty in {int(df[col].isna().sum())} row(s)")
    return df


def _slide_ids(df: pd.DataFrame, path: Path) -> tuple[pd.Series, pd.Series]:
    """``(slide file names, slide IDs)``; unsafe or duplicate slide IDs are errors."""
    slide_file = df["slide_id"].astype(str).str.strip()
    stems = slide_file.map(slide_stem)
    check_slide_ids(stems, path)  # a slide ID becomes a file name: no '..', separators or absolute paths
    dup = stems[stems.duplicated(keep=False)]
    if len(dup):
        raise ValueError(f"{path}: duplicate slide IDs ({dup.nunique()}), e.g. {sorted(set(dup))[:3]}")
    return slide_file, stems


def _labels(df: pd.DataFrame, path: Path, time_column: str, censorship_column: str,
            slide_file: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``(time, censorship)`` as numbers; missing, non-finite or negative times and censorship other than 0/1
    are errors naming a slide."""
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
    cens = pd.to_numeric(df[censorship_column], errors="coerce")
    bad_c = ~cens.isin([0, 1])
    if bad_c.any():
        raise ValueError(
            f"{path}: {censorship_column!r} must be 0 (event) or 1 (censored); {int(bad_c.sum())} row(s) "
            f"hold other values, e.g. {df[censorship_column][bad_c].iloc[0]!r}"
        )
    return time, cens


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
