"""Tables and report pages for any cohort: the cohorts present as columns, ``--dataset``, what else the store
holds, the paper's published numbers beside ours (with an independent 95 % CI check), a D-calibration value for
every method, and the data source as recorded."""
import csv
import re
import math

import numpy as np
import pytest
from scipy import stats

from benchmark.analysis.report import calibration_table, data_description, trained_sizes
from benchmark.analysis.significance import fisher_combined_p
from benchmark.analysis.tables import (
    PUBLISHED_DIR, add_published, filter_datasets, read_published, render, table1, table2,
)


def rec(method, cohort, fold, c, *, backbone="resnet50", recipe="demo", selection="last", n_folds=5, dcal=None):
    return {"method": method, "cohort": cohort, "backbone": backbone, "fold": fold, "seed": 0, "recipe": recipe,
            "selection": selection, "status": "ok", "n_folds": n_folds,
            "metrics": {"c_index": c, "d_calibration_p": dcal}}


def nadeau_bengio_ci(values, k, level=0.95):
    """Independent: mean ± t_{J-1} sqrt((1/J + 1/(K-1)) s^2) (Nadeau & Bengio 2003)."""
    v = np.asarray(values, float)
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * math.sqrt((1 / len(v) + 1 / (k - 1)) * v.var(ddof=1))
    return v.mean() - half, v.mean() + half


def test_columns_are_the_cohorts_present_paper_order_first():
    recs = [rec("amil", c, k, 0.6) for c in ("mycohort", "ucec", "blca", "aaa") for k in range(2)]
    t = table1(recs)
    assert t.columns == ["blca", "ucec", "aaa", "mycohort"]
    assert filter_datasets(recs, "mycohort,blca") == [r for r in recs if r["cohort"] in ("mycohort", "blca")]
    with pytest.raises(ValueError, match=r"^--dataset luad: no records of this cohort in the store \(it holds aaa, "
                                         r"blca, mycohort, ucec\)$"):
        filter_datasets(recs, "blca,luad")


def test_table_says_what_else_the_store_holds():
    recs = [rec("amil", "mine", k, 0.6) for k in range(2)] + [rec("amil", "mine", k, 0.7, backbone="myresnet")
                                                              for k in range(2)]
    recs += [rec("amil", "mine", 0, 0.7, recipe="paper")]
    t = table1(recs, recipe="demo")
    assert t.backbone == "resnet50"
    assert "Not shown: the store also holds backbone(s) myresnet (--backbone); recipe(s) paper (--recipe)." in t.notes
    assert not any("Not shown" in n for n in table1(recs[:2]).notes)
    t2 = table2(recs, method="amil", recipe="demo")
    assert "Not shown: the store also holds recipe(s) paper (--recipe)." in t2.notes


def test_published_numbers_beside_ours_with_the_ci_verdict():
    published = read_published("crossfusion")
    assert published[(1, "amil", "blca", "resnet50")] == (0.559, 0.059)
    assert published[(2, "crossfusion", "gbmlgg", "uni2-h")][0] > 0.5
    assert (PUBLISHED_DIR / "README.md").read_text().count("arXiv 2503.02064") == 1
    near = [0.50, 0.62, 0.55, 0.60, 0.52]  # the paper's AMIL BLCA mean 0.559 inside
    far = [0.90, 0.901, 0.899, 0.902, 0.898]  # DSMIL: 0.552 far outside
    recs = [rec("amil", "blca", k, v) for k, v in enumerate(near)] + [rec("dsmil", "blca", k, v)
                                                                        for k, v in enumerate(far)]
    recs += [rec("amil", "mine", k, 0.6) for k in range(5)] + [rec("newmethod", "blca", k, 0.6) for k in range(5)]
    t = add_published(table1(recs), "crossfusion", 1)
    for method, values in (("amil", near), ("dsmil", far)):
        low, high = nadeau_bengio_ci(values, 5)
        mean = published[(1, method, "blca", "resnet50")][0]
        verdict = "in CI" if low <= mean <= high else "outside CI"
        assert verdict == ("in CI" if method == "amil" else "outside CI")
        std = published[(1, method, "blca", "resnet50")][1]
        assert f"(paper {mean:.3f} ± {std:.3f}, {verdict})" in render(t, "md").split(f"| {method} |")[1].split("\n")[0]
    assert ("newmethod", "blca") not in t.published and ("amil", "mine") not in t.published
    rows = {(r["row"], r["column"]): r for r in csv.DictReader(render(t, "csv").splitlines())}
    assert rows[("amil", "blca")]["paper_mean"] == "0.559" and rows[("amil", "blca")]["paper_in_ci"] == "yes"
    assert rows[("dsmil", "blca")]["paper_in_ci"] == "no" and rows[("amil", "mine")]["paper_mean"] == ""
    one_fold = add_published(table1([rec("amil", "blca", 0, 0.6)]), "crossfusion", 1)
    assert "(paper 0.559 ± 0.059, no CI)" in render(one_fold, "md")
    t2 = add_published(table2([rec("crossfusion", "blca", k, v, backbone="conch") for k, v in enumerate(near)]),
                       "crossfusion", 2, method="crossfusion")
    mean, std = published[(2, "crossfusion", "blca", "conch")]
    assert ("conch", "blca") in t2.published and f"paper {mean:.3f} ± {std:.3f}" in render(t2, "md")
    with pytest.raises(ValueError, match="--published nope: unknown; known: crossfusion"):
        read_published("nope")


