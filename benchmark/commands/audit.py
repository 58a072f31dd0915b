"""``python -m benchmark audit``: leakage audit and report card of a cohort's table and splits."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "audit", help="check a cohort's clinical table and splits for leakage and missing IDs",
        description="Report card (patients, slides, events, censoring, follow-up, events per fold) and checks. "
                    "Exits 1 when a patient is in train and val of a fold, when split IDs are missing from the "
                    "table, when a validation split is empty or has no events, or (with --features) when slides "
                    "have no feature file and --missing-features is error. Exits 2 when a feature file's dim is not "
                    "the backbone's. Without split files the folds `splits` would generate are audited in memory; "
                    "the audit writes nothing.",
    )
    p.add_argument("--dataset", required=True, help="cohort name (blca, brca, coad, gbmlgg, luad, ucec)")
    p.add_argument("--clinical", type=Path, help="clinical table (MCAT format, .csv or .csv.zip)")
    p.add_argument("--splits", type=Path, help="folder of splits_{k}.csv")
    p.add_argument("--data-root", type=Path,
                   help="data root with <cohort>/clinical.csv and splits/ (default: synthetic demo cohorts)")
    p.add_argument("--real-tables", type=Path,
                   help="folder laid out like shared/data/tcga_clinical: use the cohort's real table and splits "
                        "(default $MIL_BENCHMARK_TCGA_TABLES when --real-tables is given without --clinical)")
    from benchmark.choices import LAYOUT_CHOICES, MISSING_FEATURES
    from benchmark.settings.options import SETTINGS, add_arguments

    p.add_argument("--features", nargs="+", action="extend", default=None, metavar="[MAGx=]DIR",
                   help="also check the feature files (as in run): one folder or 20x=DIR 10x=DIR 5x=DIR")
    p.add_argument("--backbone", default=None,
                   help="backbone of the feature files; required with --features unless exactly one registered "
                        "backbone has the files' dim and is named in the folder's path (then it is printed)")
    add_arguments(p, {"columns": SETTINGS["columns"]}, ("data",))
    p.add_argument("--layout", default="auto", choices=LAYOUT_CHOICES, help="feature layout (default auto)")
    p.add_argument("--missing-features", default="error", choices=MISSING_FEATURES,
                   help="slides without a feature file are a problem (error) or are left out, with the folds "
                        "checked again without them (drop)")
    p.set_defaults(func=run)


def _table_and_splits(args: argparse.Namespace, cohort) -> tuple[Path, Path | None]:
    """The clinical table and split folder the audit reads (None: no split files, generated in memory)."""
    clinical, splits = args.clinical, args.splits
    if clinical is None and args.real_tables is not None:
        clinical, real_splits = cohort.real_paths(args.real_tables)
        splits = splits or real_splits
    if clinical is None:
        if args.data_root is not None:
            root = args.data_root
        else:
            from benchmark.data.synth import ensure_synthetic

            root = ensure_synthetic("demo", cohorts=(cohort.name,), backbones=())
        cdir = root / cohort.name if (root / cohort.name).is_dir() else root
        clinical = cdir / "clinical.csv"
    if splits is None:  # the folder the loader would use, when it holds split files
        from benchmark.data.splits import split_files

        beside = Path(clinical).parent / "splits"
        splits = beside if split_files(beside) else None
    return Path(clinical), splits


def audit_backbone(args: argparse.Namespace) -> str:
    """``--backbone``, or with ``--features`` and no ``--backbone`` the inferred one (printed), or an error."""
    if args.backbone is not None or not args.features:
        return args.backbone or "resnet50"
    from benchmark.data.loader import infer_backbone

    name, how = infer_backbone(args.features)
    print(how)
    return name


def run(args: argparse.Namespace) -> int:
    from benchmark.data.audit import audit, print_report
    from benchmark.data.cohorts import get_cohort

    cohort = get_cohort(args.dataset)
    columns = args.columns if args.columns is not None else (dict(cohort.columns) or None)
    clinical, splits = _table_and_splits(args, cohort)
    backbone = audit_backbone(args)
    report = audit(clinical, splits, name=cohort.name, columns=columns, splits_given=args.splits is not None)
    if args.features:
        from benchmark.data.audit import audit_features

        audit_features(report, cohort.name, clinical, splits, features=args.features, backbone=backbone,
                       layout=args.layout, missing_features=args.missing_features, columns=columns)
    print_report(report)
    return 0 if report.ok else 1
