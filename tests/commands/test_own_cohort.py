"""A user's own cohort, end to end, as docs/DATA.md walks through it: a clinical CSV with its own column names
(``patient``, ``slide``, ``os_months``, ``dead`` with 1 = died), CLAM features (``FEAT_DIR/h5_files``) from a
1024-d backbone declared in a registry file, no split files: ``splits`` -> ``audit`` -> ``run`` -> ``table`` ->
``report``; then each mistake a user makes on that path as one line (or one warning)."""
from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pandas as pd
import pytest

from benchmark import cli
from benchmark.data.cohorts import clear_registry_caches

MAPPING = "patient=patient,slide=slide,time=os_months,event=dead"
CANONICAL = "patient=patient,slide=slide,time=os_months,event=dead,unit=months"
N_PATIENTS = 24


def write_cohort(root, feat_name="FEAT_DIR", dim=1024, without=("P001_S0",)):
    """The user's files: clinical.csv (one row per slide, every 4th patient with two slides), CLAM h5 features
    with a planted risk coordinate (none for the slides in ``without``), a registry with cohort and backbone."""
    rng = np.random.default_rng(0)
    feat = root / feat_name / "h5_files"
    feat.mkdir(parents=True)
    rows = []
    for i in range(N_PATIENTS):
        risk = rng.normal()
        months, dead = round(float(rng.exponential(30 * np.exp(-risk))) + 0.5, 2), int(i % 2 == 0 or i % 5 == 0)
        for s in range(1 + (i % 4 == 0)):
            slide = f"P{i:03d}_S{s}"
            rows.append({"patient": f"P{i:03d}", "slide": f"{slide}.svs", "os_months": months, "dead": dead})
            if slide in without:
                continue
            x = rng.normal(size=(10, dim)).astype("float32")
            x[:, 0] += risk
            with h5py.File(feat / f"{slide}.h5", "w") as f:
                f["features"] = x
                f["coords"] = (np.arange(20).reshape(10, 2) * 256).astype("int64")
    pd.DataFrame(rows).to_csv(root / "clinical.csv", index=False)
    (root / "registry.toml").write_text('[cohorts.mycohort]\ntitle = "My cohort"\n\n'
                                        '[backbones.myresnet]\ndim = 1024\ndescription = "our ResNet"\n')
    return root


