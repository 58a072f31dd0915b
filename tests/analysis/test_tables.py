"""Tables 1 and 2: mean ± population std, bold only as tested (or labelled untested), missing never zero, marks."""
import pytest

from benchmark.store.records import ResultStore
from benchmark.analysis.tables import render, table1, table2
from fakes import write_fake_store


def rec(method, cohort, fold, c, *, backbone="resnet50", status="ok", selection="last", recipe="demo", seed=0):
    return {"method": method, "cohort": cohort, "backbone": backbone, "fold": fold, "seed": seed, "recipe": recipe,
            "selection": selection, "status": status, "metrics": None if status != "ok" else {"c_index": c, "ibs": 1 - c}}


def grid():
    out = []
    for k, (a, b, r) in enumerate([(0.70, 0.60, 0.50), (0.80, 0.62, 0.52), (0.60, 0.64, 0.48), (0.70, 0.66, 0.50)]):
        out += [rec("amil", "blca", k, a), rec("crossfusion", "blca", k, b), rec("random", "blca", k, r)]
        out += [rec("amil", "ucec", k, b), rec("crossfusion", "ucec", k, a)]  # random has no ucec: missing
    out.append(rec("crossfusion", "luad", 0, 0.9))  # one fold of four: incomplete
    out.append(rec("random", "luad", 0, None, status="error"))
    return out


def test_expected_folds_come_from_the_cohort_not_from_the_other_rows():
    # a grid run on fold 0 only: every row has one fold, yet the cohort has five
    recs = [{**rec(m, "blca", 0, c), "n_folds": 5} for m, c in (("amil", 0.7), ("crossfusion", 0.6))]
    t = table1(recs)
    assert all(not t.cells[(m, "blca")].complete for m in ("amil", "crossfusion"))
    assert t.bold("blca") == set()
    md = render(t, "md")
    assert "| 0.700 (1/5) |" in md and "**" not in md.split("\n\n")[1]
    # records from before the runner stored n_folds: the most folds of any cell
    assert table1([rec("amil", "blca", 0, 0.7)]).cells[("amil", "blca")].complete


def test_table1_cells_ranks_and_missing():
    t = table1(grid())
    assert t.rows == ["amil", "crossfusion", "random"]  # paper order, random floor last
    assert t.columns[:2] == ["blca", "brca"] or "blca" in t.columns
    cell = t.cells[("amil", "blca")]
    assert cell.mean == pytest.approx(0.70) and cell.std == pytest.approx(0.070710678, abs=1e-8)  # population std
    assert t.bold("blca") == {"amil"} and t.tested_best is None
    md = render(t, "md")
    line = {l.split(" | ")[0].strip("| "): l for l in md.splitlines() if l.startswith("| ")}
    assert "**0.700 ± 0.071**" in line["amil"] and "| 0.630 ± 0.022 |" in line["crossfusion"] and "<u>" not in md
    assert "Bold: the highest mean of the column, NOT tested" in md
    # random has no ucec record at all and only an error for luad: shown missing, never 0
    cells = [c.strip() for c in line["random"].strip("|").split("|")]
    col = {name: i for i, name in enumerate(c.strip() for c in line["Method"].strip("|").split("|"))}
    assert cells[col["UCEC"]] == "—" and cells[col["LUAD"]] == "— err"
    assert "0.000" not in line["random"]
    assert "| 0.900 (1/4) |" in line["crossfusion"]  # incomplete: marked, never ranked; one fold has no ±
    assert "(k/n)" in md and "paper-max" not in md


def test_paper_max_is_marked_and_mixed_selections_need_a_choice():
    records = grid() + [dict(r, selection="paper-max") for r in grid()]
    with pytest.raises(ValueError, match="several selections"):
        table1(records)
    t = table1(records, selection="paper-max")
    md = render(t, "md")
    assert "†" in md.splitlines()[0] and "| Method† |" in md and "optimistic" in md
    assert "$^\\dagger$" in render(t, "latex")


