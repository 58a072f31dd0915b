"""A corpus of bad inputs: each case asserts the one-line message and the exit code of the command (or the error
of the data layer), and that no file outside the roots the case gives is read or written.

Commands run in-process through ``benchmark.cli.main``; the ``confined`` fixture records every table, feature,
coordinate and weight file the harness opens and every file that appears or changes outside the test's
temporary folder (the repository's ``data_cache/`` and ``results/`` included).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from benchmark import cli
from benchmark.data.bag import Needs
from benchmark.data.loader import load_cohort
from benchmark.settings.recipes import Recipe
from fakes import Confinement, snapshot

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------- fixtures
def test_the_confinement_check_notices_reads_and_writes_outside(tmp_path, tiny_root):
    guard = Confinement(tmp_path, tiny_root)
    guard.check()
    guard.opened.append(tiny_root / "blca" / "clinical.csv")
    with pytest.raises(AssertionError, match="read outside the roots"):
        guard.check()
    guard.check(tiny_root)
    escaped = tmp_path.parent / f"escaped-{os.getpid()}.h5"
    escaped.write_bytes(b"x")
    try:
        with pytest.raises(AssertionError, match="written outside the roots"):
            guard.check(tiny_root)
    finally:
        escaped.unlink()


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of ``python -m benchmark argv`` (in-process)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


@pytest.fixture()
def cohort_root(tiny_root, tmp_path):
    """A copy of the tiny synthetic BLCA cohort (resnet50 features only) under ``tmp_path/root``."""
    root = tmp_path / "root"
    shutil.copytree(tiny_root / "blca", root / "blca", ignore=shutil.ignore_patterns("conch"))
    return root


def _table(folder: Path, slide_ids=None, times=None, censorship=None, name="table.csv") -> Path:
    n = len(slide_ids) if slide_ids is not None else 10
    df = pd.DataFrame({
        "case_id": [f"P{i}" for i in range(n)],
        "slide_id": slide_ids if slide_ids is not None else [f"P{i}-a.svs" for i in range(n)],
        "survival_months": times if times is not None else [float(i + 1) for i in range(n)],
        "censorship": censorship if censorship is not None else [i % 2 for i in range(n)],
    })
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / name, index=False)
    return folder / name


def _splits(folder: Path, folds: list[tuple[list[str], list[str]]]) -> Path:
    from benchmark.data.splits import write_splits

    return write_splits(folder, folds)


# ------------------------------------------------------------------------------- options refused up front
RECIPE_VALUES = [
    ("lr=nan", r"--set lr=nan: recipe 'demo': lr must be a finite number, got nan"),
    ("lr=inf", r"--set lr=inf: recipe 'demo': lr must be a finite number, got inf"),
    ("lr=0", r"lr must be > 0"),
    ("weight_decay=-1e-4", r"weight_decay must be >= 0"),
    ("weight_decay=nan", r"weight_decay must be a finite number"),
    ("warmup_epochs=-1", r"warmup_epochs must be >= 0"),
    ("patience=-2", r"patience must be >= 1"),
    ("alpha=1.5", r"alpha must be >= 0.0 and <= 1.0"),
    ("epochs=0", r"epochs must be >= 1"),
    ("accumulation=0", r"accumulation must be >= 1"),
    ("inner_fraction=1", r"inner_fraction must be > 0.0 and < 1.0"),
    ("max_samples_per_epoch=0", r"max_samples_per_epoch must be >= 1"),
    ("schedule=linear", r"schedule must be one of cosine, constant"),
    ("epochs=many", r"--set epochs=many: cannot parse the value as int"),
    ("bogus=1", r"--set bogus: unknown recipe field"),
    ("lr", r"--set expects key=value"),
]


@pytest.mark.parametrize("assignment,message", RECIPE_VALUES, ids=[a for a, _ in RECIPE_VALUES])
def test_recipe_values_are_refused_before_any_cell(confined, capsys, assignment, message):
    code, err = run_cli(capsys, "run", "--set", assignment, "--results", "r")
    assert code == 2
    assert_one_line_error(err, message)
    assert not (confined.tmp_path / "r").exists()  # refused before the store or any cohort is touched
    confined.check()


OPTION_CASES = [
    ("bin-rule", ["run", "--bin-rule", "bogus"], r"argument --bin-rule: invalid choice: 'bogus'"),
    ("selection", ["run", "--selection", "best"], r"argument --selection: invalid choice: 'best'"),
    ("unit", ["run", "--unit", "case"], r"argument --unit: invalid choice: 'case'"),
    ("signal", ["run", "--signal", "loud"], r"argument --signal: invalid choice: 'loud'"),
    ("table format", ["table", "1", "--format", "xls"], r"argument --format: invalid choice: 'xls'"),
    ("km split", ["plot", "km", "--results", "r", "--method", "amil", "--split", "mean"],
     r"argument --split: invalid choice: 'mean'"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_enumerated_options_fail_at_parse_time(confined, capsys, argv, message):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and re.search(message, err)
    confined.check()


RUN_CASES = [
    ("device", ["--device", "tpu9"], r"^error: --device tpu9: "),
    ("cuda without cuda", ["--device", "cuda:7"], r"^error: --device cuda:7: "),
    ("recipe", ["--recipe", "papper"], r"unknown recipe 'papper'\. Did you mean 'paper'"),
    ("method", ["--methods", "amill"], r"unknown method 'amill'\. Did you mean 'amil'"),
    ("dataset", ["--dataset", "blcaa"], r"unknown dataset 'blcaa'\. Did you mean 'blca'"),
    ("backbone", ["--backbone", "uni3"], r"unknown backbone 'uni3'"),
    ("jobs", ["--jobs", "0"], r"--jobs must be >= 1"),
    ("warm-up not shorter than the run", ["--set", "epochs=2", "--set", "warmup_epochs=3"],
     r"warmup_epochs=3\.0 is not shorter than epochs=2"),
    ("unknown method option", ["--method-option", "amil.bogus=1"],
     r"--method-option amil\.bogus: method 'amil' takes no option 'bogus'; its options: attention_dim, dropout, hidden"),
    ("option no selected method takes", ["--methods", "amil,random", "--method-option", "dropout=0.1"],
     r"--method-option random\.dropout: method 'random' takes no option 'dropout'; its options: none"),
    ("method option of another method", ["--method-option", "dsmil.k=1"],
     r"--method-option dsmil\.k: method 'dsmil' is not among the selected methods"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_run_options_are_refused_in_one_line(confined, capsys, argv, message):
    if "cuda" in argv[-1] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, err = run_cli(capsys, "run", "--results", "r", *argv)
    assert code == 2
    assert_one_line_error(err, message)
    confined.check()


DATA_SOURCE_CASES = [
    ("clinical missing", ["--clinical", "{tmp}/none.csv.zip"], r"--clinical .*none\.csv\.zip: clinical table does not exist"),
    ("splits missing", ["--clinical", "{table}", "--splits", "{tmp}/nosplits"], r"--splits .*nosplits: does not exist"),
    ("features missing", ["--clinical", "{table}", "--features", "{tmp}/nofeatures"],
     r"--features .*nofeatures: does not exist"),
    ("features magnification", ["--clinical", "{table}", "--features", "40x={tmp}"],
     r"--features 40x=\.\.\.: magnification must be one of 20x, 10x, 5x"),
    ("features twice", ["--clinical", "{table}", "--features", "20x={tmp}", "20x={tmp}"], r"--features: 20x is given twice"),
    ("no features anywhere", ["--clinical", "{table}", "--splits", "{splits}"],
     r"no resnet50 features at 20x for any of the 10 slides in any known layout"),
    ("data root missing", ["--data-root", "{tmp}/noroot"], r"--data-root .*noroot: does not exist"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in DATA_SOURCE_CASES], ids=[c[0] for c in DATA_SOURCE_CASES])
def test_run_data_source_errors_are_one_line(confined, capsys, tmp_path, argv, message):
    table = _table(tmp_path / "data")
    splits = _splits(tmp_path / "data" / "splits", [([f"P{i}" for i in range(5)], [f"P{i}" for i in range(5, 10)])])
    filled = [a.format(tmp=tmp_path, table=table, splits=splits) for a in argv]
    code, err = run_cli(capsys, "run", "--results", tmp_path / "r", *filled)
    assert code == 2
    assert_one_line_error(err, message)
    assert not list((tmp_path / "r").rglob("*.json"))  # no cell ran
    confined.check()


@pytest.mark.parametrize("argv,message", [
    (["--layout", "clamm"], r"argument --layout: invalid choice: 'clamm'"),
    (["--missing-features", "skip"], r"argument --missing-features: invalid choice: 'skip'"),
], ids=["layout", "missing-features"])
def test_data_source_choices_fail_at_parse_time(confined, capsys, argv, message):
    code, err = run_cli(capsys, "run", *argv)
    assert code == 2 and re.search(message, err)


def test_operating_system_errors_name_the_file(confined, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(capsys, "synth", "--out", tmp_path / "afile" / "x", "--preset", "tiny", "--cohorts", "blca")
    assert code == 2
    assert_one_line_error(err, r"^error: .*afile/x: Not a directory$")


def test_results_that_is_a_file_or_under_a_file(confined, capsys, tmp_path):
    plain = tmp_path / "results.txt"
    plain.write_text("not a folder")
    code, err = run_cli(capsys, "run", "--results", plain)
    assert code == 2
    assert_one_line_error(err, rf"--results {plain}: exists and is not a directory")
    code, err = run_cli(capsys, "run", "--results", plain / "sub")
    assert code == 2
    assert_one_line_error(err, r"--results .*results\.txt/sub: a parent folder is a file")
    assert plain.read_text() == "not a folder"
    confined.check()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_results_without_write_permission(confined, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, err = run_cli(capsys, "run", "--results", locked / "store")
    assert code == 2
    assert_one_line_error(err, r"--results .*locked/store: permission denied")


def test_repeated_set_and_method_option_accumulate():
    args = cli.build_parser().parse_args(["run", "--set", "epochs=1", "--set", "lr=1e-3", "--method-option",
                                          "dropout=0.1", "--method-option", "amil.hidden=64"])
    assert args.overrides == ["epochs=1", "lr=1e-3"]
    assert args.method_options == ["dropout=0.1", "amil.hidden=64"]


def test_short_run_keeps_the_warmup_fraction_with_a_note():
    from benchmark.settings.recipes import get_recipe

    notes = []
    recipe = get_recipe("paper", {"epochs": "1"}, notes=notes)
    assert recipe.epochs == 1 and recipe.warmup_epochs == pytest.approx(0.25)
    assert len(notes) == 1 and "warm-up 5 epochs is not shorter than the 1-epoch run; using 0.25" in notes[0]
    with pytest.raises(ValueError, match="warmup_epochs=5.0 is not shorter than epochs=1"):
        Recipe("custom", epochs=1)  # the dataclass default warm-up (5) with one epoch


# ----------------------------------------------------------------------------------- plugins and registries
def _plugin_file(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


PLUGIN_CASES = [
    ("missing module", lambda t: "no_such_plugin_module", r"--plugin no_such_plugin_module: cannot import it \(No module"),
    ("missing file", lambda t: t / "nowhere" / "plugin.py", r"--plugin .*nowhere/plugin\.py: does not exist"),
    ("syntax error", lambda t: _plugin_file(t, "broken_syntax.py", "def (:\n"),
     r"--plugin .*broken_syntax\.py: importing it raised SyntaxError: .*broken_syntax\.py:1\)"),
    ("raises", lambda t: _plugin_file(t, "raises.py", "raise RuntimeError('boom')\n"),
     r"--plugin .*raises\.py: importing it raised RuntimeError: boom \(.*raises\.py:1\)"),
    ("bad method name", lambda t: _plugin_file(
        t, "bad_name.py", "from benchmark.api.registry import register_method\n"
                          "register_method('../evil')\n"),
     r"importing it raised ValueError: register_method: method name '\.\./evil' must be"),
]


@pytest.mark.parametrize("command", [["list", "methods"], ["table", "1", "--results", "r"],
                                     ["plot", "km", "--results", "r", "--method", "amil"],
                                     ["compare", "--results", "r", "--methods", "amil,dsmil"],
                                     ["bench", "--methods", "amil"], ["run"], ["audit", "--dataset", "blca"],
                                     ["report", "--results", "r"], ["synth", "--out", "s"]],
                         ids=lambda c: c[0] + (" " + c[1] if c[0] == "plot" else ""))
@pytest.mark.parametrize("make,message", [c[1:] for c in PLUGIN_CASES], ids=[c[0] for c in PLUGIN_CASES])
def test_plugin_failures_are_one_line_on_every_command(confined, capsys, tmp_path, command, make, message):
    plugin = make(tmp_path)
    code, err = run_cli(capsys, *command, "--plugin", plugin)
    assert code == 2
    assert_one_line_error(err, message)
    confined.check()


def test_plugin_before_the_command_and_from_a_file(confined, capsys, tmp_path):
    plugin = _plugin_file(tmp_path, "my_methods.py", (
        "from torch import nn\n"
        "from benchmark.api.registry import register_method\n"
        "@register_method('fileplugin', source='test', in_all=False)\n"
        "class FilePlugin(nn.Module):\n"
        "    def __init__(self, in_dim, n_bins=4):\n"
        "        super().__init__()\n"))
    from benchmark.api import registry

    try:
        assert cli.main(["--plugin", str(plugin), "list", "methods"]) == 0
        assert "fileplugin" in capsys.readouterr().out
        assert cli.main(["list", "methods", "--plugin", str(plugin)]) == 0  # after the command: loaded once
        assert "fileplugin" in capsys.readouterr().out
    finally:
        registry._REGISTRY.pop("fileplugin", None)


def test_registry_file_declares_a_cohort_and_a_backbone(confined, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # rich would shorten the names
    registry_file = _plugin_file(tmp_path, "mine.toml", (
        '[cohorts.tcga_kirc]\ntitle = "Kidney renal clear cell carcinoma"\n'
        '[backbones.virchow2]\ndim = 2560\ndescription = "Virchow2"\ntrident = "virchow2"\n'))
    assert cli.main(["list", "--registry", str(registry_file)]) == 0
    out = capsys.readouterr().out
    assert "tcga_kirc" in out and "virchow2" in out and "2560" in out


REGISTRY_CASES = [
    ("missing", lambda t: t / "none.toml", r"--registry .*none\.toml: does not exist"),
    ("invalid TOML", lambda t: _plugin_file(t, "bad.toml", "[cohorts.x\n"), r"--registry .*bad\.toml: invalid TOML"),
    ("path in a name", lambda t: _plugin_file(t, "escape.toml", '[cohorts."../../x"]\ntitle = "x"\n'),
     r"escape\.toml: cohort name '\.\./\.\./x' must be letters, digits"),
    ("name defined twice", lambda t: _plugin_file(t, "twice.toml", "[cohorts.blca]\ntitle = 'again'\n"),
     r"twice\.toml: cohort 'blca' is already defined in .*cohorts\.toml"),
    ("backbone without dim", lambda t: _plugin_file(t, "nodim.toml", "[backbones.virchow2]\ndescription = 'v'\n"),
     r"nodim\.toml: backbone 'virchow2' lacks field 'dim'"),
    ("backbone with NaN signal", lambda t: _plugin_file(
        t, "nan.toml", "[backbones.virchow2]\ndim = 2560\nsynthetic_signal = nan\n"),
     r"nan\.toml: backbone 'virchow2': synthetic_noise and synthetic_signal must be >= 0"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in REGISTRY_CASES], ids=[c[0] for c in REGISTRY_CASES])
def test_registry_failures_are_one_line(confined, capsys, tmp_path, make, message):
    code, err = run_cli(capsys, "--registry", make(tmp_path), "list", "datasets")
    if code == 0:  # the file is only parsed: ask for the backbones too
        code, err = run_cli(capsys, "--registry", make(tmp_path), "list", "backbones")
    assert code == 2
    assert_one_line_error(err, message)
    confined.check()


def test_registry_from_the_environment_must_exist(confined, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MIL_BENCHMARK_REGISTRY", str(tmp_path / "gone.toml"))
    code, err = run_cli(capsys, "list", "datasets")
    assert code == 2
    assert_one_line_error(err, r"\$MIL_BENCHMARK_REGISTRY .*gone\.toml: registry file does not exist")


# ----------------------------------------------------------------------------------------- tables and splits
ESCAPING_SLIDE_IDS = [
    ("relative escape", "../../outside/evil.svs", "contains a path separator"),
    ("absolute path", "/tmp/evil.svs", "contains a path separator"),
    ("dot-dot", "...svs", "contains '..'"),
    ("parent", "..", "contains '..'"),
    ("backslash", "..\\evil.svs", "contains a path separator"),
    ("empty", "  ", "is empty"),
]


@pytest.mark.parametrize("slide,problem", [c[1:] for c in ESCAPING_SLIDE_IDS], ids=[c[0] for c in ESCAPING_SLIDE_IDS])
def test_slide_ids_that_leave_the_feature_folder_are_refused(confined, capsys, tmp_path, slide, problem):
    decoy = tmp_path / "outside" / "evil.h5"  # what an escaping ID would reach
    decoy.parent.mkdir()
    decoy.write_bytes(b"decoy")
    ids = [f"P{i}-a.svs" for i in range(9)] + [slide]
    table = _table(tmp_path / "data", slide_ids=ids)
    splits = _splits(tmp_path / "data" / "splits", [([f"P{i}" for i in range(5)], [f"P{i}" for i in range(5, 10)])])
    code, err = run_cli(capsys, "audit", "--dataset", "blca", "--clinical", table, "--splits", splits)
    assert code == 2
    assert_one_line_error(err, rf"{table}: slide ID .* {problem}")
    assert decoy not in confined.opened
    confined.check(tmp_path / "data")


TABLE_CASES = [
    ("missing table", lambda t: t / "none.csv", r"none\.csv: clinical table does not exist"),
    ("folder as table", lambda t: (t / "folder.csv").mkdir() or t / "folder.csv", r"folder\.csv: clinical table is not a file"),
    ("corrupt zip", lambda t: _plugin_file(t, "broken.csv.zip", "PK\x03\x04 not really a zip"),
     r"broken\.csv\.zip: could not be read as a CSV table"),
    ("missing columns", lambda t: _plugin_file(t, "cols.csv", "case_id,slide_id\nP1,P1-a\n"),
     r"cols\.csv: missing required column\(s\) \['survival_months', 'censorship'\]"),
    ("negative time", lambda t: _table(t, times=[-1.0] + [1.0] * 9, name="neg.csv"), r"neg\.csv: negative 'survival_months'"),
    ("censorship 2", lambda t: _table(t, censorship=[2] + [0] * 9, name="cens.csv"), r"cens\.csv: 'censorship' must be 0"),
]


@pytest.mark.parametrize("make,message", [c[1:] for c in TABLE_CASES], ids=[c[0] for c in TABLE_CASES])
def test_bad_clinical_tables(confined, capsys, tmp_path, make, message):
    table = make(tmp_path)
    splits = _splits(tmp_path / "splits", [(["P0"], ["P1"])])
    code, err = run_cli(capsys, "audit", "--dataset", "blca", "--clinical", table, "--splits", splits)
    assert code == 2
    assert_one_line_error(err, message)
    confined.check()


def test_missing_or_empty_split_folder(confined, capsys, tmp_path):
    table = _table(tmp_path)
    code, err = run_cli(capsys, "audit", "--dataset", "blca", "--clinical", table, "--splits", tmp_path / "nosplits")
    assert code == 2
    assert_one_line_error(err, r"nosplits: no splits_\{k\}\.csv files in this folder")
    (tmp_path / "splits").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--splits .*splits: no splits_\{k\}\.csv files"):
        load_cohort("blca", data_root=tmp_path, clinical=table, splits=tmp_path / "splits")


@pytest.mark.parametrize("val,problem", [([], "fold 0: empty validation split"),
                                         (["P1", "P3"], "fold 0: no events in the validation split (2 censored "
                                                        "patients): C-index undefined")],
                         ids=["empty validation", "no events"])
def test_audit_fails_on_unusable_validation_folds(confined, capsys, tmp_path, val, problem):
    table = _table(tmp_path)  # odd patients are censored
    train = [f"P{i}" for i in range(10) if f"P{i}" not in val]
    splits = _splits(tmp_path / "splits", [(train, val)])
    code = cli.main(["audit", "--dataset", "blca", "--clinical", str(table), "--splits", str(splits)])
    out = capsys.readouterr().out
    assert code == 1 and problem in " ".join(out.split())
    confined.check()


def test_repeated_bin_edges_name_cohort_and_fold(confined, tmp_path):
    table = _table(tmp_path, times=[5.0] * 10, censorship=[0] * 10)
    splits = _splits(tmp_path / "splits", [([f"P{i}" for i in range(8)], ["P8", "P9"])])
    cohort = load_cohort("blca", clinical=table, splits=splits, features=tmp_path, layout="clam",
                         check_features=False)
    with pytest.raises(ValueError, match=r"cohort 'blca' fold 0 \(training samples\): the 4 time bins have "
                                         r"repeated edges .*8 uncensored times hold 1 distinct value"):
        cohort.bins(0)
    confined.check()


# ------------------------------------------------------------------------------------------------- features
def _first_slide(root: Path) -> str:
    return pd.read_csv(root / "blca" / "clinical.csv")["slide_id"].iloc[0].removesuffix(".svs")


def test_missing_features_error_names_count_and_option(confined, cohort_root):
    feats = cohort_root / "blca" / "features" / "resnet50"
    gone = sorted(feats.glob("*.h5"))[:5]
    for path in gone:
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"clinical\.csv: 5 slide\(s\) of the table's \d+ have no resnet50 "
                                                r"feature file \(default layout\), e.g\. slide .*, \.\.\.; .*"
                                                r"Pass --missing-features drop"):
        load_cohort("blca", data_root=cohort_root)
    confined.check(cohort_root)


def test_missing_features_drop_reports_each_fold(confined, cohort_root):
    full = load_cohort("blca", data_root=cohort_root)
    single = full.samples.index[full.samples["slide_ids"].map(len) == 1][:3]
    for sample in single:
        (cohort_root / "blca" / "features" / "resnet50" / f"{full.samples.at[sample, 'slide_ids'][0]}.h5").unlink()
    cohort = load_cohort("blca", data_root=cohort_root, missing_features="drop")
    report = cohort.provenance["missing_features"]
    assert report["slides_dropped"] == 3 and report["samples_dropped"] == 3
    assert len(cohort.samples) == len(full.samples) - 3
    for row, before, after in zip(report["folds"], full.folds, cohort.folds):
        assert row["train_dropped"] + row["val_dropped"] == sum(s in single for s in before.train + before.val)
        assert (row["train"], row["val"]) == (len(after.train), len(after.val))
    assert sum(r["val_dropped"] for r in report["folds"]) == 3  # each patient is validated once
    confined.check(cohort_root)


FEATURE_OPTION_CASES = [
    ("magnification", lambda r: {"40x": r}, ValueError, r"--features 40x=\.\.\.: magnification must be one of"),
    ("missing folder", lambda r: [str(r / "nowhere")], FileNotFoundError, r"--features .*nowhere: does not exist"),
    ("file as folder", lambda r: [str(r / "blca" / "clinical.csv")], FileNotFoundError, r"clinical\.csv: is not a directory"),
    ("mixed", lambda r: [str(r), f"20x={r}"], ValueError, r"either one folder or one folder per magnification"),
]


@pytest.mark.parametrize("make,error,message", [c[1:] for c in FEATURE_OPTION_CASES],
                         ids=[c[0] for c in FEATURE_OPTION_CASES])
def test_bad_feature_options(confined, cohort_root, make, error, message):
    with pytest.raises(error, match=message):
        load_cohort("blca", data_root=cohort_root, features=make(cohort_root))
    confined.check(cohort_root)


@pytest.mark.parametrize("option,value,message", [
    ("layout", "clamm", r"--layout clamm: unknown feature layout"),
    ("missing_features", "skip", r"--missing-features skip: must be one of error, drop"),
    ("unit", "case", r"--unit case: must be one of patient, slide"),
])
def test_bad_loader_choices(confined, cohort_root, option, value, message):
    with pytest.raises(ValueError, match=message):
        load_cohort("blca", data_root=cohort_root, **{option: value})


def _edit_h5(path: Path, group: str, name: str, value: np.ndarray) -> None:
    with h5py.File(path, "a") as f:
        del f[group][name]
        f[group][name] = value


def test_nan_float_coordinates_name_the_file(confined, cohort_root):
    slide = _first_slide(cohort_root)
    path = cohort_root / "blca" / "features" / "resnet50" / f"{slide}.h5"
    with h5py.File(path, "r") as f:
        coords = f["20x"]["coords"][()].astype(float)
    coords[0, 1] = np.nan
    _edit_h5(path, "20x", "coords", coords)
    cohort = load_cohort("blca", data_root=cohort_root)
    sample = cohort.slides.set_index("slide_id").at[slide, "patient_id"]
    with pytest.raises(ValueError, match=rf"{path.name}\[20x\]: coords contain NaN or inf values \(1 of"):
        cohort.bag(sample, Needs(magnifications=(20,), coords=True))
    confined.check(cohort_root)


def _pt_cohort(cohort_root: Path) -> tuple[Path, str, Path]:
    """The cohort's 20x features as CLAM pt_files (no h5_files) in a FEAT_DIR; returns (FEAT_DIR, slide, file)."""
    feat_dir = cohort_root / "feat_dir"
    (feat_dir / "pt_files").mkdir(parents=True)
    for path in (cohort_root / "blca" / "features" / "resnet50").glob("*.h5"):
        with h5py.File(path, "r") as f:
            torch.save(torch.from_numpy(f["20x"]["features"][()]), feat_dir / "pt_files" / f"{path.stem}.pt")
    slide = _first_slide(cohort_root)
    return feat_dir, slide, feat_dir / "pt_files" / f"{slide}.pt"


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"not a readable torch feature file \(truncated or corrupt"),
    ("torch-saved object", r"holds pickled Python objects, not a plain tensor \(refused: unpickling can run code"),
    ("raw pickle", r"not a readable torch feature file \(corrupt, or pickled objects torch refuses to load"),
    ("garbage", r"not a readable torch feature file"),
])
def test_unreadable_pt_feature_file_is_one_line_naming_it(confined, cohort_root, damage, message):
    feat_dir, slide, path = _pt_cohort(cohort_root)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "torch-saved object":
        torch.save({"features": Recipe("x")}, path)
    elif damage == "raw pickle":
        path.write_bytes(pickle.dumps(Recipe("x")))
    else:
        path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=rf"{path.name}: {message}") as info:  # the header check, before any cell
        load_cohort("blca", data_root=cohort_root, features=[str(feat_dir)], layout="clam")
    assert "\n" not in str(info.value)
    cohort = load_cohort("blca", data_root=cohort_root, features=[str(feat_dir)], layout="clam", check_dims=False)
    sample = cohort.slides.set_index("slide_id").at[slide, "patient_id"]
    with pytest.raises(ValueError, match=rf"{path.name}: {message}") as info:
        cohort.bag(sample, Needs(magnifications=(20,)))
    assert "\n" not in str(info.value)
    confined.check(cohort_root)


