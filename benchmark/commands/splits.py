"""``python -m benchmark splits``: generate a cohort's patient-level k-fold splits, write them where the user
says (MCAT ``splits_{k}.csv`` files, the format ``run --splits`` and ``audit --splits`` read) and print them."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from benchmark.settings.options import SETTINGS, add_arguments

    p = subparsers.add_parser(
        "splits", help="generate patient-level k-fold splits (stratified by event and time bin, seeded) into a folder",
        description="Patient-level k-fold cross-validation splits, stratified by event and time bin "
                    "(scikit-learn StratifiedKFold, shuffled with --seed), written to --out as splits_{k}.csv "
                    "with a splits_info.json that records the command and seed; pass the folder to run / audit "
                    "with --splits. A folder that already holds split files is refused unless --overwrite.",
    )
    p.add_argument("--dataset", required=True, help="cohort name (registered, e.g. in a --registry file)")
    p.add_argument("--clinical", type=Path, default=None,
                   help="clinical table (.csv or .csv.zip; default <data root>/<cohort>/clinical.csv)")
    p.add_argument("--data-root", type=Path, default=None, help="data root holding <cohort>/clinical.csv")
    add_arguments(p, {"columns": SETTINGS["columns"]}, ("data",))
    p.add_argument("--out", type=Path, required=True, help="folder to write splits_{k}.csv into")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace the split files already in --out")
    p.set_defaults(func=run)


def _clinical(args: argparse.Namespace, cohort) -> Path:
    if args.clinical is not None:
        return args.clinical
    if args.data_root is None:
        raise ValueError("--clinical: give the clinical table (or --data-root holding <cohort>/clinical.csv)")
    cdir = args.data_root / cohort.name
    return (cdir if cdir.is_dir() else args.data_root) / "clinical.csv"


def _check_out(out: Path, overwrite: bool) -> None:
    """``--out`` may not be a file, nor silently lose split files it holds."""
    from benchmark.data.splits import split_files

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is not a directory")
    try:
        existing = split_files(out)
    except ValueError:  # a gap in k: existing files all the same
        existing = sorted(out.glob("splits_*.csv"))
    if existing and not overwrite:
        raise ValueError(f"--out {out}: already holds {len(existing)} split file(s); pass --overwrite to replace them")
    for path in sorted(out.glob("splits_*.csv")) if overwrite and out.is_dir() else ():
        path.unlink()


def print_folds(folds, patients, out: Path, seed: int) -> None:
    """The folds as a table: train / val patients and validation events."""
    from rich.console import Console
    from rich.table import Table

    from benchmark.data.splits import GENERATOR

    table = Table(title=f"splits: {len(folds)} folds, seed {seed}, {GENERATOR}")
    for col in ("fold", "train patients", "val patients", "val events", "val event rate"):
        table.add_column(col, justify="right")
    for k, (train, val) in enumerate(folds):
        events = patients.loc[val, "event"]
        table.add_row(str(k), str(len(train)), str(len(val)), str(int(events.sum())), f"{events.mean():.3f}")
    console = Console()
    console.print(table)
    console.print(f"wrote {len(folds)} split file(s) to {out} (splits_0.csv .. splits_{len(folds) - 1}.csv, "
                  f"splits_info.json); use them with --splits {out}")


def run(args: argparse.Namespace) -> int:
    from benchmark.data.clinical import parse_columns, patient_table, read_clinical
    from benchmark.data.cohorts import get_cohort
    from benchmark.data.splits import stratified_patient_folds, write_splits

    cohort = get_cohort(args.dataset)
    if args.folds < 2:
        raise ValueError(f"--folds: needs at least 2 folds, got {args.folds}")
    clinical = _clinical(args, cohort)
    columns = parse_columns(args.columns if args.columns is not None else (dict(cohort.columns) or None))
    patients = patient_table(read_clinical(clinical, columns=columns), source=clinical)
    folds = stratified_patient_folds(patients[["time", "event"]], args.folds, args.seed)
    _check_out(args.out, args.overwrite)
    info = {"command": "benchmark splits", "seed": args.seed, "clinical": str(Path(clinical).resolve()),
            "columns": None if columns is None or columns.is_default else columns.spec()}
    write_splits(args.out, folds, info)
    print_folds(folds, patients, args.out, args.seed)
    return 0
