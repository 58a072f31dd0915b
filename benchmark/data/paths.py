"""Slide IDs that become paths, and the data cache folder.

Slide IDs come from a user's clinical table and become file names (``<features>/<slide>.h5``), so they are
checked where they enter (the table reader) and may not lead outside the folder they are joined to. Registry
names and output file names are checked in :mod:`benchmark.naming` (``check_registry_name``, ``safe_name``,
``path_under``), which every layer may import.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

#: Environment variable naming the base folder of every cache the harness writes (synthetic data, splits).
DATA_ENV = "MIL_BENCHMARK_DATA"


def slide_id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot name a feature file (None when it can).

    A slide ID is a file stem: no path separator, no ``..``, not absolute, not empty, no control character.
    """
    if not slide_id or not slide_id.strip():
        return "is empty"
    if "/" in slide_id or "\\" in slide_id:
        return "contains a path separator"
    if slide_id in (".", "..") or ".." in slide_id.split("."):
        return "contains '..'"
    if os.path.isabs(slide_id) or re.match(r"^[A-Za-z]:", slide_id):
        return "is an absolute path"
    if any(ord(ch) < 32 for ch in slide_id):
        return "contains a control character"
    return None


def check_slide_ids(slide_ids, source: object) -> None:
    """Raise ValueError naming ``source`` and the first bad slide ID (see :func:`slide_id_problem`)."""
    for slide_id in slide_ids:
        problem = slide_id_problem(str(slide_id))
        if problem:
            raise ValueError(f"{source}: slide ID {str(slide_id)!r} {problem}; a slide ID must be a plain file "
                             "name (no path separators, no '..', not absolute)")


def data_cache_dir(*parts: str) -> Path:
    """A folder of the harness's data cache: ``$MIL_BENCHMARK_DATA/<parts>`` when set, else
    ``<repository>/data_cache/<parts>``."""
    base = os.environ.get(DATA_ENV)
    root = Path(base) if base else Path(__file__).resolve().parents[2] / "data_cache"
    return root.joinpath(*parts)