def test_corrupt_h5_feature_file(confined, cohort_root):
    slide = _first_slide(cohort_root)
    path = cohort_root / "blca" / "features" / "resnet50" / f"{slide}.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(ValueError, match=rf"{path.name}: not a readable h5 file"):  # the header check
        load_cohort("blca", data_root=cohort_root)
    cohort = load_cohort("blca", data_root=cohort_root, check_dims=False)
    sample = cohort.slides.set_index("slide_id").at[slide, "patient_id"]
    with pytest.raises(ValueError, match=rf"{path.name}: not a readable h5 file"):
        cohort.bag(sample, Needs(magnifications=(20,)))


def test_pt_without_coordinates_says_so(confined, cohort_root):
    feat_dir, slide, path = _pt_cohort(cohort_root)
    shutil.rmtree(cohort_root / "blca" / "features")
    cohort = load_cohort("blca", data_root=cohort_root, features=[str(feat_dir)], layout="clam")
    sample = cohort.slides.set_index("slide_id").at[slide, "patient_id"]
    with pytest.raises(FileNotFoundError, match=rf"{path.name}: coordinates requested, but no coordinate file"):
        cohort.bag(sample, Needs(magnifications=(20,), coords=True))


def test_ten_x_is_never_read_from_a_single_20x_folder(confined, cohort_root):
    feat_dir, slide, _ = _pt_cohort(cohort_root)
    cohort = load_cohort("blca", data_root=cohort_root, features=[str(feat_dir)], layout="clam")
    sample = cohort.slides.set_index("slide_id").at[slide, "patient_id"]
    with pytest.raises(FileNotFoundError, match=r"no resnet50 feature file at 10x"):
        cohort.bag(sample, Needs(magnifications=(10,)))
    only20 = load_cohort("blca", data_root=cohort_root, features=[f"20x={feat_dir}"], layout="clam")
    with pytest.raises(FileNotFoundError, match=r"--features: no folder for 10x features \(given: 20x\)"):
        only20.bag(sample, Needs(magnifications=(10,)))


