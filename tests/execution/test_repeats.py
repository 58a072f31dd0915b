"""Repeated cross-validation (repeat 0 = the split files, r >= 1 = stratified patient-level folds drawn with
seed r) and the refusal of splits where one patient's slides straddle train and val."""
import shutil

import pandas as pd
import pytest

from benchmark.data.loader import load_cohort
from benchmark.data.splits import read_splits, repeated_folds, split_files, write_splits
from benchmark.settings.config import RunConfig
from benchmark.execution.cells import get_cohort_data


@pytest.mark.parametrize("unit", ["patient", "slide"])
def test_repeats_partition_patients_and_differ(tiny_root, unit):
    cohort = load_cohort("blca", data_root=tiny_root, backbone="resnet50", unit=unit)
    patient_of = cohort.samples["patient_id"]
    folds = {r: repeated_folds(cohort.samples, 5, r) for r in (1, 2)}
    for r, splits in folds.items():
        vals = [s for _, val in splits for s in val]
        assert sorted(vals) == sorted(cohort.samples.index)  # every sample validated exactly once per repeat
        for train, val in splits:
            assert set(patient_of[train]).isdisjoint(patient_of[val])  # by patient, also with slides
    assert folds[1] != folds[2] and folds[1] == repeated_folds(cohort.samples, 5, 1)  # seeded by the repeat
    with pytest.raises(ValueError, match="repeat 0"):
        repeated_folds(cohort.samples, 5, 0)


def test_runner_uses_the_split_files_for_repeat_0_and_new_folds_after(tiny_root):
    base = get_cohort_data(RunConfig("amil", "blca", data_root=str(tiny_root)))
    again = get_cohort_data(RunConfig("amil", "blca", data_root=str(tiny_root), repeat=1))
    files = read_splits(split_files(tiny_root / "blca" / "splits")[0].parent)
    assert [sorted(f.val) for f in base.folds] == [sorted(v) for _, v in files]
    assert [sorted(f.val) for f in again.folds] != [sorted(f.val) for f in base.folds]
    assert again.samples is base.samples  # same labels and bag cache, other folds


def test_slide_unit_refuses_a_split_where_a_patient_straddles(tiny_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    cohort = load_cohort("blca", data_root=root, backbone="resnet50", unit="slide")
    many = cohort.samples.groupby("patient_id").size()
    patient = many[many > 1].index[0]
    slides = list(cohort.samples.index[cohort.samples["patient_id"] == patient])
    splits_dir = root / "blca" / "splits"
    folds = read_splits(splits_dir)
    train, val = folds[0]
    if patient in train:  # move one of the patient's slides (as a slide barcode) to the other side
        train, val = [p for p in train if p != patient] + slides[:1], val + slides[1:]
    else:
        val, train = [p for p in val if p != patient] + slides[:1], train + slides[1:]
    write_splits(splits_dir, [(train, val)] + folds[1:])
    with pytest.raises(ValueError, match="patient leak across slides"):
        get_cohort_data(RunConfig("amil", "blca", data_root=str(root), unit="slide"))
    assert isinstance(pd.read_csv(splits_dir / "splits_0.csv"), pd.DataFrame)
