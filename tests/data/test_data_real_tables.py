"""Real MCAT / PORPOISE / CrossFusion tables and splits (../shared; skipped when absent)."""
import numpy as np
import pandas as pd
import pytest

from benchmark.data.audit import audit
from benchmark.data.clinical import patient_table, read_clinical
from benchmark.data.cohorts import get_cohort
from benchmark.data.labels import assign_bins, quantile_edges
from benchmark.data.splits import read_splits

PATIENTS = {"blca": 373, "brca": 956, "gbmlgg": 569, "luad": 453, "ucec": 480}


@pytest.mark.parametrize("name", sorted(PATIENTS))
def test_patient_counts_and_splits(real_tables, name):
    clinical, splits = get_cohort(name).real_paths(real_tables)
    patients = patient_table(read_clinical(clinical))
    assert len(patients) == PATIENTS[name]
    folds = read_splits(splits)
    assert len(folds) == 5
    vals = [set(v) for _, v in folds]
    assert set().union(*vals) == set(patients.index)  # the 5 val folds partition the cohort
    assert sum(map(len, vals)) == len(patients)
    assert all(not set(t) & set(v) for t, v in folds)


@pytest.mark.parametrize("name", ["blca", "brca", "luad", "ucec"])
def test_mcat_rule_reproduces_disc_label(real_tables, name):
    table = real_tables / "derived" / "labels" / f"tcga_{name}_labels.csv"
    patients = patient_table(read_clinical(table))
    edges = quantile_edges(patients["time"], patients["event"], 4)
    ours = assign_bins(patients["time"], edges)
    theirs = pd.read_csv(table).drop_duplicates("case_id").set_index("case_id").loc[patients.index, "disc_label"]
    assert np.array_equal(ours, theirs.to_numpy(dtype=int))
    # and equals pandas' cut with MCAT's left-closed intervals
    cut = pd.cut(patients["time"], bins=edges, labels=False, right=False, include_lowest=True)
    assert np.array_equal(ours, cut.to_numpy())
    if name == "blca":
        assert np.allclose(edges[1:4], [7.62, 13.57, 21.85], atol=5e-3)
        assert edges[0] == pytest.approx(0.49 - 1e-6) and edges[-1] == pytest.approx(163.17 + 1e-6)


def test_zipped_tables_with_traps(real_tables):
    # zip members named ../..., two Unnamed index columns, omics columns, a -02Z slide (MCAT LUAD has one)
    luad_cf = read_clinical(real_tables / "CrossFusion/data/tcga_luad_all_clean.csv.zip")
    assert list(luad_cf.columns) == ["patient_id", "case_id", "slide_id", "slide_file", "time", "event", "censorship"]
    assert (len(luad_cf), luad_cf["patient_id"].nunique()) == (507, 444)
    assert not luad_cf["slide_id"].str.endswith(".svs").any()
    brca = read_clinical(real_tables / "PORPOISE/datasets_csv_mutsig/tcga_brca_all_clean.csv.zip")
    assert brca["patient_id"].nunique() == 956
    ucec = read_clinical(real_tables / "derived/labels/tcga_ucec_labels.csv")
    assert ucec["slide_id"].str.contains("-02Z-").sum() == 1
    assert read_clinical(real_tables / "derived/labels/tcga_ucec_labels.csv", primary_only=True).shape[0] == 538


def test_crossfusion_coad_slide_level_table(real_tables):
    coad = read_clinical(real_tables / "CrossFusion/data/tcga_coad_all_clean.csv")
    assert len(coad) == 424 and coad["patient_id"].nunique() == 416
    assert coad["patient_id"].str.len().eq(12).all()
    assert (coad["time"] == coad["time"].round()).all()  # integer months
    report = audit(real_tables / "CrossFusion/data/tcga_coad_all_clean.csv", real_tables / "CrossFusion/data/splits/tcga_coad")
    assert report.ok  # slide-barcode splits map to patients without a leak
    assert report.warnings  # but the val folds do not cover every row


def test_audit_flags_crossfusion_luad_missing_patients(real_tables):
    bad = audit(real_tables / "CrossFusion/data/tcga_luad_all_clean.csv.zip", real_tables / "MCAT/splits/5foldcv/tcga_luad")
    assert not bad.ok and "9 split ID(s)" in bad.problems[0]
    assert bad.folds["missing"].eq(9).all()
    good = audit(real_tables / "derived/labels/tcga_blca_labels.csv", real_tables / "MCAT/splits/5foldcv/tcga_blca")
    assert good.ok and good.facts["patients"] == 373 and good.facts["events"] == 169
    assert good.folds["val events"].sum() == 169


def test_audit_cli_exit_codes(real_tables, capsys):
    from benchmark.cli import main

    rc = main(["audit", "--dataset", "luad", "--clinical", str(real_tables / "CrossFusion/data/tcga_luad_all_clean.csv.zip"),
               "--splits", str(real_tables / "CrossFusion/data/splits/tcga_luad")])
    assert rc == 1
    assert main(["audit", "--dataset", "ucec", "--real-tables", str(real_tables)]) == 0
    assert "patients" in capsys.readouterr().out
