"""Training seeds per cell: ``--seeding per-fold`` (default) draws each fold's initialisation afresh,
``--seeding shared`` reproduces the one-seed-for-every-fold runs bit for bit and is filed apart."""
import json
from pathlib import Path

import pytest
import torch

from benchmark.data.synth import generate
from benchmark.execution.cells import expected_config, get_cohort_data
from benchmark.fitting import trainer
from benchmark.settings.config import RunConfig, hashed_config

REFERENCE = Path(__file__).parent / "seeding_shared_d946c8a.json"
CREATE = trainer.create_method


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    generate(root, "tiny", 0, "blca", "resnet50", "mixed")
    return str(root)


def test_training_seed_depends_on_fold_repeat_and_seed_only_per_fold():
    base = RunConfig("amil", "blca")
    seeds = {trainer.training_seed(base.with_(fold=k, repeat=r, seed=s)) for k in range(5) for r in range(3)
             for s in range(2)}
    assert len(seeds) == 30 and all(0 <= s < 2 ** 32 for s in seeds)
    assert trainer.training_seed(base.with_(fold=3)) == trainer.training_seed(base.with_(fold=3))  # reproducible
    shared = base.with_(seeding="shared", seed=7)
    assert {trainer.training_seed(shared.with_(fold=k, repeat=r)) for k in range(5) for r in range(3)} == {7}


def test_seeding_is_part_of_the_configuration_and_old_records_read_as_shared():
    per_fold, shared = RunConfig("amil", "blca"), RunConfig("amil", "blca", seeding="shared")
    assert per_fold.store_key() == "demo" and shared.store_key().startswith("demo+")
    assert shared.label() == "demo, seeding=shared" and "--seeding=shared" in shared.to_cli()
    a, b = per_fold.record_config(16, None, None), shared.record_config(16, None, None)
    assert a["seeding"] == "per-fold" and "seeding" not in b  # records without the entry were trained shared
    assert hashed_config(a) != hashed_config(b)
    old = {"method": "amil", "cohort": "blca", "backbone": "resnet50", "fold": 0, "seed": 0, "selection": "last",
           "config": {"recipe": {"name": "demo"}}}
    assert RunConfig.from_record(old).seeding == "shared"
    with pytest.raises(ValueError, match="--seeding"):
        RunConfig("amil", "blca", seeding="per-cell")


def _initial_state(monkeypatch, cohort, config):
    """Train with 1 epoch and return the model's parameters right after it was built."""
    captured = {}

    def spy(*args, **kwargs):
        model = CREATE(*args, **kwargs)
        captured.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(trainer, "create_method", spy)
    result = trainer.train_fold(cohort, config, device="cpu")
    return captured, result


def test_per_fold_seeding_initialises_each_fold_afresh(monkeypatch, tiny_root):
    config = RunConfig("amil", "blca", recipe="demo", data_root=tiny_root, overrides={"epochs": 1})
    cohort = get_cohort_data(config)
    init0, r0 = _initial_state(monkeypatch, cohort, config.with_(fold=0))
    init1, r1 = _initial_state(monkeypatch, cohort, config.with_(fold=1))
    assert any(not torch.equal(init0[k], init1[k]) for k in init0)
    assert r0.extra["training_seed"] == trainer.training_seed(config.with_(fold=0)) != r1.extra["training_seed"]
    shared = config.with_(seeding="shared")
    s0, _ = _initial_state(monkeypatch, cohort, shared.with_(fold=0))
    s1, r = _initial_state(monkeypatch, cohort, shared.with_(fold=1))
    assert all(torch.equal(s0[k], s1[k]) for k in s0) and r.extra["training_seed"] == 0


@pytest.fixture
def two_torch_threads():
    """The reference ran with 2 intra-op threads (the CLI's default here); the reduction order follows them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_shared_seeding_reproduces_the_records_of_the_one_seed_runs(tiny_root, two_torch_threads):
    """Risks recorded at commit d946c8a (before per-fold seeds) are reproduced bit for bit, with the same hash."""
    reference = json.loads(REFERENCE.read_text())
    config = RunConfig("amil", "blca", recipe="demo", data_root=tiny_root, seeding="shared")
    cohort = get_cohort_data(config)
    config_now = {**expected_config(config, cohort.in_dim), "data_root": reference["config"]["data_root"]}
    assert config_now == reference["config"] and hashed_config(config_now) == reference["config_hash"]
    result = trainer.train_fold(cohort, config, device="cpu")
    assert {p["sample_id"]: p["risk"] for p in result.predictions} == reference["risks"]
    per_fold = trainer.train_fold(cohort, config.with_(seeding="per-fold"), device="cpu")
    assert {p["sample_id"]: p["risk"] for p in per_fold.predictions} != reference["risks"]


def test_run_flag_and_experiment_file_choose_the_seeding(tmp_path):
    from benchmark.cli import build_parser, main
    from benchmark.execution.session import build_experiment

    def experiment(*argv):
        return build_experiment(build_parser().parse_args(["run", *argv]))

    assert {c.seeding for c in experiment("--methods", "amil").configs(5)} == {"per-fold"}
    shared = experiment("--methods", "amil", "--seeding", "shared").configs(5)
    assert {c.seeding for c in shared} == {"shared"} and shared[0].label() == "demo, seeding=shared"
    path = tmp_path / "grid.toml"
    path.write_text('methods = "amil"\nseeding = "shared"\n')
    assert experiment("--config", str(path)).shared.seeding == "shared"
    path.write_text('methods = "amil"\nseeding = "sometimes"\n')
    assert main(["run", "--config", str(path), "--dry-run", "--results", str(tmp_path / "r")]) == 2


def test_older_records_are_refiled_for_shared_and_retrained_for_per_fold(tmp_path, tiny_root):
    """A record written before the seeding existed (folder ``demo``, no ``seeding`` entry) is the shared cell:
    a shared run moves it into its own folder and skips it; a per-fold run trains its own cell."""
    from benchmark.execution.cells import run_cell
    from benchmark.execution.grid import plan_grid
    from benchmark.store.records import ResultStore

    store = ResultStore(tmp_path / "store")
    shared = RunConfig("amil", "blca", recipe="demo", data_root=tiny_root, seeding="shared",
                       overrides={"epochs": 1})
    run_cell(shared, store)
    record = store.read(shared.cell)
    old = shared.with_(seeding="per-fold").cell  # the folder an older run used: the plain store key
    store.write({**record, "recipe": old.recipe, "label": "demo, epochs=1", "weights": None})
    (tmp_path / "store" / shared.cell.run_dir / "fold0.json").unlink()
    per_fold = shared.with_(seeding="per-fold")
    plan = plan_grid([per_fold], store)
    assert plan.todo == [per_fold] and "another configuration" in next(iter(plan.rerun_reasons.values()))
    plan = plan_grid([shared], store)
    assert plan.skipped == [shared] and store.read(shared.cell)["config_hash"] == record["config_hash"]