@pytest.fixture()
def own(tmp_path, monkeypatch):
    monkeypatch.setenv("MIL_BENCHMARK_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("MIL_BENCHMARK_REGISTRY", "")  # --registry adds to it; restored afterwards
    clear_registry_caches()
    yield write_cohort(tmp_path / "user")
    monkeypatch.undo()
    clear_registry_caches()


def cli_run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, " ".join(captured.out.split()), captured.err


def one_line(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


def patients_of(root) -> pd.DataFrame:
    return pd.read_csv(root / "clinical.csv").groupby("patient")[["os_months", "dead"]].first()


def common(root):
    return ["--registry", root / "registry.toml", "--dataset", "mycohort", "--clinical", root / "clinical.csv",
            "--columns", MAPPING]


def test_own_cohort_end_to_end(own, capsys):
    base = common(own)
    patients = patients_of(own)
    # splits: written where the user says, printed, patient-level and stratified (every val fold has events)
    code, out, _ = cli_run(capsys, "splits", *base, "--out", own / "splits", "--folds", "3", "--seed", "1")
    assert code == 0 and f"wrote 3 split file(s) to {own / 'splits'}" in out
    assert sorted(p.name for p in (own / "splits").iterdir()) == ["splits_0.csv", "splits_1.csv", "splits_2.csv",
                                                                  "splits_info.json"]
    vals = [pd.read_csv(own / "splits" / f"splits_{k}.csv", dtype=str)["val"].dropna().tolist() for k in range(3)]
    assert sorted(sum(vals, [])) == sorted(patients.index) and all(patients.loc[v, "dead"].sum() > 0 for v in vals)
    info = json.loads((own / "splits" / "splits_info.json").read_text())
    assert info["command"] == "benchmark splits" and info["seed"] == 1 and info["n_folds"] == 3

    # audit: the mapping it used, events / censored / event rate, the feature dims; it writes nothing
    before = sorted(p.relative_to(own) for p in own.rglob("*"))
    code, out, _ = cli_run(capsys, "audit", *base, "--splits", own / "splits", "--features", own / "FEAT_DIR",
                           "--backbone", "myresnet", "--missing-features", "drop")
    assert code == 0, out
    events = int(patients["dead"].sum())
    assert "event <- 'dead' (1 = event observed)" in out and "time <- 'os_months' (months)" in out
    assert f"labels: {events} events, {N_PATIENTS - events} censored, event rate {events / N_PATIENTS:.3f} " \
           f"({N_PATIENTS} patients)" in out and "every file 1024-d (myresnet)" in out
    assert "generated by `benchmark splits` (seed 1, 3 folds" in out
    assert sorted(p.relative_to(own) for p in own.rglob("*")) == before

    # run: one light method, 2 folds; the split origin and the mapping are printed and recorded
    results = own / "results"
    code, out, err = cli_run(capsys, "run", *base, "--splits", own / "splits", "--features", own / "FEAT_DIR",
                             "--backbone", "myresnet", "--missing-features", "drop", "--methods", "amil",
                             "--folds", "0,1", "--recipe", "demo", "--set", "epochs=1", "--set",
                             "max_samples_per_epoch=8", "--device", "cpu", "--results", results, "--strict")
    assert code == 0, err
    assert f"mycohort/myresnet: splits given: {own / 'splits'}; generated by `benchmark splits` (seed 1" in out
    assert "mycohort/myresnet: columns patient <- 'patient'" in out
    records = [json.loads(p.read_text()) for p in sorted(results.rglob("fold*.json"))]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    data = records[0]["provenance"]["data"]
    assert records[0]["config"]["columns"] == CANONICAL and data["columns"] == CANONICAL
    assert data["synthetic"] is None and data["splits_info"]["command"] == "benchmark splits"
    # the sizes that trained: the split files' folds less the patient without a feature file
    def kept(k, part):  # the patients of a split file's part that have a feature file (P001 has none)
        ids = pd.read_csv(own / "splits" / f"splits_{k}.csv", dtype=str)[part].dropna().tolist()
        return len([p for p in ids if p != "P001"])

    for r in records:
        trained = (r["data_sizes"]["n_train"], r["data_sizes"]["n_val"])
        assert trained == (kept(r["fold"], "train"), kept(r["fold"], "val"))
        assert len(r["predictions"]) == trained[1]
        assert r["missing_features"]["fold"]["train"] + r["missing_features"]["fold"]["val"] == N_PATIENTS - 1

    # table: the cohorts present (no empty TCGA columns), --dataset
    code, out, _ = cli_run(capsys, "table", "1", "--results", results, "--dataset", "mycohort")
    assert code == 0 and "| Method | MYCOHORT |" in out and "BLCA" not in out and "backbone myresnet" in out

    # report: the data source as recorded (not "synthetic"), the sizes that trained, D-calibration per method
    code, _, err = cli_run(capsys, "report", "--results", results, "--out", own / "rep" / "report.md",
                           "--n-boot", "20", "--dataset", "mycohort")
    assert code == 0, err
    text = (own / "rep" / "report.md").read_text()
    assert "synthetic" not in text.lower()
    assert f"real data: clinical table {own / 'clinical.csv'}, features {own / 'FEAT_DIR'} (clam layout), " \
           f"columns {CANONICAL}" in text
    assert "generated by `benchmark splits` (seed 1, 3 folds" in text
    for r in records:
        row = f"| 0 | {r['fold']} | {r['data_sizes']['n_train']} | {r['data_sizes']['n_val']} |"
        assert row in text
    calibration = text.split("**D-calibration")[1].split("## ")[0]
    assert re.search(r"\| method \| mycohort \|\n\|---\|---\|\n\| amil \| 0\.\d{3}( \(no power: \d+% censored\))? \|", calibration)


def test_run_prints_where_generated_splits_went_and_audit_generates_in_memory(own, capsys):
    base = common(own)
    code, out, _ = cli_run(capsys, "audit", *base)
    assert code == 0 and "generated in memory" in out and "nothing written" in out
    assert not (own / "splits").exists()
    code, out, err = cli_run(capsys, "run", *base, "--features", own / "FEAT_DIR", "--backbone", "myresnet",
                             "--missing-features", "drop", "--dry-run", "--results", own / "r")
    assert code == 0, err
    assert (f"splits generated now by `benchmark run` (seed 0, 5 folds, patient-level, stratified by event and time "
            f"bin), written to {own / 'splits'}") in out
    assert json.loads((own / "splits" / "splits_info.json").read_text())["command"] == "benchmark run"
    from benchmark.execution import cells

    cells._COHORT_CACHE.clear()  # a new `run` process
    code, out, _ = cli_run(capsys, "run", *base, "--features", own / "FEAT_DIR", "--backbone", "myresnet",
                           "--missing-features", "drop", "--dry-run", "--results", own / "r")
    assert f"splits found: {own / 'splits'}; generated by `benchmark run` (seed 0, 5 folds" in out


# ------------------------------------------------------------------------------------------------------------
# the mistakes, each one line
# ------------------------------------------------------------------------------------------------------------
def test_inverted_labels_are_warned_and_counted(own, capsys):
    inverted = [a if a != MAPPING else MAPPING.replace("event=dead", "censorship=dead") for a in common(own)]
    code, out, _ = cli_run(capsys, "audit", *inverted)
    events = int(patients_of(own)["dead"].sum())
    assert code == 0 and "warning: column 'dead' is declared as censorship (1 = censored), but its name " \
                         "suggests 1 = event (died); if 1 means the event happened, map it as event=dead" in out
    assert f"labels: {N_PATIENTS - events} events, {events} censored" in out  # what the audit shows is what trains
    code, out, _ = cli_run(capsys, "audit", *[a if a != MAPPING else "time=os_months,event=censored_flag"
                                              for a in common(own)])
    assert code == 2  # unknown column (below); a censor* column declared as event warns:
    from benchmark.data.clinical import parse_columns

    assert parse_columns("event=censored").warnings()[0].startswith("column 'censored' is declared as event")
    assert parse_columns("event=alive_status").warnings()  # 'alive' as event
    assert not parse_columns("event=dead").warnings() and not parse_columns("censorship=censorship").warnings()
    for name in ("death", "status", "deceased", "event"):
        assert parse_columns(f"censorship={name}").warnings(), name
    code, out, err = cli_run(capsys, "run", *inverted, "--features", own / "FEAT_DIR", "--backbone", "myresnet",
                             "--missing-features", "drop", "--dry-run", "--results", own / "r")
    assert code == 0 and "warning: mycohort/myresnet: column 'dead' is declared as censorship" in out, err


def test_experiment_file_column_mapping(own, capsys):
    from benchmark.execution.session import build_experiment

    (own / "experiment.toml").write_text(
        'methods = "amil"\ndatasets = "mycohort"\nbackbones = "myresnet"\nclinical = "clinical.csv"\n'
        'registry = "registry.toml"\n[columns]\npatient = "patient"\nslide = "slide"\ntime = "os_months"\n'
        'event = "dead"\n')
    experiment = build_experiment(cli.build_parser().parse_args(["run", "--config", str(own / "experiment.toml")]))
    assert experiment.shared.columns == CANONICAL and experiment.configs(5)[0].columns == CANONICAL
    (own / "experiment.toml").write_text('methods = "amil"\ncolumns = "time=os_months,event=dead,censorship=x"\n')
    with pytest.raises(ValueError, match="give exactly one of event=COLUMN"):
        build_experiment(cli.build_parser().parse_args(["run", "--config", str(own / "experiment.toml")]))


@pytest.mark.parametrize("edit,columns,pattern", [
    ("event 2", MAPPING, r"clinical\.csv: 'dead' must be 1 \(event observed\) or 0 \(censored\); 1 row\(s\) hold "
                         r"other values, e\.g\. 2$"),
    ("negative time", MAPPING, r"clinical\.csv: negative 'os_months' in \d row\(s\), e\.g\. slide 'P003_S0\.svs' has "),
    (None, MAPPING.replace("os_months", "os_mnths"),
     r"clinical\.csv: --columns: unknown column 'os_mnths'\. Did you mean 'os_months'\? The table's columns: "),
    (None, MAPPING + ",censorship=dead", r"--columns: give exactly one of event=COLUMN \(1 = event observed\) and "
                                         r"censorship=COLUMN \(1 = censored\)$"),
    (None, MAPPING.replace("time=", "tiem="), r"--columns: unknown column key 'tiem'\. Did you mean 'time'"),
    (None, MAPPING + ",unit=weeks", r"--columns unit=weeks: must be one of months, days, years$"),
])
@pytest.mark.parametrize("command", ["audit", "splits", "run"])
def test_bad_mappings_are_one_line(own, capsys, command, edit, columns, pattern):
    table = pd.read_csv(own / "clinical.csv")
    if edit == "event 2":
        table.loc[3, "dead"] = 2
    elif edit == "negative time":
        table.loc[table["patient"] == "P003", "os_months"] = -1.0
    table.to_csv(own / "clinical.csv", index=False)
    argv = [a if a != MAPPING else columns for a in common(own)]
    extra = {"audit": [], "splits": ["--out", own / "s"],
             "run": ["--backbone", "myresnet", "--features", own / "FEAT_DIR", "--dry-run", "--results", own / "r"]}
    code, _, err = cli_run(capsys, command, *argv, *extra[command])
    assert code == 2
    one_line(err, pattern)
    assert not (own / "s").exists() and not (own / "r").exists()


def test_a_feature_dim_that_is_not_the_backbones_is_refused_before_any_cell(own, capsys):
    (own / "registry.toml").write_text('[cohorts.mycohort]\ntitle = "x"\n[backbones.myresnet]\ndim = 768\n')
    argv = [*common(own), "--features", own / "FEAT_DIR", "--backbone", "myresnet", "--missing-features", "drop"]
    code, _, err = cli_run(capsys, "run", *argv, "--methods", "amil,dsmil", "--folds", "0-1", "--device", "cpu",
                           "--results", own / "r")
    assert code == 2
    one_line(err, rf"{own / 'FEAT_DIR' / 'h5_files'}/P000_S0\.h5: features have dim 1024, but backbone 'myresnet' "
                  r"declares dim 768\.$")
    assert not list((own / "r").rglob("*.json"))  # no cell ran, none was recorded as failed
    code, _, err = cli_run(capsys, "audit", *argv)
    assert code == 2 and "features have dim 1024, but backbone 'myresnet' declares dim 768" in err


def test_features_without_backbone_is_an_error_unless_the_folder_names_it(own, capsys, tmp_path):
    argv = [*common(own), "--features", own / "FEAT_DIR", "--missing-features", "drop"]
    for command in ("run", "audit"):
        code, _, err = cli_run(capsys, command, *argv, *(["--dry-run", "--results", own / "r"]
                                                       if command == "run" else []))
        assert code == 2
        one_line(err, r"--features given without --backbone: the feature files are 1024-d \(e\.g\. .*P000_S0\.h5\); "
                      r"name their backbone with --backbone \(registered 1024-d backbones: resnet50, myresnet\)$")
    named = write_cohort(tmp_path / "other", feat_name="myresnet_features")
    argv = [*common(named), "--features", named / "myresnet_features", "--missing-features", "drop"]
    argv[1] = own / "registry.toml"  # the registry already read (a name is declared once)
    code, out, err = cli_run(capsys, "run", *argv, "--dry-run", "--results", named / "r")
    assert code == 0, err
    assert "backbone myresnet inferred from" in out and "mycohort/myresnet: 23 samples" in out


def test_unknown_registry_key_has_a_did_you_mean(own, capsys):
    (own / "registry.toml").write_text('[cohorts.mycohort]\ntitle = "x"\npatinets = 400\n')
    code, _, err = cli_run(capsys, "audit", *common(own))
    assert code == 2
    one_line(err, r"registry\.toml: \[cohorts\.mycohort\]: unknown key 'patinets'\. Did you mean 'patients'")
    (own / "registry.toml").write_text('[backbones.myresnet]\ndim = 1024\n[backbones.myresnet.variants.big]\n'
                                       'dimm = 2048\n')
    code, _, err = cli_run(capsys, "list", "--registry", own / "registry.toml")
    one_line(err, r"\[backbones\.myresnet\.variants\.big\]: unknown key 'dimm'\. Did you mean 'dim'")
    (own / "registry.toml").write_text('[cohorts.mycohort]\n[cohorts.mycohort.columns]\npatient = "p"\nevnt = "d"\n')
    code, _, err = cli_run(capsys, "list", "--registry", own / "registry.toml")
    one_line(err, r"\[cohorts\.mycohort\.columns\]: unknown key 'evnt'\. Did you mean 'event'")


def test_registry_column_mapping_is_used_and_recorded(own, capsys):
    (own / "registry.toml").write_text(
        '[cohorts.mycohort]\ntitle = "x"\n[cohorts.mycohort.columns]\npatient = "patient"\nslide = "slide"\n'
        'time = "os_months"\nevent = "dead"\n[backbones.myresnet]\ndim = 1024\n')
    argv = ["--registry", own / "registry.toml", "--dataset", "mycohort", "--clinical", own / "clinical.csv"]
    code, out, _ = cli_run(capsys, "audit", *argv)
    assert code == 0 and "event <- 'dead' (1 = event observed)" in out
    from benchmark.execution.cells import expected_config
    from benchmark.settings.config import RunConfig

    config = RunConfig("amil", "mycohort", "myresnet", clinical=str(own / "clinical.csv"),
                       registry=(str(own / "registry.toml"),))
    assert expected_config(config)["columns"] == CANONICAL


def test_the_mapping_is_hashed_only_when_given():
    from benchmark.settings.config import RunConfig, hashed_config

    plain = RunConfig("amil", "blca", clinical="/t.csv")
    mapped = plain.with_(columns=CANONICAL)
    assert "columns" not in plain.record_config(1024, None, None)  # cells without a mapping keep their hash
    assert mapped.record_config(1024, None, None)["columns"] == CANONICAL
    assert hashed_config(plain.record_config(1024, None, None)) != hashed_config(mapped.record_config(1024, None, None))
    assert f"--columns {CANONICAL}" in mapped.to_cli()
    record = {"method": "amil", "cohort": "blca", "backbone": "resnet50", "fold": 0, "seed": 0, "selection": "last",
              "config": mapped.record_config(1024, None, None)}
    assert RunConfig.from_record(record).columns == CANONICAL


def test_audit_flags_a_patient_in_neither_part_of_a_fold(own, capsys):
    cli_run(capsys, "splits", *common(own), "--out", own / "splits", "--folds", "3")
    split = pd.read_csv(own / "splits" / "splits_0.csv", index_col=0, dtype=str, keep_default_na=False)
    dropped = split["train"].iloc[0]
    split.loc[split.index[0], "train"] = ""
    split.to_csv(own / "splits" / "splits_0.csv")
    code, out, _ = cli_run(capsys, "audit", *common(own), "--splits", own / "splits")
    assert f"fold 0: 1 patient(s) of the table are in neither train nor val (unused by this fold), e.g. " \
           f"['{dropped}']" in out
    code, _, err = cli_run(capsys, "splits", *common(own), "--out", own / "splits")
    assert code == 2
    one_line(err, r"--out .*splits: already holds 3 split file\(s\); pass --overwrite to replace them$")
    assert cli_run(capsys, "splits", *common(own), "--out", own / "splits", "--folds", "2", "--overwrite")[0] == 0
    assert sorted(p.name for p in (own / "splits").glob("splits_*.csv")) == ["splits_0.csv", "splits_1.csv"]
