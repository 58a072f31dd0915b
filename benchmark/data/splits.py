"""MCAT-format split files: read, generate (patient-level, stratified), write.

Format (``splits_{k}.csv``, k = 0..K-1): a pandas index column, then ``train`` and ``val`` columns of IDs
(patient IDs; CrossFusion's COAD lists slide barcodes), the shorter column blank-padded.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

_SPLIT_FILE = re.compile(r"^splits_(\d+)\.csv$")


def split_files(directory: str | os.PathLike) -> list[Path]:
    """``splits_{k}.csv`` files of a folder, sorted by k (must be 0..K-1 without gaps)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = {int(m.group(1)): directory / f for f in os.listdir(directory) if (m := _SPLIT_FILE.match(f))}
    ks = sorted(found)
    if ks and ks != list(range(len(ks))):
        raise ValueError(f"{directory}: split files must be splits_0.csv .. splits_{len(ks) - 1}.csv, found k = {ks}")
    return [found[k] for k in ks]


def read_split_file(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)`` of one MCAT split file (blank padding dropped)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: not a split CSV: {exc}") from exc
    missing = [c for c in ("train", "val") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: split file lacks column(s) {missing} (found {list(df.columns)})")
    col = lambda c: [s.strip() for s in df[c] if s.strip()]  # noqa: E731
    return col("train"), col("val")


def read_splits(directory: str | os.PathLike) -> list[tuple[list[str], list[str]]]:
    """Every fold of a split folder, as ``(train_ids, val_ids)``."""
    files = split_files(directory)
    if not files:
        raise FileNotFoundError(f"no splits_{{k}}.csv files in {directory}")
    return [read_split_file(f) for f in files]


def write_splits(directory: str | os.PathLike, folds: list[tuple[list[str], list[str]]]) -> Path:
    """Write MCAT-format ``splits_{k}.csv`` files (blank-padded) into ``directory`` atomically per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for k, (train, val) in enumerate(folds):
        n = max(len(train), len(val))
        df = pd.DataFrame({"train": list(train) + [""] * (n - len(train)), "val": list(val) + [""] * (n - len(val))})
        tmp = directory / f".splits_{k}.csv.{os.getpid()}.tmp"
        df.to_csv(tmp)
        os.replace(tmp, directory / f"splits_{k}.csv")
    return directory


def stratified_patient_folds(
    patients: pd.DataFrame, n_folds: int = 5, seed: int = 0, n_time_bins: int = 4
) -> list[tuple[list[str], list[str]]]:
    """Patient-level K-fold splits stratified by event and time bin.

    Parameters
    ----------
    patients : DataFrame indexed by patient ID with ``time`` and ``event`` (one row per patient)
    n_folds : number of folds (the val folds partition the patients)
    seed : shuffling seed
    n_time_bins : quantile bins of all patients' times used for stratification (coarsened when a stratum
        has fewer than ``n_folds`` patients)

    Returns
    -------
    list of (train_ids, val_ids), IDs sorted.
    """
    ids = np.asarray(patients.index.astype(str))
    if len(ids) < n_folds:
        raise ValueError(f"cannot make {n_folds} folds from {len(ids)} patients")
    if len(set(ids)) != len(ids):
        raise ValueError("patient IDs must be unique to split by patient")
    times = patients["time"].to_numpy(dtype=float)
    events = patients["event"].to_numpy(dtype=int)
    strata = np.zeros(len(ids), dtype=int)
    for nb in range(n_time_bins, 0, -1):
        tbin = pd.qcut(pd.Series(times).rank(method="first"), q=nb, labels=False).to_numpy() if nb > 1 else 0
        candidate = events * nb + tbin
        counts = np.bincount(candidate)
        if counts[counts > 0].min() >= n_folds:
            strata = candidate
            break
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for tr, va in skf.split(ids, strata):
        folds.append((sorted(ids[tr].tolist()), sorted(ids[va].tolist())))
    return folds


def repeated_folds(samples: pd.DataFrame, n_folds: int, repeat: int) -> list[tuple[list[str], list[str]]]:
    """Folds of repeat ``repeat`` (>= 1) of repeated cross-validation, as sample IDs.

    Patient-level folds stratified by event and time bin (:func:`stratified_patient_folds` with seed
    ``repeat``), mapped to the samples: a patient's samples (slides, with ``unit="slide"``) share one side.
    Repeat 0 is the cohort's own split files, never this function.
    """
    if repeat < 1:
        raise ValueError(f"repeat {repeat}: repeat 0 is the cohort's split files; generated repeats start at 1")
    patient_of = samples["patient_id"].astype(str)
    patients = samples.assign(patient_id=patient_of).groupby("patient_id")[["time", "event"]].first()
    members = {p: sorted(ids.astype(str)) for p, ids in patient_of.groupby(patient_of).groups.items()}
    return [
        ([s for p in train for s in members[p]], [s for p in val for s in members[p]])
        for train, val in stratified_patient_folds(patients, n_folds, seed=repeat)
    ]


def straddling_patients(samples: pd.DataFrame, train: list[str], val: list[str]) -> list[str]:
    """Patients with samples on both sides of a fold (a leak when samples are slides)."""
    patient_of = samples["patient_id"].astype(str)
    return sorted(set(patient_of[list(train)]) & set(patient_of[list(val)]))