def test_significance_hook_and_formats():
    seen = {}

    def hook(rows):
        seen.update({k: len(v) for k, v in rows.items()})
        return {"random"}

    t = table1(grid(), significance=hook)
    assert seen["amil"] == 4 and t.marks[("random", "blca")] == "*"
    latex = render(t, "latex")
    assert r"\textbf" not in latex and r"\underline" not in latex and "--" in latex  # a bare set ties nothing for best
    csv_text = render(t, "csv").splitlines()
    assert csv_text[0].startswith("row,column,metric,mean,std,n_folds")
    random_ucec = [l for l in csv_text if l.startswith("random,ucec")][0].split(",")
    assert random_ucec[3] == "" and random_ucec[5] == "0"
    # IBS: lower is better
    assert table1(grid(), metric="ibs").bold("blca") == {"amil"}
    assert "bold" in csv_text[0].split(",")
    with pytest.raises(ValueError, match="format"):
        render(t, "html")


def test_table2_backbones_and_mean_column(tmp_path):
    records = []
    for bb, base in [("resnet50", 0.6), ("uni2-h", 0.7)]:
        for cohort in ("blca", "ucec"):
            records += [rec("crossfusion", cohort, k, base + 0.01 * k, backbone=bb) for k in range(2)]
    records.append(rec("crossfusion", "blca", 0, 0.8, backbone="conch"))
    t = table2(records)
    assert t.rows[:5] == ["resnet50", "conch", "uni2-h", "quiltnet", "prov-gigapath"]
    md = render(t, "md")
    head = md.splitlines()[2]
    assert head.endswith("| Mean |")
    n_cols = len(t.columns)
    if n_cols == 2:  # without a cohort registry: Mean = mean of the cohort means
        assert t.value("uni2-h", "Mean") == pytest.approx(0.705)
    assert t.value("conch", "Mean") is None  # a missing cohort: no Mean
    assert t.bold("Mean") == {"uni2-h"} if t.value("uni2-h", "Mean") is not None else True
    # the store round trip feeds the renderer
    store = ResultStore(tmp_path)
    for r in records:
        store.write(r)
    assert len(store.records(backbone="uni2-h")) == 4
    assert render(table2(store.records()), "csv") == render(t, "csv")


def test_folds_run_under_different_configurations_are_flagged():
    records = [dict(rec("amil", "blca", k, 0.6 + 0.01 * k), config_hash="a" if k < 3 else "b") for k in range(5)]
    records += [dict(rec("dsmil", "blca", k, 0.55), config_hash="c") for k in range(5)]
    t = table1(records)
    assert t.cells[("amil", "blca")].mixed_configs and not t.cells[("dsmil", "blca")].mixed_configs
    md = render(t, "md")
    line = {l.split(" | ")[0].strip("| "): l for l in md.splitlines() if l.startswith("| ")}
    assert "§" in line["amil"] and "§" not in line["dsmil"] and "different configurations" in md


def test_older_synthetic_data_versions_never_share_a_table():
    # a store caught half-way through a rerun after a generator change: v3 cells beside v4 cells
    def versioned(r, v):
        return {**r, "config": {"synthetic_version": v}}

    recs = [versioned(rec(b, "blca", k, 0.6 + 0.01 * k), 4) for b in ("resnet50", "conch") for k in range(4)]
    recs = [{**r, "method": "amil", "backbone": r["method"]} for r in recs]
    recs += [versioned({**rec("amil", "ucec", k, 0.9), "backbone": "resnet50"}, 3) for k in range(4)]
    recs += [{**rec("amil", "luad", k, 0.7), "backbone": "resnet50"} for k in range(4)]  # real data: kept
    t = table2(recs, method="amil")
    assert t.cells.get(("resnet50", "ucec")) is None and t.cells[("resnet50", "blca")].complete
    assert t.cells[("resnet50", "luad")].complete
    assert any("4 fold record(s) of older synthetic data (version 3) left out" in n for n in t.notes)
    only_v4 = [r for r in recs if (r.get("config") or {}).get("synthetic_version") != 3]
    assert not any("older synthetic data" in n for n in table2(only_v4, method="amil").notes)
    from benchmark.store.query import newest_data_records

    kept, note = newest_data_records([recs[-5]], among=recs)  # a v3 record alone, judged against the store
    assert kept == [] and "version 3" in note


