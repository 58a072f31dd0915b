"""Cohort and backbone registries (datasets/*.toml)."""
import pytest

from benchmark.data.cohorts import (
    DATASETS_DIR, backbone_names, check_dim, cohort_names, get_backbone, get_cohort, resolve_backbones, resolve_cohorts,
)
from benchmark.naming import UnknownNameError


def test_six_cohorts_with_real_facts():
    assert cohort_names() == ["blca", "brca", "coad", "gbmlgg", "luad", "ucec"]
    blca = get_cohort("BLCA")
    assert (blca.patients, blca.slides, blca.events) == (373, 437, 169)
    assert get_cohort("gbmlgg").projects == ("TCGA-GBM", "TCGA-LGG")
    assert resolve_cohorts("all") == cohort_names()
    assert not list(DATASETS_DIR.glob("*.py")), "datasets/ must hold data files only"


def test_backbone_dims_and_variants():
    dims = {n: get_backbone(n).dim for n in resolve_backbones("all")}
    assert dims == {"resnet50": 1024, "conch": 512, "uni2-h": 1536, "quiltnet": 512, "prov-gigapath": 1536}
    assert get_backbone("resnet50:full").dim == 2048 and get_backbone("resnet50-full").base == "resnet50"
    assert get_backbone("quiltnet-pooled").dim == 768
    assert "resnet50-full" in backbone_names() and "resnet50-full" not in backbone_names(include_variants=False)
    # domain-specific encoders are cleaner than ImageNet ResNet50
    assert all(get_backbone(n).synthetic_noise < get_backbone("resnet50").synthetic_noise
               for n in ("conch", "uni2-h", "prov-gigapath", "quiltnet"))
    # ... and express the planted morphology more strongly, in a strict order, so the synthetic Table 2 ranks them
    signal = [get_backbone(n).synthetic_signal for n in ("resnet50", "quiltnet", "conch", "prov-gigapath", "uni2-h")]
    assert signal == sorted(set(signal)) and signal[-1] == 1.0
    assert get_backbone("resnet50-full").synthetic_signal == get_backbone("resnet50").synthetic_signal


def test_unknown_names_suggest_close_matches():
    with pytest.raises(UnknownNameError, match="Did you mean 'blca'"):
        get_cohort("blcaa")
    with pytest.raises(UnknownNameError, match="Did you mean 'conch'"):
        get_backbone("conchh")


def test_dim_mismatch_names_both_and_suggests_variant():
    with pytest.raises(ValueError, match=r"x\.h5.*dim 2048.*'resnet50'.*1024.*resnet50-full"):
        check_dim(2048, get_backbone("resnet50"), "x.h5")
    check_dim(512, get_backbone("conch"), "ok.h5")
