"""Bad input: each case gives a clear error naming the file and the problem."""
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from benchmark.data.bag import Needs
from benchmark.data.clinical import read_clinical
from benchmark.data.loader import load_cohort


def _table(tmp_path, **changes):
    df = pd.DataFrame({"case_id": ["P1", "P2", "P3"], "slide_id": ["P1-a.svs", "P2-a.svs", "P3-a.svs"],
                       "survival_months": [1.0, 2.5, 7.0], "censorship": [0, 1, 0]})
    for col, val in changes.items():
        if val is None:
            df = df.drop(columns=col)
        else:
            df[col] = val
    path = tmp_path / "table.csv"
    df.to_csv(path)
    return path


def test_table_missing_required_columns(tmp_path):
    with pytest.raises(ValueError, match=r"table\.csv: missing required column\(s\) \['censorship'\]"):
        read_clinical(_table(tmp_path, censorship=None))


def test_missing_times(tmp_path):
    with pytest.raises(ValueError, match=r"table\.csv: missing or non-numeric 'survival_months' in 1 row"):
        read_clinical(_table(tmp_path, survival_months=[1.0, None, 3.0]))


def test_negative_times(tmp_path):
    with pytest.raises(ValueError, match=r"table\.csv: negative 'survival_months'.*P3-a\.svs"):
        read_clinical(_table(tmp_path, survival_months=[1.0, 2.0, -3.0]))


def test_censorship_not_binary(tmp_path):
    with pytest.raises(ValueError, match=r"table\.csv: 'censorship' must be 0 \(event\) or 1 \(censored\)"):
        read_clinical(_table(tmp_path, censorship=[0, 2, 1]))


def test_duplicate_slide_ids(tmp_path):
    with pytest.raises(ValueError, match=r"table\.csv: duplicate slide IDs.*P1-a"):
        read_clinical(_table(tmp_path, slide_id=["P1-a.svs", "P1-a.svs", "P3-a.svs"]))


@pytest.fixture()
def cohort_copy(tiny_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_root / "blca", root / "blca", ignore=shutil.ignore_patterns("conch"))
    return root


def _first_slide(root):
    return pd.read_csv(root / "blca" / "clinical.csv")["slide_id"].iloc[0].removesuffix(".svs")


def test_slide_without_feature_file(cohort_copy):
    slide = _first_slide(cohort_copy)
    (cohort_copy / "blca" / "features" / "resnet50" / f"{slide}.h5").unlink()
    with pytest.raises(FileNotFoundError, match=rf"clinical\.csv: 1 slide\(s\) .* no resnet50 feature file.*{slide}"):
        load_cohort("blca", data_root=cohort_copy, backbone="resnet50")


def _edit_bag(root, group="20x", features=None):
    slide = _first_slide(root)
    path = root / "blca" / "features" / "resnet50" / f"{slide}.h5"
    with h5py.File(path, "a") as f:
        old = f[group]["features"][()]
        new = features(old)
        del f[group]["features"], f[group]["coords"]
        f[group]["features"] = new
        f[group]["coords"] = np.zeros((len(new), 2), dtype=np.int64)
    return slide, path


def _bag_of(root, slide, needs=Needs(magnifications=(20,))):
    c = load_cohort("blca", data_root=root, backbone="resnet50")
    sample = c.slides.set_index("slide_id").at[slide, "patient_id"]
    return c.bag(sample, needs)


def test_empty_bag(cohort_copy):
    slide, path = _edit_bag(cohort_copy, features=lambda x: x[:0])
    with pytest.raises(ValueError, match=rf"{path.name}\[20x\]: empty bag"):
        _bag_of(cohort_copy, slide)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_features(cohort_copy, bad):
    def poison(x):
        x = x.copy()
        x[1, 3] = bad
        return x

    slide, path = _edit_bag(cohort_copy, features=poison)
    with pytest.raises(ValueError, match=rf"{path.name}\[20x\]: features contain NaN or inf values \(1 of"):
        _bag_of(cohort_copy, slide)


def test_dim_differs_from_backbone(cohort_copy):
    slide, path = _edit_bag(cohort_copy, features=lambda x: x[:, :512])
    with pytest.raises(ValueError, match=rf"{path.name}\[20x\]: features have dim 512, but backbone 'resnet50' declares dim 1024"):
        _bag_of(cohort_copy, slide)


def test_dims_differ_across_slides(cohort_copy):
    # a second slide with another dim: each file is checked against the backbone, so the odd one is named
    c = load_cohort("blca", data_root=cohort_copy, backbone="resnet50")
    two = c.samples.index[c.samples["slide_ids"].map(len) > 1][0]
    odd = c.samples.at[two, "slide_ids"][1]
    path = cohort_copy / "blca" / "features" / "resnet50" / f"{odd}.h5"
    with h5py.File(path, "a") as f:
        x = f["20x"]["features"][()]
        del f["20x"]["features"]
        f["20x"]["features"] = np.concatenate([x, x], axis=1)
    c.bag(two, Needs(magnifications=(10,)))  # other magnifications still fine
    with pytest.raises(ValueError, match=rf"{odd}\.h5\[20x\]: features have dim 2048.*Did you mean backbone 'resnet50-full'"):
        c.bag(two, Needs(magnifications=(20,)))