# ------------------------------------------------------------------------------------------- store hygiene
def test_stale_temporary_files_are_removed(confined, tmp_path):
    from benchmark.store.records import ResultStore

    run_dir = tmp_path / "store" / "cells" / "amil" / "blca" / "resnet50" / "demo-last-s0"
    run_dir.mkdir(parents=True)
    dead = run_dir / ".fold0.json.999999999.abc123.tmp"  # no such pid
    mine = run_dir / f".fold1.json.{os.getpid()}.def456.tmp"
    old_anonymous = run_dir / ".fold2.json.xyz.tmp"
    for path in (dead, mine, old_anonymous):
        path.write_text("{")
    os.utime(old_anonymous, (0, 0))
    removed = ResultStore(tmp_path / "store").prepare()
    assert set(removed) == {dead, old_anonymous} and mine.exists()


@pytest.fixture()
def trained_store(tiny_root, tmp_path):
    """One trained AMIL cell (fold 0 of tiny BLCA) with weights; returns (store, config, execution)."""
    from benchmark.store.records import ResultStore
    from benchmark.settings.config import RunConfig
    from benchmark.settings.recipes import register_recipe
    from benchmark.execution.cells import Execution, run_cell

    register_recipe(Recipe("bad-inputs-tiny", lr=1e-3, epochs=1, accumulation=4, warmup_epochs=0,
                           max_samples_per_epoch=8))
    config = RunConfig("amil", "blca", "resnet50", 0, 0, recipe="bad-inputs-tiny", data_root=str(tiny_root))
    store, execution = ResultStore(tmp_path / "store"), Execution(device="cpu")
    assert run_cell(config, store, execution)["status"] == "ok"
    return store, config, execution


