"""The cost model (priors, refinement from records, ETA) and --dry-run; precision (validation, bf16 autocast on
CPU through the trainer, fp32 records keep their hash) and the device bag cache."""
import math

import pytest

from benchmark.api.registry import get_method_spec
import torch

from benchmark.data.bag import Needs
from benchmark.store.records import ResultStore
from benchmark.settings.config import RunConfig
from benchmark.execution.cost import (
    CELL_OVERHEAD_S, REFERENCE_PATCHES, CostModel, Eta, cell_draws, format_seconds, record_draws,
)
from benchmark.fitting.precision import DeviceBags, autocast, bag_bytes, check_precision, resolve_device
from benchmark.settings.recipes import Recipe, register_recipe
from benchmark.api.registry import load_builtin_methods
from benchmark.fitting.trainer import train_fold
from fakes import ToyCohort

TINY = register_recipe(Recipe("tiny-cost", lr=1e-3, epochs=2, accumulation=4, warmup_epochs=0, max_samples_per_epoch=12))


def fake_record(method="amil", cohort="blca", seconds=11.0, patches=122.0, epochs=4):
    return {"method": method, "cohort": cohort, "backbone": "resnet50", "status": "ok", "selection": "last",
            "seconds": seconds, "history": [{}] * epochs,
            "data_sizes": {"draws_per_epoch": 100, "n_train": 80, "n_val": 20, "n_inner": 0, "mean_patches": patches}}


def test_cell_draws_count_training_and_weighted_evaluation():
    assert cell_draws(4, 96, 298, 75) == pytest.approx(384 + 0.35 * 373)
    assert record_draws(fake_record()) == pytest.approx(400 + 0.35 * 100)
    assert record_draws({"history": [], "data_sizes": {}}) is None


def test_cost_model_uses_priors_then_the_store():
    empty = CostModel()
    per_draw, source = empty.seconds_per_draw("amil")
    assert per_draw == get_method_spec("amil").cost_prior and source.startswith("prior")
    assert empty.seconds_per_draw("my_plugin")[1].startswith("guess")
    model = CostModel.from_records([fake_record(seconds=1 + 435 * 0.02 * 2, patches=2 * REFERENCE_PATCHES)])
    per_draw, source = model.seconds_per_draw("amil", "blca", "resnet50")
    assert per_draw == pytest.approx(0.02) and source == "measured (1 cell of this cohort and backbone)"
    assert model.seconds_per_draw("amil", "ucec", "resnet50")[1] == "measured (1 cell)"
    # the cohort's bag size comes from any record of it: a cell there costs twice the reference size
    assert model.estimate("amil", 100, cohort="blca", backbone="resnet50") == pytest.approx(CELL_OVERHEAD_S + 4.0)
    assert model.estimate("amil", 100, cohort="ucec", backbone="resnet50") == pytest.approx(CELL_OVERHEAD_S + 2.0)


def test_eta_scales_by_how_finished_cells_compared_with_their_estimates():
    eta = Eta({"a": 10, "b": 10, "c": 20}, parallelism=2)
    assert eta.remaining_seconds() == 20
    eta.finished("a", 20)  # twice as slow as estimated
    assert eta.remaining_seconds() == pytest.approx(30 * 2 / 2)
    eta.finished("b", None)  # failed: no longer counts
    assert eta.remaining_seconds() == pytest.approx(20 * 2 / 2)
    assert [format_seconds(s) for s in (42, 450, 7200)] == ["42 s", "7.5 min", "2.0 h"]


def test_dry_run_lists_cells_and_trains_nothing(tiny_root, tmp_path, capsys, monkeypatch):
    from benchmark.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    args = ["run", "--methods", "amil,random", "--dataset", "blca", "--folds", "0-1", "--data-root", str(tiny_root),
            "--recipe", "demo", "--set", "epochs=1", "--results", str(tmp_path / "r")]
    assert main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 cell(s) to run, 0 to skip; estimated" in out and "prior (2-core CPU)" in out
    assert not (tmp_path / "r").exists()
    assert main(args + ["--folds", "0"]) == 0
    capsys.readouterr()
    assert main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 cell(s) to run, 2 to skip" in out and "measured (1 cell of this cohort and backbone)" in out
    assert "skip  amil/blca/resnet50/demo+" in out and "/fold0  (finished)" in out


def test_precision_and_device_options_are_validated():
    assert check_precision("bf16", "cpu") == "bf16" and check_precision("fp16", None) == "fp16"
    with pytest.raises(ValueError, match="^--precision fp16: needs --device cuda"):
        check_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="^--precision: 'fp8'"):
        check_precision("fp8")
    with pytest.raises(ValueError, match="^--device gpu: not a device name"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="^--precision"):
        RunConfig("amil", "blca", precision="half")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^--device cuda:1: CUDA is not available"):
            resolve_device("cuda:1")


def test_bf16_autocast_trains_on_cpu_and_is_its_own_configuration():
    load_builtin_methods()
    with autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    cohort = ToyCohort(n=30, seed=1)
    fp32 = RunConfig("amil", "blca", recipe="tiny-cost")
    bf16 = fp32.with_(precision="bf16")
    a, b = train_fold(cohort, fp32, device="cpu"), train_fold(cohort, bf16, device="cpu")
    assert all(math.isfinite(h["train_loss"]) for h in b.history)
    assert [p["risk"] for p in a.predictions] != [p["risk"] for p in b.predictions]
    assert all(v.dtype == torch.float32 for v in b.model.state_dict().values() if v.is_floating_point())
    # precision is part of the configuration (its own folder and hash), and fp32 records keep their old hash
    assert bf16.store_key() != fp32.store_key() and bf16.label() == "tiny-cost, precision=bf16"
    assert "precision" not in fp32.record_config(16, None, None)
    record = {"method": "amil", "cohort": "blca", "backbone": "resnet50", "fold": 0, "seed": 0, "selection": "last",
              "config": bf16.record_config(16, None, None)}
    assert RunConfig.from_record(record) == bf16 and "--precision=bf16" in bf16.to_cli()


def test_device_bags_move_once_and_cache_within_budget():
    cohort = ToyCohort(n=6, seed=0, patches=6, dim=16)
    one = bag_bytes(cohort.bag("P000", Needs()))
    assert one == 6 * 16 * 4
    cohort.bag_calls.clear()
    bags = DeviceBags(lambda s: cohort.bag(s, Needs()), torch.device("cpu"), budget=2 * one)
    for sid in ["P000", "P001", "P002", "P000", "P001", "P002"]:
        bags.get(sid)
    assert set(bags.cached) == {"P000", "P001"} and bags.cached_bytes == 2 * one
    assert cohort.bag_calls == ["P000", "P001", "P002", "P002"]  # the cached two were loaded once
    assert bags.patch_counts == {"P000": 6, "P001": 6, "P002": 6}
    assert DeviceBags(lambda s: None, torch.device("cpu")).budget == 0  # on CPU bags are already in place


def test_gpu_check_runs_its_steps_on_the_cpu_and_skips_without_cuda(capsys):
    from benchmark.perf import gpu_check

    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 0 and "CUDA is not available" in capsys.readouterr().out
    assert gpu_check.main(["--device", "cpu", "--methods", "amil,random", "--n20", "64", "--in-dim", "32"]) == 0
    out = capsys.readouterr().out
    assert "amil" in out and "bf16" in out and "FAILED" not in out
    row = gpu_check.check_method("dsmil", torch.device("cpu"), 64, 32, ("fp32", "bf16"))
    assert row["max_abs_diff"] == 0 and row["fp32_s"] > 0 and row["bf16_s"] > 0
