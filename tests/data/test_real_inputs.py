"""Real inputs as researchers have them: CLAM and TRIDENT output folders, one folder per magnification, MCAT's
zipped tables and split folders, slides without features, experiment files and records that name them all.

Feature folders are converted from the tiny synthetic cohort (so every reader must give the same bags); the real
TCGA-BLCA table and splits come from ``../shared`` (those tests skip without it).
"""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from benchmark import cli
from benchmark.data.cohorts import get_backbone
from benchmark.data.bag import Needs
from benchmark.data.loader import load_cohort
from benchmark.settings.config import RunConfig, feature_items

MAGS = (20, 10, 5)


def _bags(root: Path) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``{slide: {mag: (features, coords)}}`` of the tiny BLCA cohort's default-layout files."""
    out = {}
    for path in sorted((root / "blca" / "features" / "resnet50").glob("*.h5")):
        with h5py.File(path, "r") as f:
            out[path.stem] = {m: (f[f"{m}x"]["features"][()], f[f"{m}x"]["coords"][()]) for m in MAGS}
    return out


def write_clam_feat_dir(feat_dir: Path, bags: dict, mag: int, pt_only: bool = False) -> Path:
    """CLAM's ``extract_features_fp.py`` output for one magnification: ``h5_files`` (features + int32 coords) and
    ``pt_files`` (features only)."""
    (feat_dir / "pt_files").mkdir(parents=True, exist_ok=True)
    if not pt_only:
        (feat_dir / "h5_files").mkdir(parents=True, exist_ok=True)
    for slide, by_mag in bags.items():
        feats, coords = by_mag[mag]
        torch.save(torch.from_numpy(feats), feat_dir / "pt_files" / f"{slide}.pt")
        if not pt_only:
            with h5py.File(feat_dir / "h5_files" / f"{slide}.h5", "w") as f:
                f["features"] = feats
                f["coords"] = coords.astype(np.int32)
    return feat_dir


def write_trident_job(job: Path, bags: dict, encoder: str = "resnet50") -> Path:
    """TRIDENT's job folder: ``{m}x_256px_0px_overlap/features_{encoder}/{slide}.h5`` with coords attributes."""
    for m in MAGS:
        folder = job / f"{m}x_256px_0px_overlap" / f"features_{encoder}"
        folder.mkdir(parents=True)
        for slide, by_mag in bags.items():
            feats, coords = by_mag[m]
            with h5py.File(folder / f"{slide}.h5", "w") as f:
                f["features"] = feats
                f["coords"] = coords
                f["coords"].attrs.update(patch_size=256, level0_magnification=40, target_magnification=m)
    return job


@pytest.fixture(scope="module")
def folders(tiny_root, tmp_path_factory):
    """The tiny BLCA cohort's features written as CLAM and TRIDENT outputs; the table and splits beside them."""
    base = tmp_path_factory.mktemp("real_layouts")
    bags = _bags(tiny_root)
    shutil.copy(tiny_root / "blca" / "clinical.csv", base / "clinical.csv")
    shutil.copytree(tiny_root / "blca" / "splits", base / "splits")
    return {
        "bags": bags, "base": base,
        "clam": {m: write_clam_feat_dir(base / f"clam_{m}x", bags, m) for m in MAGS},
        "clam_pt": write_clam_feat_dir(base / "clam_pt_20x", bags, 20, pt_only=True),
        "trident": write_trident_job(base / "trident_job", bags),
    }


def _load(folders, features, layout="auto", **kwargs):
    return load_cohort("blca", clinical=folders["base"] / "clinical.csv", splits=folders["base"] / "splits",
                       features=features, layout=layout, **kwargs)


def _same_bags(cohort, folders, mags, coords=True) -> None:
    for sample in cohort.samples.index[:6]:
        bag = cohort.bag(sample, Needs(magnifications=mags, coords=coords))
        for m in mags:
            want = np.concatenate([folders["bags"][s][m][0] for s in bag.slide_ids])
            assert np.array_equal(bag.features[m].numpy(), want)
            if coords:
                want_c = np.concatenate([folders["bags"][s][m][1] for s in bag.slide_ids])
                assert np.array_equal(bag.coords[m].numpy(), want_c)


def test_clam_feat_dir_as_written(folders):
    cohort = _load(folders, [str(folders["clam"][20])])
    assert cohort.layout == "clam"
    assert cohort.provenance["layout_detection"].startswith("clam layout (auto-detected; ")
    _same_bags(cohort, folders, (20,))


def test_clam_pt_files_only(folders):
    cohort = _load(folders, [str(folders["clam_pt"])], layout="clam")
    _same_bags(cohort, folders, (20,), coords=False)


def test_trident_job_folder_serves_every_magnification(folders):
    cohort = _load(folders, [str(folders["trident"])])
    assert cohort.layout == "trident"
    _same_bags(cohort, folders, MAGS)
    # the features_<encoder> folder itself, given for one magnification
    one = _load(folders, [f"10x={folders['trident'] / '10x_256px_0px_overlap' / 'features_resnet50'}"])
    _same_bags(one, folders, (10,))


