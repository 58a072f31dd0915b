"""Kaplan-Meier figures (numbers equal lifelines on the same groups) and attention heatmaps (maps equal the
model's own attention on the slide, overlap numbers equal sklearn's)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lifelines.statistics import logrank_test
from sklearn.metrics import roc_auc_score

from benchmark.analysis import plots
from benchmark.commands.plot import heatmap
from benchmark.cli import main
from benchmark.analysis.statistics import pooled_predictions
from benchmark.store.query import Results, select_cell
from fakes import write_fake_store, write_untrained_cell


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_fake_store(tmp_path_factory.mktemp("store"), methods=("good", "noise"), n_patients=120)


def _expected_groups(records, split):
    """High/low groups rebuilt independently of benchmark.analysis.plots."""
    pooled = pooled_predictions(records)
    if split == "train-median":
        threshold = pooled["fold"].map({r["fold"]: r["train_risk_median"] for r in records})
    else:
        threshold = np.median(pooled["risk"])
    return pooled[pooled["risk"] >= threshold], pooled[pooled["risk"] < threshold]


@pytest.mark.parametrize("split", ["train-median", "pooled-median"])
def test_km_numbers_equal_lifelines(store, tmp_path, split):
    results = plots.plot_km(Results.open(store), "good", "blca", split=split, out=tmp_path)
    km = results[0]
    high, low = _expected_groups(select_cell(store, "good", "blca"), split)
    expected = logrank_test(high["time"], low["time"], event_observed_A=high["event"], event_observed_B=low["event"])
    assert km.p_value == pytest.approx(expected.p_value, rel=1e-12)
    assert (km.n_high, km.n_low) == (len(high), len(low)) and km.n_high + km.n_low == 120
    assert (km.events_high, km.events_low) == (int(high["event"].sum()), int(low["event"].sum()))
    assert km.p_value < 1e-3 and km.median_survival_high < km.median_survival_low  # "good" separates
    assert {f.suffix for f in km.files} == {".png", ".pdf"} and all(f.stat().st_size > 10_000 for f in km.files)
    if split == "pooled-median":
        assert abs(km.n_high - km.n_low) <= 1


def test_km_all_cohorts_one_figure_and_cli(store, tmp_path, capsys):
    out_json = tmp_path / "km.json"
    rc = main(["plot", "km", "--results", str(store), "--method", "noise", "--dataset", "all", "--out", str(tmp_path),
               "--json", str(out_json)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert [d["cohort"] for d in data] == ["blca", "luad"]
    assert (tmp_path / "km_noise_all_train-median.png").exists() and (tmp_path / "km_noise_all_train-median.pdf").exists()
    assert "log-rank p" in capsys.readouterr().out


def test_km_slide_unit_counts_patients_once(tmp_path):
    root = write_fake_store(tmp_path, methods=("good",), cohorts=("blca",), n_patients=50, slides_per_patient=2)
    km = plots.km_analysis(select_cell(root, "good", "blca"))
    assert km.n_high + km.n_low == 50


def test_km_without_train_median_says_what_to_do(tmp_path):
    root = write_fake_store(tmp_path, methods=("good",), cohorts=("blca",), n_patients=40)
    path = next((root / "cells").rglob("fold0.json"))
    record = json.loads(path.read_text())
    record["train_risk_median"] = None
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="pooled-median"):
        plots.km_analysis(select_cell(root, "good", "blca"))


def test_overlap_metric_definition():
    rng = np.random.default_rng(0)
    signal = rng.random(200) < 0.3
    perfect = plots.attention_signal_overlap(signal + 0.01 * rng.random(200), signal)
    assert perfect["auc"] == 1.0 and perfect["top_precision"] == 1.0
    assert perfect["prevalence"] == pytest.approx(signal.mean()) and perfect["enrichment"] == pytest.approx(1 / signal.mean())
    scores = rng.normal(size=200) + signal
    o = plots.attention_signal_overlap(scores, signal)
    assert o["auc"] == pytest.approx(roc_auc_score(signal, scores))
    top = np.argsort(-scores)[:20]
    assert o["top_precision"] == pytest.approx(signal[top].mean())
    assert np.isnan(plots.attention_signal_overlap(scores, np.zeros(200, bool))["auc"])


def test_tumour_fraction_of_coarse_patches():
    # a 2x2 block of 20x patches (side 512) under one 10x patch (side 1024): 3 tumour of 4
    coords20 = np.array([[0, 0], [512, 0], [0, 512], [512, 512], [1024, 0]])
    types20 = np.array([0, 0, 0, 1, 2])
    frac = plots.tumour_fraction(np.array([[0, 0], [1024, 0]]), 1024, coords20, types20)
    np.testing.assert_allclose(frac, [0.75, 0.0])
    # 20x tissue starting inside a coarse patch (the coarse grid, not the 20x corners, sets the origin)
    frac = plots.tumour_fraction(np.array([[100, 100]]), 2048, np.array([[1124, 1124], [1636, 1124]]), np.array([0, 1]))
    np.testing.assert_allclose(frac, [0.5])


def test_heatmap_maps_equal_model_attention(tiny_root, tmp_path):
    from benchmark.data.bag import Needs
    from benchmark.data.loader import load_cohort

    cohort = load_cohort("blca", data_root=tiny_root, backbone="resnet50")
    model, val = write_untrained_cell(tmp_path / "store", cohort, "amil", tiny_root, fold=2)
    slide = cohort.samples.at[val[0], "slide_ids"][0]
    res = heatmap(tmp_path / "store", "amil", "blca", slide, out=tmp_path / "fig", cohort_data=cohort)
    assert res.fold == 2 and res.sample_id == val[0] and [m.name for m in res.maps] == ["attention"]
    bag = cohort.bag(val[0], Needs(magnifications=(20,), coords=True))
    model.eval()
    with torch.no_grad():
        expected = model(bag).attention["attention"].scores.numpy()
    rows = bag.slide_index[20].numpy() == 0
    np.testing.assert_allclose(res.maps[0].values, expected[rows], rtol=1e-5)
    np.testing.assert_array_equal(res.maps[0].coords, bag.coords[20].numpy()[rows])
    # planted signal at 20x = tumour patches (the generator plants the 20x states in tumour)
    tissue = cohort.bag(val[0], Needs(magnifications=(20,), tissue_types=True)).tissue_type.numpy()[rows]
    np.testing.assert_array_equal(res.signal[20].values > 0, tissue == 0)
    o = res.overlap["attention"]
    if 0 < o["n_signal"] < o["n_patches"]:
        assert o["auc"] == pytest.approx(roc_auc_score(tissue == 0, expected[rows]))
    assert {f.suffix for f in res.files} == {".png", ".pdf"} and all(f.exists() for f in res.files)


def test_heatmap_crossfusion_draws_every_map(tiny_root, tmp_path, capsys):
    from benchmark.data.loader import load_cohort

    cohort = load_cohort("ucec", data_root=tiny_root, backbone="resnet50")
    write_untrained_cell(tmp_path / "store", cohort, "crossfusion", tiny_root, fold=0)
    sample = cohort.folds[0].val[1]
    rc = main(["plot", "heatmap", "--results", str(tmp_path / "store"), "--method", "crossfusion", "--dataset", "ucec",
               "--slide", sample, "--out", str(tmp_path / "fig"), "--json", str(tmp_path / "hm.json")])
    assert rc == 0
    data = json.loads((tmp_path / "hm.json").read_text())
    assert {"coarse_cross", "fine_cross", "source_transformer", "final_transformer"} <= set(data["overlap"])
    assert all(0.0 <= o["top_precision"] <= 1.0 for o in data["overlap"].values())
    assert all(p.endswith((".png", ".pdf")) for p in data["files"])
    # the printed overlap names its class sizes, so an AUC resting on one or two patches is visible
    fine = data["overlap"]["fine_cross"]
    assert f"({fine['n_signal']} tumour vs {fine['n_patches'] - fine['n_signal']} other)" in capsys.readouterr().out


def test_heatmap_without_weights_says_how_to_retrain(tiny_root, tmp_path, capsys):
    from benchmark.data.loader import load_cohort

    cohort = load_cohort("blca", data_root=tiny_root, backbone="resnet50")
    _, val = write_untrained_cell(tmp_path / "store", cohort, "amil", tiny_root, weights=False)
    with pytest.raises(FileNotFoundError, match="--overwrite"):
        heatmap(tmp_path / "store", "amil", "blca", val[0], cohort_data=cohort)
    with pytest.raises(KeyError, match="no sample"):
        heatmap(tmp_path / "store", "amil", "blca", "NO-SUCH-SLIDE", cohort_data=cohort)


def test_heatmap_refuses_a_model_trained_on_other_synthetic_data(tiny_root, tmp_path):
    from benchmark.data.cohorts import get_backbone
    from benchmark.data.loader import load_cohort
    from benchmark.data.synth import SCHEMA

    b = get_backbone("resnet50")
    now = {"noise": b.synthetic_noise, "signal": b.synthetic_signal}
    rec = {"backbone": "resnet50", "config": {"data_root": None, "synthetic_version": SCHEMA, "synthetic_backbone": now}}
    assert plots.stale_data_reason(rec) is None
    assert "version 3" in plots.stale_data_reason({**rec, "config": {**rec["config"], "synthetic_version": 3}})
    edited = {**rec, "config": {**rec["config"], "synthetic_backbone": {**now, "signal": 0.123}}}
    assert "0.123" in plots.stale_data_reason(edited)
    assert plots.stale_data_reason({**edited, "config": {**edited["config"], "data_root": "/real"}}) is None
    # the command refuses such weights with the retrain command, instead of drawing meaningless maps
    cohort = load_cohort("blca", data_root=tiny_root, backbone="resnet50")
    _, val = write_untrained_cell(tmp_path / "store", cohort, "amil", tiny_root,
                                   config_extra={"data_root": None, "synthetic_version": SCHEMA - 1})
    with pytest.raises(ValueError, match=f"synthetic data version {SCHEMA - 1}.*--overwrite"):
        heatmap(tmp_path / "store", "amil", "blca", val[0], cohort_data=cohort)