def test_declared_family_marks_footer_and_confidence_intervals(tmp_path):
    from benchmark.analysis.significance import bounded_interval
    from benchmark.analysis.statistics import SignificanceOptions

    store = write_fake_store(tmp_path / "s", methods=("good", "twin", "noise"), n_patients=100)
    records = ResultStore(store).records()
    t = table1(records, significance=SignificanceOptions(n_boot=200, test="fold-bootstrap"), marker="*", ci=0.95)
    assert {k for k, v in t.marks.items()} == {("noise", "blca"), ("noise", "luad")}
    assert t.bold("blca") == t.bold("luad") == {"good", "twin"}  # tied for best: identical risks, noise below
    md = render(t, "md")
    footer = [n for n in t.notes if "Holm-adjusted over" in n]
    assert len(footer) == 1 and "m = 3 comparisons" in footer[0] and "all pairs of rows" in footer[0]
    assert "alpha 0.05" in footer[0] and "conditional on the trained models" in footer[0]
    assert "BLCA: 5 finished validation folds" in md and "Minimum detectable difference" in md
    assert "statistically tied for best" in md and "NOT tested" not in md
    assert "95% CI" in md.splitlines()[0] and "Nadeau-Bengio" in md
    cell = t.cells[("good", "blca")]
    _, low, high, clipped = bounded_interval(cell.values, 5, 0.95)
    assert f"{cell.mean:.3f} [{low:.3f}, {high:.3f}]" in md and not clipped
    default = table1(records, significance=SignificanceOptions())
    assert "corrected resampled t-test" in " ".join(default.notes)  # the default test at one repeat
    ref = table1(records, significance=SignificanceOptions(family="reference", reference="noise", n_boot=200,
                                                           test="fold-bootstrap"))
    assert ref.marks[("good", "luad")] == "↑" and ref.marks[("twin", "blca")] == "↑" and ("noise", "blca") not in ref.marks
    assert r"$\uparrow$" in render(ref, "latex")


def test_table_command_significance_options(tmp_path, capsys):
    from benchmark.cli import main

    store = write_fake_store(tmp_path / "s", methods=("good", "noise"), n_patients=80)
    assert main(["table", "1", "--results", str(store), "--significance", "--reference", "good", "--n-boot", "200",
                 "--test", "fold-bootstrap", "--alpha", "0.05"]) == 0
    text = capsys.readouterr().out
    assert "↓" in text and "worse / better than good" in text and "Holm-adjusted over m = 1 comparison " in text
    assert "no bold in a column without that test" in text
    assert main(["table", "1", "--results", str(store), "--reference", "good"]) == 2  # a family needs --significance
    assert main(["table", "1", "--results", str(store), "--significance", "--metric", "c_index_uno"]) == 0


def test_intervals_stay_in_the_unit_range_and_undefined_metrics_say_why():
    recs = [rec("amil", "blca", k, c) for k, c in enumerate([0.2, 1.0, 0.95, 0.3, 0.99])]
    recs += [rec("dsmil", "blca", k, 0.6) for k in range(5)]
    recs[0] = {**recs[0], "metrics": {"c_index": 0.2, "mean_auc": None},
               "metric_errors": {"mean_auc": "ValueError: no event in the validation fold"}}
    t = table1(recs, ci=0.95)
    low, high, clipped = t.cells[("amil", "blca")].interval(0.95)
    assert clipped and 0.0 <= low and high == 1.0 and "1.000]^" in render(t, "md")
    auc = render(table1(recs, metric="mean_auc"), "md")
    assert "amil / blca: mean time-dependent AUC undefined in finished fold(s) (repeat/fold) 0/0: ValueError: no " \
           "event in the validation fold." in auc


def test_a_column_that_cannot_be_tested_is_named_not_fatal():
    def hook(rows):
        raise ValueError("fewer than 2 validation folds are shared by every row")

    t = table1(grid(), significance=hook)
    assert not t.marks and any("not tested" in n and "fewer than 2 validation folds" in n for n in t.notes)