def test_one_clam_folder_per_magnification(folders):
    spec = [f"{m}x={folders['clam'][m]}" for m in MAGS]
    cohort = _load(folders, spec)
    assert cohort.layout == "clam" and sorted(cohort.feature_folders) == [5, 10, 20]
    _same_bags(cohort, folders, MAGS)


def test_detection_checks_every_slide_and_prefers_the_most_complete_layout(folders, tmp_path):
    slides = sorted(folders["bags"])
    partial = tmp_path / "partial"
    write_clam_feat_dir(partial / "clam", {s: folders["bags"][s] for s in slides[:3]}, 20)
    # the first slides have a CLAM file, every slide has a TRIDENT one: the layout covering all of them wins
    trident = write_trident_job(partial / "trident", folders["bags"])
    shutil.copytree(partial / "clam" / "h5_files", trident / "h5_files")
    cohort = _load(folders, [str(trident)])
    assert cohort.layout == "trident"
    assert cohort.provenance["layout_detection"] == (f"trident layout (auto-detected; {len(slides)} of "
                                                     f"{len(slides)} slides have a feature file, every slide checked)")


def test_data_source_round_trip_through_record_cli_and_experiment_file(folders, tmp_path, capsys):
    feat = [f"{m}x={folders['clam'][m]}" for m in MAGS]
    results = tmp_path / "results"
    argv = ["run", "--methods", "amil", "--dataset", "blca", "--clinical", folders["base"] / "clinical.csv",
            "--splits", folders["base"] / "splits", "--features", *feat, "--backbone", "resnet50", "--layout", "clam", "--folds", "0",
            "--recipe", "demo", "--set", "epochs=1", "--set", "max_samples_per_epoch=8", "--device", "cpu",
            "--results", results, "--save-weights", "last"]
    assert cli.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "blca/resnet50: 40 samples, features: clam layout (given)" in " ".join(out.split())
    record = json.loads(next(results.rglob("fold0.json")).read_text())
    config = record["config"]
    assert config["clinical"] == str((folders["base"] / "clinical.csv").resolve())
    assert config["features"] == {f"{m}x": str(folders["clam"][m].resolve()) for m in MAGS}
    assert config["layout"] == "clam" and "missing_features" not in config  # defaults are not stored
    rebuilt = RunConfig.from_record(record)
    assert rebuilt.features == feature_items(feat) and rebuilt.clinical == config["clinical"]
    command = rebuilt.to_cli(results)
    assert "--clinical" in command and "--features" in command and "--layout=clam" in command
    assert cli.main(shlex.split(command)[3:]) == 0  # the same cell: finished, skipped
    assert "1 finished cell(s) skipped" in capsys.readouterr().out

    experiment = tmp_path / "experiment.toml"
    rel = lambda p: str(Path(p).relative_to(folders["base"]))  # noqa: E731
    experiment.write_text(
        f'methods = "amil"\ndatasets = "blca"\nbackbones = "resnet50"\nfolds = "0"\nrecipe = "demo"\nlayout = "clam"\n'
        f'clinical = "{rel(folders["base"] / "clinical.csv")}"\nsplits = "splits"\n'
        f'features = {{ "20x" = "{rel(folders["clam"][20])}", "10x" = "{rel(folders["clam"][10])}", '
        f'"5x" = "{rel(folders["clam"][5])}" }}\n'
        f'[set]\nepochs = 1\nmax_samples_per_epoch = 8\n')
    moved = folders["base"] / "experiment.toml"  # relative paths are taken from the file's folder
    shutil.copy(experiment, moved)
    assert cli.main(["run", "--config", str(moved), "--device", "cpu", "--results", str(results)]) == 0
    assert "1 finished cell(s) skipped" in capsys.readouterr().out

    # the heatmap rebuilds the cohort from the record's data source (a real table: never "stale synthetic data")
    slide = sorted(folders["bags"])[0]
    assert cli.main(["plot", "heatmap", "--results", str(results), "--method", "amil", "--dataset", "blca",
                     "--slide", slide, "--fold", "0"]) == 0
    assert (results / "figures" / f"heatmap_amil_blca_{slide}_fold0.png").is_file()


# ----------------------------------------------------------------------------- the real TCGA-BLCA table
def _real_blca(real_tables: Path) -> tuple[Path, Path]:
    table = real_tables / "CrossFusion" / "data" / "tcga_blca_all_clean.csv.zip"
    splits = real_tables / "MCAT" / "splits" / "5foldcv" / "tcga_blca"
    if not table.is_file() or not splits.is_dir():
        pytest.skip("the shipped BLCA table or splits are not in the shared folder")
    return table, splits


@pytest.fixture(scope="module")
def real_feat_dir(real_tables, tmp_path_factory):
    """A CLAM FEAT_DIR with random 1024-d features for the first 40 slides of the real BLCA table (the others
    have none, as when a lab has extracted part of a cohort)."""
    from benchmark.data.clinical import read_clinical

    table, _ = _real_blca(real_tables)
    slides = read_clinical(table)["slide_id"].tolist()[:40]
    rng = np.random.default_rng(0)
    bags = {s: {20: (rng.normal(size=(12, get_backbone("resnet50").dim)).astype(np.float32),
                     np.stack([np.arange(12) * 512, np.zeros(12)], axis=1).astype(np.int64))} for s in slides}
    return write_clam_feat_dir(tmp_path_factory.mktemp("real_clam") / "FEAT_DIR", bags, 20)


