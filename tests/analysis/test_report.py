"""The Markdown report: tables with significance markers, figures that exist, report cards and provenance."""
from __future__ import annotations

import json
import re

import numpy as np

from benchmark.cli import main
from benchmark.analysis.report import build_report, data_description, report_card_from_records
from benchmark.store.query import Results, select_cell
from fakes import write_fake_store


def test_report_page(tmp_path):
    store = write_fake_store(tmp_path / "store", methods=("good", "noise"), n_patients=150)
    # one failed fold must be counted, not hidden
    failed = store / "cells" / "noise" / "luad" / "resnet50" / "harmonized-last_epoch-s0" / "fold4.json"
    record = json.loads(failed.read_text())
    record.update(status="error", error="RuntimeError: boom", metrics=None, predictions=None)
    failed.write_text(json.dumps(record))

    out = build_report(Results.open(store), tmp_path / "site" / "report.md", n_boot=100, audit_cards=False)
    text = out.read_text()
    for heading in ("## Tables", "## Paired comparisons", "## Kaplan-Meier curves", "## Cohort report cards",
                    "## Provenance"):
        assert heading in text
    # significance marker on the random method only, in both cohorts
    noise_row = next(line for line in text.splitlines() if line.startswith("| noise |"))
    good_row = next(line for line in text.splitlines() if line.startswith("| good |"))
    assert noise_row.count("‡") == 2 and "‡" not in good_row
    # every linked figure exists, Kaplan-Meier for each cohort of the best method
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((out.parent / link).exists() for link in links)
    assert sum("km_good_" in link for link in links) == 2
    # provenance: one row per cell, the failed fold counted, the data named
    prov = text.split("## Provenance")[1]
    assert len([line for line in prov.splitlines() if line.startswith("| good |") or line.startswith("| noise |")]) == 4
    assert re.search(r"\| noise \| luad \| resnet50 \| harmonized \| last_epoch \| 0 \| 4 \| 1 \|", prov)
    assert "synthetic (preset demo, seed 0)" in prov and "deadbeef" in prov


def test_report_card_numbers(tmp_path):
    store = write_fake_store(tmp_path, methods=("good",), cohorts=("blca",), n_patients=60, slides_per_patient=2)
    records = select_cell(store, "good", "blca")
    card = report_card_from_records(records).iloc[0]
    events = {p["patient_id"]: p["event"] for r in records for p in r["predictions"]}
    assert card["patients"] == 60 and card["samples"] == 120 and card["events"] == sum(events.values())
    per_fold = [card[f"fold {k} (patients/events)"] for k in range(5)]
    assert sum(int(x.split("/")[0]) for x in per_fold) == 60
    assert sum(int(x.split("/")[1]) for x in per_fold) == card["events"]
    assert card["censoring"] == f"{1 - np.mean(list(events.values())):.1%}"


def test_data_description_names_the_source():
    assert data_description({"provenance": {"data_root": "/data/tcga", "data": {"synthetic": None}}}) == "data root /data/tcga"
    synthetic = {"provenance": {"data_root": None, "data": {"synthetic": {"preset": "demo", "seed": 0, "signal": "mixed"}}}}
    assert data_description(synthetic) == "synthetic (preset demo, seed 0, signal mixed)"


def test_report_cli(tmp_path, capsys):
    store = write_fake_store(tmp_path / "store", methods=("good", "noise"), cohorts=("blca",), n_patients=50)
    assert main(["report", "--results", str(store), "--n-boot", "50", "--cards-from-records"]) == 0
    assert (store / "report.md").exists() and "wrote" in capsys.readouterr().out
    assert main(["report", "--results", str(tmp_path / "nothing")]) == 2


def test_report_states_design_mde_and_d_calibration(tmp_path):
    from scipy.stats import combine_pvalues

    store = write_fake_store(tmp_path / "store", methods=("good", "noise"), n_patients=80)
    fold_ps = [0.5, 0.2, 0.9, 0.04, 0.3]
    for k, p in enumerate(fold_ps):  # D-calibration p-values of the 'good' cell on blca, as the runner records them
        path = store / "cells" / "good" / "blca" / "resnet50" / "harmonized-last_epoch-s0" / f"fold{k}.json"
        record = json.loads(path.read_text())
        record["metrics"]["d_calibration_p"] = p
        path.write_text(json.dumps(record))
    text = build_report(Results.open(store), tmp_path / "r.md", n_boot=100, audit_cards=False).read_text()
    assert "**Design, backbone resnet50" in text and "MDE (C-index)" in text
    assert "Iman-Davenport" in text and "Holm-adjusted over m = 1 comparison" in text
    assert "Holm's first step" in text and "MDE range" in text
    calibration = text.split("**D-calibration")[1]
    good_row = next(line for line in calibration.splitlines() if line.startswith("| good |"))
    assert f"{combine_pvalues(fold_ps, method='fisher').pvalue:.3f}" in good_row
    events = [p["event"] for r in select_cell(store, "good", "blca") for p in r["predictions"]]
    assert ("no power" in good_row) == (1 - np.mean(events) >= 0.3)


def test_d_calibration_combines_within_a_repeat_and_seed_then_averages():
    from scipy.stats import combine_pvalues

    from benchmark.analysis.report import calibration_table

    def rec(repeat, seed, fold, p, events):
        return {"method": "m", "cohort": "blca", "repeat": repeat, "seed": seed, "fold": fold,
                "metrics": {"d_calibration_p": p}, "predictions": [{"event": 1}] * events}

    ps = {(0, 0): [0.5, 0.2, 0.04], (1, 0): [0.3, 0.6, 0.9], (0, 1): [0.01, 0.2, 0.4]}
    records = [rec(r, s, k, p, 4) for (r, s), fold_ps in ps.items() for k, p in enumerate(fold_ps)]
    expected = min(1.0, 2 * np.mean([combine_pvalues(v, method="fisher").pvalue for v in ps.values()]))
    assert calibration_table(records).loc["m", "blca"] == f"{expected:.3f}"  # no censoring: no warning
    pooled = combine_pvalues([p for v in ps.values() for p in v], method="fisher").pvalue
    assert f"{pooled:.3f}" != f"{expected:.3f}"  # not Fisher over dependent repeats


def test_report_reference_family(tmp_path):
    store = write_fake_store(tmp_path / "store", methods=("good", "noise"), n_patients=150)
    text = build_report(Results.open(store), tmp_path / "r.md", n_boot=100, audit_cards=False,
                        reference="good").read_text()
    noise_row = next(line for line in text.splitlines() if line.startswith("| noise |"))
    assert noise_row.count("↓") == 2 and "worse / better than good" in text
