"""Result store (atomic records, filters, model reload) and the grid runner (errors, skips, overwrite)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from benchmark.api.registry import register_method
from benchmark.settings.config import RunConfig, hashed_config
from benchmark.execution.cells import Execution, load_trained_model, run_cell
from benchmark.execution.grid import run_grid, summary_table
from benchmark.store.records import ResultStore, config_hash
from benchmark.fitting.trainer import predict
from benchmark.data.bag import Needs
from fakes import grid, scoped_registry, toy_loader

torch.set_num_threads(1)
CPU = Execution(device="cpu")


CONTRACT_FIELDS = {"schema", "status", "method", "cohort", "backbone", "fold", "seed", "recipe", "selection", "label",
                   "config", "config_hash", "provenance", "metrics", "selected_epoch", "history", "bin_edges",
                   "train_risk_median", "predictions", "error", "seconds", "weights"}


class ToyBroken(nn.Module):
    """Always fails (tests that one crashed cell does not stop the grid)."""

    def __init__(self, in_dim, n_bins=4):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_bins)

    def forward(self, bag):
        raise RuntimeError("planted failure")


def test_store_key_names_the_variant():
    assert RunConfig("amil", "blca", recipe="demo").store_key() == "demo"
    changed = RunConfig("amil", "blca", recipe="demo", overrides={"lr": "3e-4"}).store_key()
    assert changed.startswith("demo+") and changed != RunConfig("amil", "blca", overrides={"lr": "1e-4"}).store_key()
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})


def test_grid_records_errors_skips_and_overwrites(tmp_path, monkeypatch):
    scoped_registry(monkeypatch)
    register_method("toy_broken", source="test only", in_all=False)(ToyBroken)
    store = ResultStore(tmp_path)
    configs = grid(["amil", "toy_broken"], [0, 1])
    cells = [c.cell for c in configs]
    report = run_grid(configs, store, CPU, loader=toy_loader, show_progress=False)
    assert [r["status"] for r in report.ran] == ["ok", "ok", "error", "error"]
    ok = store.records(status="ok")
    assert len(ok) == 2 and {r["method"] for r in ok} == {"amil"}
    errors = store.records(status="error", method="toy_broken")
    assert len(errors) == 2 and "planted failure" in errors[0]["error"] and errors[0]["weights"] is None
    assert len(store.records()) == 4 and len(store.records(fold=[0])) == 2
    # contract fields, JSON on disk, no temporary file left behind
    rec = ok[0]
    assert CONTRACT_FIELDS <= set(rec)
    assert rec["_path"].endswith("cells/amil/blca/resnet50/tiny-last-s0/fold0.json")
    assert json.loads(open(rec["_path"]).read())["status"] == "ok"
    assert not list(tmp_path.rglob("*.tmp"))
    assert rec["config_hash"] == hashed_config(rec["config"]) and rec["config"]["recipe"]["epochs"] == 2
    assert {"versions", "git_commit", "created"} <= set(rec["provenance"])
    assert len(rec["predictions"]) == 15 and {"sample_id", "patient_id", "time", "event", "risk"} <= set(rec["predictions"][0])
    assert set(rec["metrics"]) == {"c_index", "c_index_uno", "ibs", "mean_auc", "d_calibration_p"}
    assert len(rec["bin_edges"]) == 5
    # every NaN metric has its reason recorded (none when all are defined)
    assert set(rec.get("metric_errors", {})) == {k for k, v in rec["metrics"].items() if v is None or v != v}
    # rerun: finished cells are skipped, failed ones retried
    again = run_grid(configs, store, CPU, loader=toy_loader, show_progress=False)
    assert len(again.skipped) == 2 and [r["cell"] for r in again.ran] == [c.label() for c in cells[2:]]
    stamp = store.read(cells[0])["provenance"]["created"]
    forced = run_grid(configs[:1], store, CPU, overwrite=True, loader=toy_loader, show_progress=False)
    assert len(forced.ran) == 1 and store.has(cells[0]) and not store.has(cells[2])
    assert store.has(cells[2], include_errors=True) and store.read(cells[0])["provenance"]["created"] >= stamp
    table = summary_table(store, configs)
    assert table.row_count == 2


def test_rerun_redoes_cells_finished_under_another_configuration(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    configs = grid(["amil"], [0])
    cells = [c.cell for c in configs]
    run_grid(configs, store, CPU, loader=toy_loader, show_progress=False)
    assert len(run_grid(configs, store, CPU, loader=toy_loader, show_progress=False).skipped) == 1
    # other method options are another configuration (its own folder), never the finished cell reused
    changed = [c.with_(method_options={"dropout": 0.1}) for c in configs]
    cells = [c.cell for c in changed]
    assert cells[0].recipe != configs[0].cell.recipe
    redo = run_grid(changed, store, CPU, loader=toy_loader, show_progress=False)
    assert len(redo.ran) == 1 and not redo.skipped
    assert store.read(cells[0])["config"]["method_options"] == {"dropout": 0.1}
    # same folder, another synthetic-data version: the record's hash says it is stale
    monkeypatch.setattr("benchmark.execution.cells.SYNTHETIC_SCHEMA", 999)
    assert len(run_grid(changed, store, CPU, loader=toy_loader, show_progress=False).ran) == 1
    assert store.read(cells[0])["config"]["synthetic_version"] == 999
    # ... or a backbone whose generator parameters were edited in datasets/backbones.toml
    import dataclasses

    from benchmark.data.cohorts import get_backbone

    edited = dataclasses.replace(get_backbone("resnet50"), synthetic_signal=0.123)
    monkeypatch.setattr("benchmark.execution.cells.get_backbone", lambda name: edited)
    assert len(run_grid(changed, store, CPU, loader=toy_loader, show_progress=False).ran) == 1
    assert store.read(cells[0])["config"]["synthetic_backbone"] == {"noise": 1.0, "signal": 0.123}


def test_load_model_reproduces_stored_risks(tmp_path):
    store = ResultStore(tmp_path)
    config = RunConfig("amil", "blca", fold=1, recipe="tiny", method_options={"dropout": 0.1})
    summary = run_cell(config, store, CPU, loader=toy_loader)
    assert summary["status"] == "ok"
    rec = store.records(method="amil")[0]
    assert rec["weights"] == "fold1.pt" and rec["config"]["method_options"] == {"dropout": 0.1}
    model = load_trained_model(store, rec)
    assert not model.training and model.embed[2].p == 0.1
    cohort = toy_loader("blca")
    ids = [p["sample_id"] for p in rec["predictions"]]
    again = predict(model, cohort, ids, torch.device("cpu"), Needs())
    np.testing.assert_allclose(again.risk, [p["risk"] for p in rec["predictions"]], rtol=0, atol=1e-6)
    # the KM split threshold is the training fold's median risk under the final model
    train_risk = predict(model, cohort, cohort.folds[1].train, torch.device("cpu"), Needs()).risk
    assert rec["train_risk_median"] == pytest.approx(float(np.median(train_risk)), abs=1e-6)


def test_run_cell_with_the_real_data_layer(tiny_root, tmp_path):
    store = ResultStore(tmp_path)
    config = RunConfig("amil", "blca", recipe="tiny", data_root=str(tiny_root))
    summary = run_cell(config, store, Execution(device="cpu", save_weights=False))
    assert summary["status"] == "ok", summary["error"]
    rec = store.records()[0]
    assert rec["weights"] is None and rec["provenance"]["data"]["synthetic"]["preset"] == "tiny"
    from benchmark.data.loader import load_cohort

    cohort = load_cohort("blca", data_root=tiny_root, backbone="resnet50")
    assert [p["sample_id"] for p in rec["predictions"]] == list(cohort.folds[0].val)


def test_run_cli_signal_control_cohort(tmp_path, monkeypatch):
    """`run --signal fine` trains on the same generator with another planted signal, into its own store."""
    import benchmark.data.synth as synth
    from benchmark.cli import main

    monkeypatch.setenv("MIL_BENCHMARK_DATA", str(tmp_path / "data"))
    monkeypatch.setitem(synth.PRESETS, "demo", synth.PRESETS["tiny"])  # tiny cohorts stand in for the demo preset
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--methods", "random", "--dataset", "blca", "--folds", "0", "--signal", "fine"]) == 0
    records = ResultStore(tmp_path / "results" / "synthetic-fine").records(status="ok")
    assert len(records) == 1 and records[0]["recipe"] == "demo"
    assert records[0]["provenance"]["data"]["synthetic"]["signal"] == "fine"
    assert (tmp_path / "data" / f"demo-fine-s0-v{synth.SCHEMA}" / "blca" / "truth" / "summary.json").exists()
    assert not (tmp_path / "results" / "synthetic").exists()
