"""The run configuration: one object from the command line (or an experiment file) through the runner into
every record and back (``from_record``, ``to_cli``), with readable labels."""
import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.commands import run as run_command
from benchmark.execution import session
from benchmark.store.records import ResultStore
from benchmark.settings.config import Experiment, RunConfig, hashed_config
from benchmark.settings.recipes import Recipe, register_recipe
from benchmark.execution.cells import Execution, expected_config, run_cell
from fakes import ToyCohort

torch.set_num_threads(1)
register_recipe(Recipe("cfgtest", lr=1e-3, epochs=1, accumulation=4, warmup_epochs=0, max_samples_per_epoch=8))


def toy_loader(name, data_root=None, backbone="resnet50", unit="patient"):
    return ToyCohort(n=30, seed=1)


def parse_run(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    run_command.register(parser.add_subparsers())
    return parser.parse_args(argv)


def configs_of(argv: list[str]) -> list[RunConfig]:
    return session.build_experiment(parse_run(argv)).configs(5)


VARIANT = RunConfig("amil", "blca", "resnet50", fold=3, seed=2, recipe="cfgtest",
                    overrides={"lr": "3e-4", "epochs": "2"}, method_options={"dropout": 0.1},
                    selection="inner", unit="slide", bin_rule="cohort", n_bins=5)


def test_config_round_trips_through_a_record(tmp_path):
    store = ResultStore(tmp_path)
    config = VARIANT.with_(unit="patient", selection="last", fold=1)  # the toy cohort: 2 folds, 1 sample per patient
    assert run_cell(config, store, Execution(device="cpu", save_weights=False), loader=toy_loader)["status"] == "ok"
    record = store.read(config.cell)
    assert RunConfig.from_record(record) == config
    assert record["config_hash"] == hashed_config(record["config"]) == hashed_config(expected_config(config, record["config"]["in_dim"]))
    assert record["label"] == "cfgtest, epochs=2, lr=0.0003, dropout=0.1, bin_rule=cohort, n_bins=5"
    assert "unit" not in record and record["config"]["unit"] == "patient"
    assert RunConfig(**config.to_dict()) == config


def test_to_cli_reruns_the_same_cell():
    command = shlex.split(VARIANT.to_cli(results="out"))
    assert command[:4] == ["python", "-m", "benchmark", "run"]
    args = parse_run(command[3:])
    assert args.results == "out"
    (again,) = configs_of(command[3:])
    assert again == VARIANT and again.cell == VARIANT.cell
    assert hashed_config(expected_config(again, 8)) == hashed_config(expected_config(VARIANT, 8))
    real = VARIANT.with_(data_root="/data/tcga", signal="mixed")
    assert configs_of(shlex.split(real.to_cli())[3:]) == [real]
    control = VARIANT.with_(signal="fine")
    assert configs_of(shlex.split(control.to_cli())[3:]) == [control]


def test_data_paths_are_absolute_so_cells_mean_the_same_data_from_any_directory(tmp_path, monkeypatch):
    # A Ray task or a rerun from another directory must read the same folder and find the same cell ids.
    monkeypatch.chdir(tmp_path)
    config = VARIANT.with_(data_root="data/tcga", clinical="tables/blca.csv", splits="splits/blca")
    assert config.data_root == str(tmp_path / "data/tcga")
    assert (config.clinical, config.splits) == (str(tmp_path / "tables/blca.csv"), str(tmp_path / "splits/blca"))
    monkeypatch.chdir(tmp_path.parent)
    assert VARIANT.with_(data_root=str(tmp_path / "data/tcga")) == VARIANT.with_(data_root=config.data_root)
    assert VARIANT.with_(data_root="data/tcga").data_root != config.data_root


def test_label_and_folder_depend_only_on_what_reaches_the_method():
    both = {c.method: c for c in configs_of(["run", "--methods", "amil,dsmil", "--folds", "0",
                                              "--method-option", "amil.dropout=0.1"])}
    assert both["dsmil"].label() == "demo" and both["dsmil"].cell.recipe == "demo"
    assert both["amil"].label() == "demo, dropout=0.1" and both["amil"].cell.recipe.startswith("demo+")
    (spelled,) = configs_of(["run", "--methods", "amil", "--folds", "0", "--method-option", "dropout=0.1"])
    assert spelled == both["amil"]
    # a recipe field set to its own default value is no variant; two spellings of a number are one
    (same,) = configs_of(["run", "--folds", "0", "--set", "lr=2e-4"])
    assert same.label() == "demo" and same.cell.recipe == "demo"
    a = RunConfig("amil", "blca", overrides={"lr": "1e-3"})
    assert a == RunConfig("amil", "blca", overrides={"lr": "0.001"}) and a.label() == "demo, lr=0.001"


def test_repeated_options_accumulate():
    (config,) = configs_of(["run", "--folds", "0", "--set", "epochs=1", "--set", "lr=1e-3",
                            "--method-option", "dropout=0.1", "--method-option", "hidden=64"])
    assert dict(config.overrides) == {"epochs": 1, "lr": 1e-3}
    assert config.options == {"dropout": 0.1, "hidden": 64}


def test_experiment_file_and_command_line_override(tmp_path):
    path = tmp_path / "experiment.toml"
    path.write_text('methods = ["amil", "dsmil"]\ndatasets = "blca,ucec"\nfolds = "0-1"\nseeds = [0, 1]\n'
                    'selection = "inner"\n[set]\nlr = 3e-4\n[method_options.amil]\ndropout = 0.1\n')
    configs = configs_of(["run", "--config", str(path)])
    assert len(configs) == 2 * 2 * 2 * 2
    assert {c.selection for c in configs} == {"inner"} and {dict(c.overrides)["lr"] for c in configs} == {3e-4}
    assert {c.method: c.options for c in configs} == {"amil": {"dropout": 0.1}, "dsmil": {}}
    overridden = configs_of(["run", "--config", str(path), "--selection", "last", "--dataset", "blca",
                             "--set", "lr=1e-3"])
    assert {(c.selection, c.cohort, dict(c.overrides)["lr"]) for c in overridden} == {("last", "blca", 1e-3)}


@pytest.mark.parametrize("text, message", [
    ("methdos = ['amil']", "Did you mean 'methods'"),
    ("folds = 3.5", "folds must be a string or list or integer, got float"),
    ("methods = [", "not valid TOML"),
    ("[tune]\ntrails = 3", r"\[tune\].*Did you mean 'trials'"),
    ("[tune]\ntrials = true", r"\[tune\]: trials must be a integer, got bool"),
])
def test_bad_experiment_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        configs_of(["run", "--config", str(path)])
    assert str(path) in str(info.value)


def test_an_unknown_executor_from_a_file_names_the_option(tmp_path):
    from benchmark.naming import UnknownNameError

    path = tmp_path / "e.toml"
    path.write_text("executor = 'sllurm'")
    with pytest.raises(UnknownNameError, match="--executor: unknown executor 'sllurm'.*Known executors: local, ray"):
        configs_of(["run", "--config", str(path)])


def test_bad_settings_fail_before_any_cell():
    with pytest.raises(ValueError, match="--method-option"):
        configs_of(["run", "--methods", "amil", "--method-option", "dsmil.dropout=0.1"])
    with pytest.raises(ValueError, match="--n-bins"):
        configs_of(["run", "--n-bins", "1"])
    with pytest.raises(ValueError, match="--folds"):
        Experiment(("amil",), ("blca",), folds=(7,)).configs(5)


def test_experiment_file_carries_the_execution_settings(tmp_path):
    from benchmark.cli import build_parser
    from benchmark.execution.session import build_experiment

    path = tmp_path / "grid.toml"
    path.write_text('methods = ["amil"]\ndatasets = "blca"\nexecutor = "local"\nshard = "1/2"\nsave_weights = true\n'
                    'precision = "bf16"\ncpus_per_cell = 2\n')
    experiment = build_experiment(build_parser().parse_args(["run", "--config", str(path)]))
    assert (experiment.shard, experiment.save_weights, experiment.shared.precision, experiment.cpus_per_cell) == \
        ((1, 2), "last", "bf16", 2.0)
    assert experiment.configs(5)[0].label() == "demo, precision=bf16"
    flags = build_parser().parse_args(["run", "--config", str(path), "--save-weights", "none", "--shard", "0/3"])
    assert (build_experiment(flags).shard, build_experiment(flags).save_weights) == ((0, 3), "none")


def test_experiment_holds_the_shared_cell_settings_in_one_run_config():
    """The grid does not restate the cell settings: they live in ``Experiment.shared`` (a RunConfig), and each
    cell is that object with its coordinates and its own method's options set."""
    import dataclasses

    restated = {f.name for f in dataclasses.fields(Experiment)} & {f.name for f in dataclasses.fields(RunConfig)}
    assert restated == {"method_options"}  # per-method mapping here, one method's options in a cell
    shared = RunConfig("*", "*", recipe="tiny", unit="slide", signal="none", precision="bf16")
    experiment = Experiment(("amil", "dsmil"), ("blca",), folds=(1,), seeds=(3,), shared=shared,
                            method_options={"*": {"dropout": 0.1}, "amil": {"hidden": 256}})
    amil, dsmil = experiment.configs(5)
    assert amil == shared.with_(method="amil", cohort="blca", fold=1, seed=3,
                                method_options={"dropout": 0.1, "hidden": 256})
    assert dsmil.options == {"dropout": 0.1} and dsmil.unit == "slide" and dsmil.signal == "none"


# ----------------------------------------------------------------------------- settings in one place
def test_each_value_parser_names_the_option_it_parses():
    from benchmark.settings.options import parse_indices

    assert parse_indices("0-4", "--folds") == [0, 1, 2, 3, 4] and parse_indices("0,2,2", "--folds") == [0, 2]
    assert parse_indices([3, 1], "--seed") == [1, 3] and parse_indices(2, "--repeat") == [2]
    for argv, option in ((["run", "--seed", "x"], "--seed"), (["run", "--folds", "a-b"], "--folds"),
                         (["run", "--repeat", "-1"], "--repeat"), (["run", "--shard", "3/2"], "--shard")):
        with pytest.raises(ValueError, match=f"^{option}"):
            configs_of(argv)


def test_defaults_then_experiment_file_then_command_line(tmp_path):
    from benchmark.settings.options import SETTINGS, TUNE_SETTINGS, run_settings

    path = tmp_path / "e.toml"
    path.write_text('jobs = 3\nselection = "inner"\n[set]\nlr = 1e-3\n[tune]\ntrials = 7\npruner = "none"\n')
    parser = argparse.ArgumentParser()
    run_command.register(parser.add_subparsers())
    merged = run_settings(parser.parse_args(["run", "--config", str(path), "--jobs", "2", "--set", "epochs=2"]))
    assert (merged["jobs"], merged["selection"], merged["unit"]) == (2, "inner", SETTINGS["unit"].default)
    assert merged["set"] == {"lr": "0.001", "epochs": "2"}
    assert merged["tune"]["trials"] == 7 and merged["tune"]["pruner"] == "none"
    assert merged["tune"]["inner_folds"] == TUNE_SETTINGS["inner_folds"].default


def test_every_allowed_value_set_reaches_argparse_from_one_declaration():
    from benchmark import choices
    from benchmark.execution.executors import EXECUTORS

    parser = argparse.ArgumentParser()
    run_command.register(parser.add_subparsers())
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    by_flag = {a.option_strings[0]: a.choices for a in run_parser._actions if a.option_strings}
    assert by_flag["--signal"] == choices.SIGNALS and by_flag["--layout"] == choices.LAYOUT_CHOICES
    assert by_flag["--bin-rule"] == choices.BIN_RULES and by_flag["--precision"] == choices.PRECISIONS
    assert by_flag["--missing-features"] == choices.MISSING_FEATURES
    assert tuple(by_flag["--executor"]) == EXECUTORS.names() == ("local", "ray")


def test_settings_reference_in_the_docs_is_the_generated_one():
    from benchmark.settings.options import SETTINGS, TUNE_SETTINGS, reference_markdown

    docs = (Path(__file__).resolve().parents[2] / "docs" / "SETTINGS.md").read_text()
    assert docs.strip() == reference_markdown().strip(), "regenerate: python -m benchmark list settings --markdown"
    assert all(f"| `{key}` |" in docs for key in [*SETTINGS, *TUNE_SETTINGS])


def test_settings_and_help_load_no_torch():
    code = ("import sys, contextlib, io\n"
            "import benchmark.settings.config, benchmark.settings.options\n"
            "assert 'torch' not in sys.modules, 'settings import torch'\n"
            "from benchmark import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--help'], ['run', '--help'], ['tune', '--help']):\n"
            "        try:\n"
            "            cli.main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "print(sorted(m for m in ('torch', 'sksurv', 'sklearn') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
