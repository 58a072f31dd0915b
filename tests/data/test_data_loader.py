"""load_cohort / CohortData on the tiny synthetic preset: samples, folds, bins, bags, caching."""
import shutil

import numpy as np
import pytest
import torch

import benchmark.data.loader as data_mod
from benchmark.data.bag import Needs
from benchmark.data.loader import load_cohort
from benchmark.data.labels import quantile_edges
from benchmark.data.synth import SCHEMA


@pytest.fixture(scope="module")
def blca(tiny_root):
    return load_cohort("blca", data_root=tiny_root, backbone="resnet50")


def test_samples_and_folds(blca):
    s = blca.samples
    assert list(s.columns) == ["patient_id", "slide_ids", "time", "event", "censorship"]
    assert s.index.is_unique and len(s) == 40
    assert ((s["event"] + s["censorship"]) == 1).all()
    assert blca.in_dim == 1024 and len(blca.folds) == 5
    vals = [set(f.val) for f in blca.folds]
    assert set().union(*vals) == set(s.index) and sum(map(len, vals)) == len(s)
    for f in blca.folds:
        assert not set(f.train) & set(f.val) and set(f.train) | set(f.val) == set(s.index)
    assert blca.provenance["synthetic"] == {"preset": "tiny", "seed": 0, "signal": "mixed", "schema": SCHEMA}


def test_bag_fills_only_what_needs_asks(blca):
    multi = blca.samples.index[blca.samples["slide_ids"].map(len) > 1][0]
    plain = blca.bag(multi, Needs(magnifications=(20,)))
    assert set(plain.features) == {20} and not plain.coords and not plain.edge_index and plain.tissue_type is None
    assert plain.features[20].dtype == torch.float32 and plain.features[20].shape[1] == 1024
    # a patient's slides are concatenated; slide_index says which slide each row came from
    assert plain.slide_ids == blca.samples.at[multi, "slide_ids"]
    assert set(plain.slide_index[20].tolist()) == set(range(len(plain.slide_ids)))
    full = blca.bag(multi, Needs(magnifications=(5, 10, 20), coords=True, graph=("spatial", "latent"), graph_k=4,
                                 tissue_types=True))
    n = {m: full.num_patches(m) for m in (5, 10, 20)}
    assert n[5] < n[10] < n[20]
    assert torch.equal(full.features[20], plain.features[20])
    for kind in ("spatial", "latent"):
        e = full.edge_index[kind]
        assert e.shape == (2, 4 * n[20]) and not (e[0] == e[1]).any()
        si = full.slide_index[20]
        assert torch.equal(si[e[0]], si[e[1]])  # never an edge between slides
    assert full.tissue_type.shape == (n[20],) and 0 in full.tissue_type.tolist()
    # spatial neighbours are grid neighbours: 512 px apart at 20x
    c = full.coords[20].float()
    e = full.edge_index["spatial"]
    assert (c[e[0]] - c[e[1]]).norm(dim=1).min() == pytest.approx(512)


def test_coarse_patches_cover_the_same_tissue(blca):
    b = blca.bag(blca.folds[0].val[0], Needs(magnifications=(5, 10, 20), coords=True))
    for m in (5, 10):
        size = 256 * 40 // m
        coarse = {tuple(x) for x in (b.coords[m] // size * size).tolist()}
        assert {tuple(x) for x in (b.coords[20] // size * size).tolist()} == coarse


def test_bags_are_cached_and_never_reread(tiny_root, monkeypatch):
    cohort = load_cohort("blca", data_root=tiny_root, backbone="resnet50")
    calls = []
    real = data_mod.read_slide
    monkeypatch.setattr(data_mod, "read_slide", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    needs = Needs(magnifications=(20,), graph=("spatial",))
    sid = cohort.samples.index[0]
    first = cohort.bag(sid, needs)
    n_reads = len(calls)
    for _ in range(3):
        assert cohort.bag(sid, needs) is first
    assert len(calls) == n_reads == len(first.slide_ids)


def test_slide_unit(tiny_root):
    c = load_cohort("blca", data_root=tiny_root, backbone="conch", unit="slide")
    assert len(c.samples) == len(c.slides) > 40 and c.in_dim == 512
    assert (c.samples["slide_ids"].map(len) == 1).all()
    # all slides of a patient sit on the same side of every fold
    for f in c.folds:
        assert not set(c.samples.loc[f.train, "patient_id"]) & set(c.samples.loc[f.val, "patient_id"])


def test_train_bins_use_training_fold_only(blca):
    fold = blca.folds[0]
    edges, bins = blca.bins(fold, rule="train")
    train = blca.samples.loc[fold.train]
    assert np.allclose(edges, quantile_edges(train["time"], train["event"], 4))
    assert list(bins.index) == list(blca.samples.index) and set(bins.unique()) <= {0, 1, 2, 3}
    # moving a validation patient's time does not move the edges
    moved = blca.samples.copy()
    moved.loc[fold.val[0], "time"] = 1e6
    orig = blca.samples
    blca.samples = moved
    try:
        assert np.allclose(blca.bins(fold, rule="train")[0], edges)
        assert not np.allclose(blca.bins(fold, rule="cohort")[0], edges)
    finally:
        blca.samples = orig
    cohort_edges, _ = blca.bins(0, rule="cohort")
    assert cohort_edges[0] == pytest.approx(blca.samples["time"].min() - 1e-6)


def test_truth_is_beside_the_data(blca):
    assert list(blca.truth.index) == list(blca.samples.index)
    assert {"risk", "risk_fine", "risk_coarse", "risk_cross"} <= set(blca.truth.columns)
    assert 0.5 < blca.oracle_c_index <= 1


def test_missing_splits_are_generated_saved_and_reused(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root / "ucec", root / "ucec")
    shutil.rmtree(root / "ucec" / "splits")
    c1 = load_cohort("ucec", data_root=root, backbone="conch")
    assert c1.provenance["splits_generated"] and (root / "ucec" / "splits" / "splits_4.csv").exists()
    c2 = load_cohort("ucec", data_root=root, backbone="conch")
    assert not c2.provenance["splits_generated"]
    assert [f.val for f in c1.folds] == [f.val for f in c2.folds]