@pytest.mark.parametrize("damage", ["weights garbage", "weights truncated", "weights pickled", "weights missing",
                                    "record truncated"])
def test_rerun_redoes_a_cell_with_unreadable_weights_or_record(confined, trained_store, damage):
    from benchmark.execution.grid import plan_grid, run_grid

    store, config, execution = trained_store
    weights, record = store.weights_path(config.cell), store.record_path(config.cell)
    if damage == "weights garbage":
        weights.write_bytes(b"garbage")
    elif damage == "weights truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "weights pickled":
        weights.write_bytes(pickle.dumps(Recipe("x")))
    elif damage == "weights missing":
        weights.unlink()
    else:
        record.write_text(record.read_text()[:50])
    plan = plan_grid([config], store)
    assert plan.todo == [config]
    assert any(word in plan.rerun_reasons[config.cell.label()] for word in ("unreadable", "missing"))
    report = run_grid([config], store, execution, show_progress=False)
    assert [r["status"] for r in report.ran] == ["ok"] and not report.skipped
    assert run_grid([config], store, execution, show_progress=False).skipped == [config]  # repaired


@pytest.mark.parametrize("damage", ["garbage", "pickled", "other model"])
def test_heatmap_with_unreadable_weights_is_one_line(confined, capsys, trained_store, tiny_root, damage):
    store, config, _ = trained_store
    weights = store.weights_path(config.cell)
    if damage == "garbage":
        weights.write_bytes(b"garbage")
    elif damage == "pickled":
        weights.write_bytes(pickle.dumps(Recipe("x")))
    else:
        torch.save({"unexpected": torch.zeros(2)}, weights)
    slide = _first_slide(tiny_root)
    code, err = run_cli(capsys, "plot", "heatmap", "--results", store.root, "--method", "amil", "--dataset", "blca",
                        "--slide", slide, "--fold", "0", "--out", store.root / "figures")
    assert code == 2
    assert_one_line_error(err, r"fold0\.pt: unreadable weights \((UnpicklingError|RuntimeError): ")
    confined.check(tiny_root)


