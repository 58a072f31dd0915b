"""Paired comparisons: C-index on pair matrices, paired bootstrap, ranks, CD diagram, table hook, CLI.

``write_fake_store`` (also used by test_plots.py and test_report.py) writes result records in the documented
store layout (docs/ARCHITECTURE.md "Result store contract") for a few fake methods whose quality is known.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sksurv.metrics import concordance_index_censored

from benchmark.analysis import statistics as compare
from benchmark.store.query import Results, select_cell
from benchmark.cli import main
from fakes import write_fake_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_fake_store(tmp_path_factory.mktemp("store"))


def test_c_index_matches_sksurv_with_ties_and_weights():
    rng = np.random.default_rng(1)
    time = rng.integers(1, 15, size=60).astype(float)          # many tied times
    event = rng.integers(0, 2, size=60)
    risk = rng.integers(0, 6, size=60).astype(float)           # many tied risks
    expected = concordance_index_censored(event.astype(bool), time, risk, tied_tol=1e-8)[0]
    assert compare.harrell_c_index(time, event, risk) == pytest.approx(expected, abs=1e-12)
    # weights = multiplicities: equal to sksurv on the data with rows duplicated
    counts = rng.integers(0, 3, size=60)
    rows = np.repeat(np.arange(60), counts)
    dup = concordance_index_censored(event[rows].astype(bool), time[rows], risk[rows], tied_tol=1e-8)[0]
    assert compare.harrell_c_index(time, event, risk, weights=counts) == pytest.approx(dup, abs=1e-12)


def test_better_method_is_significant_identical_is_not(store):
    """The pooled bootstrap of the registry on real records: its C-index is sksurv's on the pooled out-of-fold
    risks, a better method is found, identical risks are not."""
    from benchmark.analysis.significance import fold_bootstrap_c, pooled_fold

    rows = {m: select_cell(store, m, "blca") for m in ("good", "twin", "noise")}
    data = compare.column_data(rows)
    result = compare.SignificanceOptions(test="pooled-bootstrap", n_boot=400)(rows)
    assert result.marks == {"noise": "worse"} and result.raw_p[("good", "twin")] == 1.0
    assert result.differences[("good", "noise")] > 0.15 and result.raw_p[("good", "noise")] < 0.01
    folds, risks = pooled_fold(list(data.folds), dict(data.risks))
    pooled = compare.pooled_predictions(rows["good"])
    ref = concordance_index_censored(pooled["event"].astype(bool), pooled["time"], pooled["risk"], tied_tol=1e-8)[0]
    assert fold_bootstrap_c(folds, risks, n_boot=10).observed[0] == pytest.approx(ref, abs=1e-12)


def test_bootstrap_is_seeded_and_resamples_patients(tmp_path):
    root = write_fake_store(tmp_path, methods=("good", "noise"), cohorts=("blca",), n_patients=60, slides_per_patient=2)
    rows = {m: select_cell(root, m, "blca") for m in ("good", "noise")}
    runs = [compare.SignificanceOptions(test="fold-bootstrap", n_boot=150, seed=seed)(rows) for seed in (7, 7, 8)]
    assert runs[0].raw_p == runs[1].raw_p and runs[0].mde == runs[1].mde
    assert runs[0].mde != runs[2].mde  # another seed, other resamples
    data = compare.column_data(rows)
    assert sum(f.time.size for f in data.folds) == 120 and np.unique(np.concatenate(
        [f.patients for f in data.folds])).size == 60


def test_column_data_reads_fold_values_and_predictions(store):
    rows = {m: select_cell(store, m, "luad") for m in ("good", "twin", "noise")}
    data = compare.column_data(rows)
    assert data.n_folds == 5 and data.n_repeats == 1 and len(data.folds) == 5
    np.testing.assert_allclose(data.fold_values["noise"], [r["metrics"]["c_index"] for r in rows["noise"]])
    for fold, risk, record in zip(data.folds, data.risks["good"], rows["good"]):
        assert risk.shape == (1, fold.time.size)  # one row per seed
        ref = concordance_index_censored(fold.event.astype(bool), fold.time, risk[0], tied_tol=1e-8)[0]
        assert ref == pytest.approx(record["metrics"]["c_index"])
    # another metric: fold values only (the corrected t is the test that needs no predictions)
    uno = compare.column_data(rows, metric="c_index", predictions=False)
    assert uno.folds is None and np.allclose(uno.fold_values["noise"], data.fold_values["noise"])


def test_column_data_repeats_and_seeds(store):
    good, noise = select_cell(store, "good", "blca"), select_cell(store, "noise", "blca")
    def copies(records, **change):
        return [{**r, **change} for r in records]
    # a second seed of "good" with its risks reversed: the fold value is the mean of both seeds' C-indices
    flipped = [{**r, "seed": 1, "metrics": {**r["metrics"], "c_index": 1 - r["metrics"]["c_index"]},
                "predictions": [{**p, "risk": -p["risk"]} for p in r["predictions"]]} for r in good]
    data = compare.column_data({"good": good + flipped, "noise": noise})
    np.testing.assert_allclose(data.fold_values["good"], 0.5)
    assert data.seeds == 2 and data.risks["good"][0].shape[0] == 2
    # the bootstrap tests the quantity the table shows: mean over seeds of the per-fold C, not an ensemble's C
    boot = compare.SignificanceOptions(test="fold-bootstrap", n_boot=200)({"good": good + flipped, "noise": noise})
    shown = float(np.mean(data.fold_values["good"] - data.fold_values["noise"]))
    assert boot.differences[("good", "noise")] == pytest.approx(shown, abs=1e-12) and boot.seeds == 2
    # two repeats: J = 10 fold values, and the default test becomes the corrected t
    repeated = compare.column_data({"good": good + copies(good, repeat=1), "noise": noise + copies(noise, repeat=1)})
    assert len(repeated.fold_values["good"]) == 10 and repeated.n_repeats == 2
    options = compare.SignificanceOptions(family="reference", reference="good")
    result = options({"good": good + copies(good, repeat=1), "noise": noise + copies(noise, repeat=1)})
    assert result.test == "corrected-t" and result.marks == {"noise": "worse"}


def test_declared_families_mark_the_right_rows(store):
    rows = {m: select_cell(store, m, "luad") for m in ("good", "twin", "noise")}
    all_pairs = compare.SignificanceOptions(n_boot=300)(rows)
    assert all_pairs.family == "all-pairs" and all_pairs.n_comparisons == 3 and all_pairs.marks == {"noise": "worse"}
    assert all_pairs.raw_p[("good", "twin")] == 1.0  # identical risks
    ref = compare.SignificanceOptions(family="reference", reference="noise", n_boot=300)(rows)
    assert ref.marks == {"good": "better", "twin": "better"} and "every method vs noise" in ref.footer()
    assert compare.SignificanceOptions(family="reference", reference="absent")(rows) is None
    with pytest.raises(ValueError, match="--reference"):
        compare.SignificanceOptions(family="reference")
    with pytest.raises(ValueError, match="corrected-t"):
        compare.SignificanceOptions(metric="c_index_uno", test="fold-bootstrap")
    # Uno's C (or any stored metric): the corrected t on the stored fold values
    uno_rows = {m: [{**r, "metrics": {**r["metrics"], "c_index_uno": r["metrics"]["c_index"]}} for r in recs]
                for m, recs in rows.items()}
    uno = compare.SignificanceOptions(metric="c_index_uno")(uno_rows)
    assert uno.test == "corrected-t" and uno.n_boot == 0


def test_slide_level_cells_resample_patients(tmp_path):
    root = write_fake_store(tmp_path, methods=("good", "noise"), cohorts=("blca",), n_patients=60, slides_per_patient=2)
    data = compare.column_data({m: select_cell(root, m, "blca") for m in ("good", "noise")})
    fold = data.folds[0]
    assert fold.time.size == 2 * np.unique(fold.patients).size  # two slides per patient, one patient code


def test_design_mde_pools_the_pairs(store):
    from benchmark.analysis.significance import minimum_detectable_difference

    rows = {m: select_cell(store, m, "blca") for m in ("good", "twin", "noise")}
    data = compare.column_data(rows, predictions=False)
    v = data.fold_values
    assert np.var(v["good"] - v["twin"]) == 0  # identical models: left out of the pooled variance
    pooled_sd = np.sqrt(np.mean([np.var(v["good"] - v["noise"], ddof=1), np.var(v["twin"] - v["noise"], ddof=1)]))
    mde = compare.design_mde(data)
    assert mde.value == pytest.approx(minimum_detectable_difference(pooled_sd, 5, 5, n_comparisons=3))
    assert mde.low < mde.value < mde.high


def test_calibration_rate_from_stores_of_equally_good_methods(tmp_path):
    stores = [Results.open(write_fake_store(tmp_path / f"s{i}", methods=("good", "peer"), n_patients=80, seed=i))
              for i in range(4)]
    options = compare.SignificanceOptions(n_boot=200)
    rate = compare.calibration_rate(stores, options)
    assert rate.columns == 8  # 4 stores x 2 cohorts
    expected = sum(bool(options({m: s.cell(m, c) for m in ("good", "peer")}).marks)
                   for s in stores for c in ("blca", "luad"))
    assert rate.marked == expected and rate.marked <= 1
    means = compare.null_means(stores)
    good = [float(np.mean(compare.column_data({m: s.cell(m, c) for m in ("good", "peer")},
                                              predictions=False).fold_values["good"]))
            for s in stores for c in ("blca", "luad")]
    assert list(means.index) == ["good", "peer"] and means.loc["good", "columns"] == 8
    assert means.loc["good", "mean"] == pytest.approx(np.mean(good))
    assert means.loc["good", "se"] == pytest.approx(np.std(good, ddof=1) / np.sqrt(8))


def test_ranks_friedman_and_critical_difference(tmp_path):
    # Demsar 2006 Table 5a (q_0.05)
    for k, q in ((2, 1.960), (3, 2.343), (4, 2.569), (10, 3.164)):
        assert compare.nemenyi_q(k) == pytest.approx(q, abs=1e-3)
    # Demsar's CD for k=4 methods, N=14 datasets, alpha=0.05: 2.569 * sqrt(20/84) = 1.25
    assert compare.nemenyi_critical_difference(4, 14) == pytest.approx(2.569 * np.sqrt(20 / 84), abs=2e-3)
    scores = pd.DataFrame({"a": [0.7, 0.72, 0.69, 0.71], "b": [0.6, 0.65, 0.7, 0.6], "c": [0.5, 0.52, 0.51, 0.55]},
                          index=list("wxyz"))
    summary = compare.rank_summary(scores)
    assert summary.ranks.to_dict() == pytest.approx({"a": 1.25, "b": 1.75, "c": 3.0})
    from scipy.stats import friedmanchisquare
    assert summary.friedman_p_value == pytest.approx(friedmanchisquare(*scores.T.to_numpy()).pvalue)
    # Iman-Davenport: chi2 = 12*4/12 (1.25^2 + 1.75^2 + 3^2 - 12) = 6.5, F = 3 * 6.5 / (8 - 6.5) = 13, df (2, 6)
    assert summary.friedman.f == pytest.approx(13.0) and (summary.friedman.df1, summary.friedman.df2) == (2, 6)
    assert summary.significant and "significant" in summary.describe()
    cd = summary.critical_difference
    for group in summary.cliques():
        assert summary.ranks[list(group)].max() - summary.ranks[list(group)].min() < cd
    path = compare.critical_difference_diagram(summary, tmp_path / "cd.png")
    assert path.exists() and path.stat().st_size > 5000
    # no ranking drawn when the test does not reject: the summary and the figure say "not significant"
    flat = pd.DataFrame({"a": [0.7, 0.6, 0.5, 0.6], "b": [0.6, 0.7, 0.6, 0.5], "c": [0.5, 0.5, 0.7, 0.7]})
    flat_summary = compare.rank_summary(flat)
    assert not flat_summary.significant and "not significant" in flat_summary.describe()
    assert compare.critical_difference_diagram(flat_summary, tmp_path / "flat.png").exists()


def test_score_table_ranks_only_cells_with_every_fold(tmp_path):
    root = write_fake_store(tmp_path / "s", methods=("good", "noise", "twin"), n_patients=60)
    full = compare.score_table(Results.open(root), ["good", "noise", "twin"])
    assert list(full.columns) == ["good", "noise", "twin"] and list(full.index) == ["blca", "luad"]
    # 'twin' finished only fold 0 on luad: that mean (1 of 5 folds) must not be ranked against 5-fold means
    for k in range(1, 5):
        (root / "cells" / "twin" / "luad" / "resnet50" / "harmonized-last_epoch-s0" / f"fold{k}.json").unlink()
    partial = compare.score_table(Results.open(root), ["good", "noise", "twin"])
    assert list(partial.index) == ["blca"]  # luad lacks a complete 'twin' cell: dropped from the ranks
    assert partial.loc["blca", "twin"] == pytest.approx(full.loc["blca", "twin"])
    # a method with no complete cell at all is left out rather than emptying the table
    for k in range(1, 5):
        (root / "cells" / "twin" / "blca" / "resnet50" / "harmonized-last_epoch-s0" / f"fold{k}.json").unlink()
    assert list(compare.score_table(Results.open(root), ["good", "noise", "twin"]).columns) == ["good", "noise"]


def test_score_table_data_sets_are_cohorts_with_backbones_averaged(tmp_path):
    root = write_fake_store(tmp_path / "s", methods=("good", "noise"), n_patients=60)
    write_fake_store(tmp_path / "s", methods=("good", "noise"), n_patients=60, backbone="uni", seed=5)
    results = Results.open(root)
    both = compare.score_table(results, ["good", "noise"])
    assert list(both.index) == ["blca", "luad"]  # not blca/resnet50, blca/uni: those share patients
    one = {b: compare.score_table(results, ["good", "noise"], backbone=b) for b in ("resnet50", "uni")}
    np.testing.assert_allclose(both.to_numpy(), (one["resnet50"].to_numpy() + one["uni"].to_numpy()) / 2)


def test_compare_cli_prints_and_writes(store, tmp_path, capsys):
    out_json = tmp_path / "cmp.json"
    rc = main(["compare", "--results", str(store), "--methods", "good,twin,noise", "--n-boot", "100",
               "--json", str(out_json), "--cd-out", str(tmp_path / "cd.png")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "good vs noise" in text and "blca" in text and "mean rank" in text.lower()
    assert "Holm p = " in text and "Holm-adjusted over m = 3 comparisons" in text and "all pairs of rows" in text
    assert "corrected resampled t-test" in text  # the default at one repeat too
    assert "minimum detectable difference" in text and "Iman-Davenport" in text
    data = json.loads(out_json.read_text())
    pair = next(p for p in data["pairs"] if p["a"] == "good" and p["b"] == "noise" and p["cohort"] == "blca")
    assert pair["holm_p_value"] < 0.05 and pair["holm_p_value"] >= pair["p_value"]
    assert len(pair["fold_differences"]) == 5
    twin = next(p for p in data["pairs"] if p["a"] == "good" and p["b"] == "twin" and p["cohort"] == "blca")
    assert twin["p_value"] == 1.0 and not twin["significant"]
    assert (tmp_path / "cd.png").exists()
    assert main(["compare", "--results", str(store), "--methods", "good,noise,twin", "--reference", "noise",
                 "--test", "corrected-t", "--dataset", "luad", "--cd-out", str(tmp_path / "cd2.png")]) == 0
    text = capsys.readouterr().out
    assert "good vs noise" in text and "every method vs noise" in text and "corrected resampled t-test" in text
    good = next(line for line in text.splitlines() if line.startswith("good vs noise"))
    assert "mean +" in good  # read as method - reference: the better method has a positive difference
    assert main(["compare", "--results", str(store), "--methods", "good,nosuch"]) == 2


def test_calibration_command_prints_the_rate(tmp_path, capsys):
    roots = [str(write_fake_store(tmp_path / f"s{i}", methods=("good", "peer"), n_patients=60, seed=i))
             for i in range(2)]
    assert main(["calibration", "--results", *roots, "--n-boot", "200"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("| ") and "| all |" in line]
    assert len(lines) == 6  # 2 families x 3 tests, over every column
    for family in ("reference", "all-pairs"):
        for test in ("corrected-t", "fold-bootstrap", "pooled-bootstrap"):
            line = next(x for x in lines if x.startswith(f"| {family} | {test} |"))
            assert "| 4 |" in line and "| 0.05 |" in line
    assert main(["calibration", "--results", *roots, "--tests", "t-test"]) == 2
    assert "good " in text.split("mean C-index over columns")[1] and "4 columns)" in text
