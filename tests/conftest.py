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

import pytest
import torch

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