def test_every_method_has_its_d_calibration_value():
    recs = [rec(m, "mine", k, 0.6, dcal=p) for m, ps in (("amil", (0.2, 0.5)), ("dsmil", (0.01, 0.03)),
                                                         ("transmil", (0.9, 0.7))) for k, p in enumerate(ps)]
    recs += [rec("amil", "blca", 0, 0.6, dcal=0.4)]
    frame = calibration_table(recs)
    assert list(frame.index) == ["amil", "dsmil", "transmil"] and list(frame.columns) == ["blca", "mine"]
    shown = lambda text: float(str(text).split()[0])  # noqa: E731 (the table prints p to 3 decimals)
    for method, ps in (("amil", (0.2, 0.5)), ("dsmil", (0.01, 0.03)), ("transmil", (0.9, 0.7))):
        assert shown(frame.loc[method, "mine"]) == pytest.approx(fisher_combined_p(ps), abs=5e-4)
    # Fisher's method, independently: -2 sum log p ~ chi2(2n)
    independent = stats.chi2.sf(-2 * np.log([0.01, 0.03]).sum(), 4)
    assert shown(frame.loc["dsmil", "mine"]) == pytest.approx(independent, abs=5e-4)
    assert shown(frame.loc["amil", "blca"]) == pytest.approx(0.4) and math.isnan(frame.loc["dsmil", "blca"])


def test_the_data_source_is_described_as_recorded():
    data = {"synthetic": None, "clinical": "/u/clinical.csv", "features": {"any": "/u/FEAT_DIR"}, "layout": "clam",
            "columns": "patient=p,slide=s,time=t,event=d,unit=days", "data_root": "/u"}
    real = {"provenance": {"data": data}, "config": {"clinical": "/u/clinical.csv", "data_root": None}}
    assert data_description(real) == ("real data: clinical table /u/clinical.csv, features /u/FEAT_DIR (clam "
                                      "layout), columns patient=p,slide=s,time=t,event=d,unit=days")
    per_mag = {"provenance": {"data": {**data, "features": {"20x": "/a", "10x": "/b"}, "columns": None}},
               "config": {"clinical": "/u/clinical.csv"}}
    assert data_description(per_mag) == "real data: clinical table /u/clinical.csv, features 20x /a, 10x /b (clam layout)"
    assert data_description({"provenance": {}, "config": {}}) == "not recorded"
    sizes = trained_sizes([{"fold": 1, "data_sizes": {"n_train": 30, "n_val": 8},
                            "missing_features": {"fold": {"train_dropped": 2, "val_dropped": 0}}},
                           {"fold": 0, "data_sizes": {"n_train": 31, "n_val": 7}}])
    assert sizes.to_dict("records") == [
        {"repeat": 0, "fold": 0, "train": 31, "val": 7, "dropped (train/val)": "0/0"},
        {"repeat": 0, "fold": 1, "train": 30, "val": 8, "dropped (train/val)": "2/0"}]


def test_list_is_readable_at_80_columns(monkeypatch, capsys):
    from benchmark import cli
    from benchmark.data.cohorts import backbone_names, cohort_names

    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out
    for name in cohort_names() + backbone_names() + ["amil", "crossfusion_wo_cp"]:
        assert re.search(rf"│ {re.escape(name)} +│", out), name  # whole names, one line each
    assert "resnet50-full: torchvision ResNet50 with fc = Identity" in out  # descriptions under the table


def test_table_command_published_and_dataset(tmp_path, capsys):
    from benchmark import cli
    from benchmark.store.records import ResultStore

    store = ResultStore(tmp_path / "r")
    for k, v in enumerate([0.50, 0.62, 0.55, 0.60, 0.52]):
        store.write(rec("amil", "blca", k, v))
        store.write(rec("amil", "mine", k, v))
        store.write(rec("amil", "blca", k, v, backbone="myresnet"))
    assert cli.main(["table", "1", "--results", str(tmp_path / "r"), "--published", "crossfusion",
                     "--dataset", "blca"]) == 0
    out = capsys.readouterr().out
    assert "| Method | BLCA |" in out and "(paper 0.559 ± 0.059, in CI)" in out and "MINE" not in out
    assert "Not shown: the store also holds backbone(s) myresnet (--backbone)." in out
    assert cli.main(["table", "1", "--results", str(tmp_path / "r")]) == 0
    assert "| Method | BLCA | MINE |" in capsys.readouterr().out


def test_readme_and_help_agree_on_the_jobs_default():
    from pathlib import Path

    from benchmark.settings.options import SETTINGS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert SETTINGS["jobs"].default == 1 and "`run` itself defaults to `--jobs 1`" in readme
    assert "[--jobs N (default 1)]" in readme and "default `--jobs 2`" not in readme