@pytest.mark.parametrize("name", ["../../evil", "/abs/evil", "a/../../b", "..", "TCGA-XX-0001-01Z-00-DX1.0A1B"])
def test_figure_names_stay_under_out(tmp_path, name):
    from benchmark.analysis.plots import figure_stem

    out = tmp_path / "figures"
    stem = figure_stem(out, "heatmap", "amil", "blca", name, "fold0")
    assert out.resolve() in stem.parents and "/" not in stem.name and not stem.name.startswith(".")
    if name.startswith("TCGA"):
        assert stem.name == f"heatmap_amil_blca_{name}_fold0"  # dots kept; .png appended, not substituted


def test_generated_splits_honour_the_data_cache_variable(confined, cohort_root, tmp_path):
    shutil.rmtree(cohort_root / "blca" / "splits")
    (cohort_root / "blca" / "splits").write_text("a file where the split folder would go")
    repo_cache = snapshot(REPO / "data_cache")
    cohort = load_cohort("blca", data_root=cohort_root)
    assert cohort.provenance["splits_generated"]
    assert Path(cohort.provenance["splits"]).is_relative_to((tmp_path / "cache" / "splits").resolve())
    assert snapshot(REPO / "data_cache") == repo_cache
    confined.check(cohort_root)


# ------------------------------------------------------------------------------------- --debug and real bugs
def test_debug_shows_the_traceback(confined, capsys):
    with pytest.raises(ValueError, match="--device tpu9"):
        cli.main(["--debug", "run", "--device", "tpu9", "--results", "r"])
    with pytest.raises(ValueError, match="lr must be a finite number"):
        cli.main(["run", "--set", "lr=nan", "--debug"])


