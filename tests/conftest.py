"""Shared test fixtures.

- ``tiny_root``: the ``tiny`` synthetic preset (cohorts blca and ucec; backbones resnet50 and conch; signal
  mixed; seed 0), generated once per test session into a temporary folder. Load it with
  ``load_cohort("blca", data_root=tiny_root, backbone="resnet50")``.
- ``real_tables``: the real TCGA label tables and splits in ``../shared/data/tcga_clinical`` (located relative
  to the repository; ``$MIL_BENCHMARK_TCGA_TABLES`` when that folder is elsewhere); tests using it are skipped
  when neither exists.
- ``one_torch_thread``: one intra-op thread for a test module (``pytestmark =
  pytest.mark.usefixtures("one_torch_thread")``), restored afterwards.

Fake bags and shared output checks are in ``tests/helpers.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch

from fakes import Confinement

# Small models on 2 shared cores: one intra-op thread is ~10x faster than two (PyG scatter stalls) and
# keeps results reproducible.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_TABLES = REPO.parent / "shared" / "data" / "tcga_clinical"
if not SHARED_TABLES.is_dir() and os.environ.get("MIL_BENCHMARK_TCGA_TABLES"):
    SHARED_TABLES = Path(os.environ["MIL_BENCHMARK_TCGA_TABLES"])


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models and graphs: on a shared 2-core runner, thread spinning (and PyG scatter waits) costs more
    than threads gain."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from benchmark.data.synth import generate

    root = tmp_path_factory.mktemp("synthetic") / "tiny-mixed-s0"
    return generate(root, preset="tiny", seed=0, cohorts=("blca", "ucec"), backbones=("resnet50", "conch"),
                    signal="mixed")


@pytest.fixture(scope="session")
def real_tables() -> Path:
    if not (SHARED_TABLES / "derived" / "labels").is_dir():
        pytest.skip(f"real TCGA tables not found at {SHARED_TABLES}")
    return SHARED_TABLES


@pytest.fixture()
def confined(tmp_path, monkeypatch, tiny_root):
    """Records the files the harness opens (h5, torch, CSV); caches go to ``tmp_path/cache``; cwd = tmp_path."""
    guard = Confinement(tmp_path, tiny_root)
    real_h5, real_load, real_csv = h5py.File, torch.load, pd.read_csv

    class SpyFile(real_h5):
        def __init__(self, name, *args, **kwargs):
            guard.opened.append(Path(name))
            super().__init__(name, *args, **kwargs)

    def spy_load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            guard.opened.append(Path(f))
        return real_load(f, *args, **kwargs)

    def spy_csv(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            guard.opened.append(Path(f))
        return real_csv(f, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", SpyFile)
    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(pd, "read_csv", spy_csv)
    monkeypatch.setenv("MIL_BENCHMARK_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("MIL_BENCHMARK_REGISTRY", "")  # restored afterwards, also when --registry adds to it
    monkeypatch.chdir(tmp_path)
    from benchmark.data.cohorts import clear_registry_caches

    clear_registry_caches()
    yield guard
    clear_registry_caches()