def test_real_table_zip_as_shipped_with_a_partial_feature_folder(real_tables, real_feat_dir, tmp_path, capsys):
    table, splits = _real_blca(real_tables)
    base = ["run", "--methods", "amil", "--dataset", "blca", "--clinical", str(table), "--splits", str(splits),
            "--features", str(real_feat_dir), "--backbone", "resnet50", "--folds", "0", "--recipe", "demo", "--set", "epochs=1",
            "--set", "max_samples_per_epoch=8", "--device", "cpu", "--results", str(tmp_path / "r")]
    assert cli.main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {table}: 397 slide(s) of the table's 437 have no resnet50 feature file (clam "
                          "layout), e.g. slide ") and err.endswith("(the run reports what each fold loses)")
    assert "\n" not in err

    assert cli.main(base + ["--missing-features", "drop"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "features: clam layout (auto-detected; 40 of 437 slides have a feature file, every slide checked)" in out
    assert "397 slide(s) without a feature file left out (--missing-features drop)" in out
    record = json.loads(next((tmp_path / "r").rglob("fold0.json")).read_text())
    assert record["status"] == "ok"
    row = record["missing_features"]["fold"]
    assert row["fold"] == 0 and f"fold 0: dropped {row['train_dropped']} train / {row['val_dropped']} val; now " \
                                f"{row['train']} train / {row['val']} val" in out
    assert row["val"] == len(record["predictions"])  # the validation patients that kept a slide
    assert record["config"]["missing_features"] == "drop"


def test_audit_with_features_reports_the_folds_after_dropping(real_tables, real_feat_dir, capsys):
    table, splits = _real_blca(real_tables)
    argv = ["audit", "--dataset", "blca", "--clinical", str(table), "--splits", str(splits),
            "--features", str(real_feat_dir), "--backbone", "resnet50"]
    assert cli.main(argv) == 1
    assert "397 slide(s) have no resnet50 feature file" in " ".join(capsys.readouterr().out.split())
    cli.main(argv + ["--missing-features", "drop"])
    out = " ".join(capsys.readouterr().out.split())
    assert "folds without the slides that have no feature file" in out and "slides without features" in out


def test_registry_files_travel_with_the_configuration(tmp_path):
    registry = tmp_path / "mine.toml"
    registry.write_text('[backbones.virchow2]\ndim = 2560\n')
    config = RunConfig("amil", "blca", "resnet50", registry=(str(registry),), missing_features="drop",
                       features=[f"20x={tmp_path}"])
    command = config.to_cli(tmp_path / "r")
    args = cli.build_parser().parse_args(shlex.split(command)[3:])
    assert args.command_registry == [str(registry)] and args.missing_features == "drop"
    assert args.features == [f"20x={tmp_path}"]
    record_config = config.record_config(1024, None, None)
    assert record_config["registry"] == [str(registry)] and record_config["features"] == {"20x": str(tmp_path)}


def test_experiment_file_data_source_and_registry(tmp_path, monkeypatch):
    from benchmark.execution.session import build_experiment
    from benchmark.data.cohorts import clear_registry_caches

    monkeypatch.setenv("MIL_BENCHMARK_REGISTRY", "")  # restored afterwards
    (tmp_path / "clam").mkdir()
    (tmp_path / "mine.toml").write_text('[cohorts.tcga_kirc]\ntitle = "KIRC"\n')
    experiment_file = tmp_path / "experiment.toml"
    experiment_file.write_text('methods = "amil"\ndatasets = "tcga_kirc"\nbackbones = "resnet50"\nclinical = "t.csv.zip"\n'
                               'features = "20x=clam"\nmissing_features = "drop"\nregistry = "mine.toml"\n')
    try:
        experiment = build_experiment(cli.build_parser().parse_args(["run", "--config", str(experiment_file)]))
        shared = experiment.shared
        assert experiment.cohorts == ("tcga_kirc",) and shared.missing_features == "drop"
        assert shared.clinical == str(tmp_path / "t.csv.zip") and shared.recipe == "paper"
        assert shared.features == (("20x", str(tmp_path / "clam")),)
        assert shared.registry == (str((tmp_path / "mine.toml").resolve()),)
        config = experiment.configs(5)[0]
        assert config.registry == shared.registry and config.missing_features == "drop"
    finally:
        monkeypatch.undo()
        clear_registry_caches()


def test_a_trident_folder_of_another_magnification_is_refused(folders):
    ten = folders["trident"] / "10x_256px_0px_overlap" / "features_resnet50"
    cohort = _load(folders, [f"20x={ten}"])
    sample = cohort.samples.index[0]
    with pytest.raises(ValueError, match=r"features extracted at 10x \(target_magnification\), read as 20x; "
                                         r"give this folder as --features 10x=DIR"):
        cohort.bag(sample, Needs(magnifications=(20,)))