def test_a_real_bug_keeps_its_traceback(confined, monkeypatch):
    import benchmark.commands.list as list_command

    def buggy(args):
        return {}["missing"]  # a bare KeyError: a bug, not bad input

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "list", buggy))
    with pytest.raises(KeyError):
        cli.main(["list", "methods"])
    assert list_command  # the command module itself is untouched


def _with_func(parser, command: str, func):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict) and command in action.choices:
            action.choices[command].set_defaults(func=func)
    return parser


def test_cli_module_runs_as_a_subprocess(tmp_path):
    """The ``python -m benchmark`` entry point itself: exit code 2 and one line, without a traceback."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO), "MIL_BENCHMARK_DATA": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "benchmark", "--plugin", "no_such_plugin_module", "list", "methods"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: --plugin no_such_plugin_module: cannot import it")


def test_validation_fold_without_events_is_recorded_and_footnoted(confined, cohort_root):
    from benchmark.analysis.tables import table1
    from benchmark.data.splits import write_splits
    from benchmark.store.records import ResultStore
    from benchmark.settings.config import RunConfig
    from benchmark.settings.recipes import register_recipe
    from benchmark.execution.cells import Execution, run_cell

    patients = load_cohort("blca", data_root=cohort_root).samples
    censored = patients.index[patients["event"] == 0][:6].tolist()
    shutil.rmtree(cohort_root / "blca" / "splits")
    write_splits(cohort_root / "blca" / "splits", [([p for p in patients.index if p not in censored], censored)])
    register_recipe(Recipe("bad-inputs-tiny", lr=1e-3, epochs=1, accumulation=4, warmup_epochs=0,
                           max_samples_per_epoch=8))
    store = ResultStore(cohort_root / "store")
    config = RunConfig("amil", "blca", recipe="bad-inputs-tiny", data_root=str(cohort_root))
    summary = run_cell(config, store, Execution(device="cpu"))
    record = store.read(config.cell)
    assert summary["status"] == "ok" and record["notes"] == ["no events: C-index undefined"]
    assert record["metrics"]["c_index"] is None
    notes = table1(store.records()).notes
    assert "amil / blca: fold(s) 0 have no events in validation (no events: C-index undefined); the mean leaves " \
           "them out." in notes
    confined.check(cohort_root)


def test_store_refuses_a_cell_folder_outside_its_root(confined, tmp_path):
    from benchmark.store.records import ResultStore

    record = {"method": "amil", "cohort": "blca", "backbone": "resnet50", "fold": 0, "seed": 0,
              "recipe": "../../../../../escaped", "selection": "last", "status": "ok"}
    with pytest.raises(ValueError, match="resolves outside"):
        ResultStore(tmp_path / "store").write(record)
    assert not list(tmp_path.rglob("fold0.json"))
    confined.check()


def test_short_paper_run_prints_the_warmup_note(confined, capsys, tiny_root, tmp_path):
    code = cli.main(["run", "--methods", "random", "--dataset", "blca", "--data-root", str(tiny_root),
                     "--recipe", "paper", "--set", "epochs=1", "--folds", "0", "--device", "cpu",
                     "--results", str(tmp_path / "r")])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0
    assert ("note: recipe paper: warm-up 5 epochs is not shorter than the 1-epoch run; using 0.25 (the recipe's "
            "fraction 25% of the epochs)") in out
    assert "warmup_epochs=0.25" in out  # the recipe line shows what ran
    confined.check(tiny_root)


TABLE_VALUE_CASES = [
    ("missing time", dict(times=[1.0, None] + [2.0] * 8), r"missing or non-numeric 'survival_months' in 1 row\(s\), "
                                                           r"e\.g\. slide 'P1-a\.svs'"),
    ("infinite time", dict(times=[float("inf")] + [2.0] * 9), r"missing or non-numeric 'survival_months' in 1 row"),
    ("duplicate slide", dict(slide_ids=["P0-a.svs", "P0-a.svs"] + [f"P{i}-a.svs" for i in range(2, 10)]),
     r"duplicate slide IDs \(1\), e\.g\. \['P0-a'\]"),
]


@pytest.mark.parametrize("changes,message", [c[1:] for c in TABLE_VALUE_CASES], ids=[c[0] for c in TABLE_VALUE_CASES])
def test_bad_table_values(confined, capsys, tmp_path, changes, message):
    table = _table(tmp_path, **changes)
    splits = _splits(tmp_path / "splits", [(["P0"], ["P1"])])
    code, err = run_cli(capsys, "audit", "--dataset", "blca", "--clinical", table, "--splits", splits)
    assert code == 2
    assert_one_line_error(err, rf"table\.csv: {message}")
    confined.check()


def _poison(value):
    def change(x):
        x = x.copy()
        x[1, 3] = value
        return x
    return change


BAG_CASES = [
    ("empty bag", lambda x: x[:0], r"\[20x\]: empty bag \(0 patches\)"),
    ("NaN features", _poison(np.nan), r"\[20x\]: features contain NaN or inf values \(1 of"),
    ("inf features", _poison(np.inf), r"\[20x\]: features contain NaN or inf values \(1 of"),
]  # a wrong dim is refused before any cell: tests/commands/test_own_cohort.py


@pytest.mark.parametrize("damage,message", [c[1:] for c in BAG_CASES], ids=[c[0] for c in BAG_CASES])
def test_bad_bags_fail_their_cell_naming_the_file(confined, capsys, cohort_root, damage, message):
    slide = _first_slide(cohort_root)
    path = cohort_root / "blca" / "features" / "resnet50" / f"{slide}.h5"
    with h5py.File(path, "r") as f:
        new = damage(f["20x"]["features"][()])
    _edit_h5(path, "20x", "features", new)
    _edit_h5(path, "20x", "coords", np.zeros((len(new), 2), dtype=np.int64))
    results = confined.tmp_path / "r"
    argv = ["run", "--methods", "amil", "--dataset", "blca", "--data-root", cohort_root, "--folds", "0-4",
            "--set", "epochs=1", "--set", "max_samples_per_epoch=200", "--device", "cpu", "--results", results]
    code, _ = run_cli(capsys, *argv, "--strict")
    errors = [json.loads(p.read_text()) for p in results.rglob("fold*.json")]
    errors = [r for r in errors if r["status"] == "error"]
    assert code == 1 and errors  # the fold that reads the slide failed, the grid went on
    first_line = errors[0]["error"].splitlines()[0]
    assert re.search(rf"ValueError: .*{path.name}{message}", first_line), first_line
    confined.check(cohort_root)


def test_degenerate_labels_stop_the_run_before_any_cell(confined, capsys, cohort_root):
    table = cohort_root / "blca" / "clinical.csv"
    df = pd.read_csv(table)
    df["survival_months"] = 5.0  # every time equal: the bin edges collapse
    df.to_csv(table, index=False)
    code, err = run_cli(capsys, "run", "--dataset", "blca", "--data-root", cohort_root, "--device", "cpu",
                        "--results", confined.tmp_path / "r")
    assert code == 2
    assert_one_line_error(err, r"cohort 'blca' fold 0 \(training samples\): the 4 time bins have repeated edges")
    assert not list((confined.tmp_path / "r").rglob("*.json"))
    confined.check(cohort_root)


def test_a_user_cohort_without_facts_has_no_synthetic_data(confined, capsys, tmp_path):
    registry_file = _plugin_file(tmp_path, "kirc.toml", '[cohorts.tcga_kirc]\ntitle = "KIRC"\n')
    code, err = run_cli(capsys, "run", "--registry", registry_file, "--dataset", "tcga_kirc", "--device", "cpu",
                        "--results", tmp_path / "r")
    assert code == 2
    assert_one_line_error(err, r"kirc\.toml: cohort 'tcga_kirc' declares no table facts .* give its real data "
                               r"\(--clinical, --features\)")
    confined.check()
