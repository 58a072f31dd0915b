"""Names that become paths: slide-ID validation, sanitised file names, containment under a root, and the
data cache folder.

Slide IDs come from a user's clinical table and become file names (``<features>/<slide>.h5``); registry names
and slide IDs become output file names (heatmaps, result folders). None of them may lead outside the folder
they are joined to, so every such name is checked where it enters (the table reader, the registries) and every
output path is built with :func:`safe_name` and checked with :func:`path_under`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

#: Environment variable naming the base folder of every cache the harness writes (synthetic data, splits).
DATA_ENV = "MIL_BENCHMARK_DATA"
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._+-]+")
#: Registry names (cohorts, backbones, methods) become folder names of the result store.
_REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


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


def check_registry_name(name: str, kind: str, source: object) -> None:
    """Raise ValueError when a registry name could not be a folder name of the result store."""
    if not _REGISTRY_NAME.match(name) or ".." in name:
        raise ValueError(f"{source}: {kind} name {name!r} must be letters, digits and . _ + - "
                         "(it names folders of the result store)")


def safe_name(text: str) -> str:
    """``text`` as one file-name component: runs of other characters than letters, digits and ``. _ + -``
    become ``_``, and leading dots are dropped (no hidden files, no ``..``)."""
    cleaned = _UNSAFE_CHARACTERS.sub("_", str(text)).lstrip(".")
    return cleaned or "_"


def path_under(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts`` after checking that it resolves inside ``root`` (raises ValueError otherwise)."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"{Path(root).joinpath(*parts)}: resolves outside {root}")
    return path


def data_cache_dir(*parts: str) -> Path:
    """A folder of the harness's data cache: ``$MIL_BENCHMARK_DATA/<parts>`` when set, else
    ``<repository>/data_cache/<parts>``."""
    base = os.environ.get(DATA_ENV)
    root = Path(base) if base else Path(__file__).resolve().parents[2] / "data_cache"
    return root.joinpath(*parts)
