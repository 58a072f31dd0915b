"""Cohort registry, read from the data files ``datasets/*.toml`` and from registry files outside the package
(tables ``[cohorts.<name>]``).

Each cohort carries its TCGA project(s) and the facts of its real label table (patients, slides, events,
censoring rate, follow-up), which the synthetic generator mirrors, and optionally where its real table and
splits lie inside a directory laid out like ``shared/data/tcga_clinical/``. A cohort declared by a user needs
only its name (and a ``title``); the facts are needed only to generate synthetic data for it.

Registry files outside the package (same format, ``[cohorts.<name>]`` and ``[backbones.<name>]`` tables) come
from ``$MIL_BENCHMARK_REGISTRY`` (paths separated by ``os.pathsep``) and ``--registry FILE``
(:func:`add_registry_file`, which also puts the file into that variable so worker processes see it).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from benchmark.naming import check_registry_name, did_you_mean

#: Folder of the cohort / backbone definition files (data, not code).
DATASETS_DIR = Path(__file__).resolve().parents[2] / "datasets"
#: Environment variable naming a directory laid out like ``shared/data/tcga_clinical`` (real tables, splits).
REAL_TABLES_ENV = "MIL_BENCHMARK_TCGA_TABLES"
#: Environment variable listing registry files outside the package (``os.pathsep``-separated).
REGISTRY_ENV = "MIL_BENCHMARK_REGISTRY"


def _read_toml(path: Path, what: str) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{what}{path}: invalid TOML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what}{path}: not a text (TOML) file") from None


def user_registry_files() -> list[Path]:
    """Registry files named by ``$MIL_BENCHMARK_REGISTRY`` (each must exist)."""
    files = []
    for entry in filter(None, os.environ.get(REGISTRY_ENV, "").split(os.pathsep)):
        path = Path(entry)
        if not path.is_file():
            raise FileNotFoundError(f"${REGISTRY_ENV} {path}: registry file does not exist")
        files.append(path)
    return files


def add_registry_file(path: str | os.PathLike) -> Path:
    """Declare cohorts and backbones from a TOML file outside the package (``--registry FILE``).

    The file is checked now (it exists and parses), added to ``$MIL_BENCHMARK_REGISTRY`` for worker processes,
    and the registries are re-read on next use.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--registry {path}: {'is not a file' if path.exists() else 'does not exist'}")
    _read_toml(path, "--registry ")
    known = [str(p.resolve()) for p in user_registry_files()]
    if str(path) not in known:
        os.environ[REGISTRY_ENV] = os.pathsep.join(known + [str(path)])
    clear_registry_caches()
    return path


def clear_registry_caches() -> None:
    """Forget the parsed registries (after the registry files changed)."""
    from benchmark.data import backbones

    _cohorts.cache_clear()
    backbones._backbones.cache_clear()


def load_definitions(section: str) -> dict[str, dict]:
    """Merge the ``[<section>.<name>]`` tables of every ``datasets/*.toml`` file (sorted by file name), then of
    the user's registry files (``$MIL_BENCHMARK_REGISTRY``, ``--registry``); a name defined twice is an error."""
    merged: dict[str, dict] = {}
    for path in sorted(DATASETS_DIR.glob("*.toml")) + user_registry_files():
        for name, body in _read_toml(path, "").get(section, {}).items():
            check_registry_name(name, section[:-1], path)
            if name.lower() in merged:
                raise ValueError(f"{path}: {section[:-1]} {name!r} is already defined in {merged[name.lower()]['_file']}")
            if not isinstance(body, dict):
                raise ValueError(f"{path}: [{section}.{name}] must be a table")
            merged[name.lower()] = dict(body, _file=str(path))
    return merged


@dataclass(frozen=True)
class Cohort:
    """One cohort's definition and the facts of its real table (times in months)."""

    name: str
    title: str = ""
    projects: tuple[str, ...] = ()
    patients: int = 0
    slides: int = 0
    events: int = 0
    censoring: float = 0.0
    time_min: float = 0.0
    time_median: float = 0.0
    time_max: float = 0.0
    real_clinical: str | None = None
    real_splits: str | None = None
    table_source: str = ""
    source_file: str = ""

    def real_paths(self, tables_dir: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
        """Real clinical table and split folder inside ``tables_dir`` (default ``$MIL_BENCHMARK_TCGA_TABLES``)."""
        base = tables_dir or os.environ.get(REAL_TABLES_ENV)
        if not base:
            raise FileNotFoundError(
                f"no real-table directory given for cohort {self.name!r}: pass one or set ${REAL_TABLES_ENV}"
            )
        if not self.real_clinical:
            raise FileNotFoundError(f"cohort {self.name!r} declares no real clinical table")
        base = Path(base)
        return base / self.real_clinical, (base / self.real_splits) if self.real_splits else None


@lru_cache(maxsize=1)
def _cohorts() -> dict[str, Cohort]:
    out = {}
    for name, body in load_definitions("cohorts").items():
        try:
            out[name] = Cohort(
                name=name,
                title=body.get("title", name),
                projects=tuple(body.get("projects", ())),
                patients=int(body.get("patients", 0)),
                slides=int(body.get("slides", 0)),
                events=int(body.get("events", 0)),
                censoring=float(body.get("censoring", 0.0)),
                time_min=float(body.get("time_min", 0.0)),
                time_median=float(body.get("time_median", 0.0)),
                time_max=float(body.get("time_max", 0.0)),
                real_clinical=body.get("real_clinical"),
                real_splits=body.get("real_splits"),
                table_source=body.get("table_source", ""),
                source_file=body["_file"],
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{body['_file']}: cohort {name!r}: {exc}") from None
    return out


def cohort_names() -> list[str]:
    """Registered cohort names, in file order."""
    return list(_cohorts())


def get_cohort(name: str) -> Cohort:
    """The cohort named ``name`` (case-insensitive); an unknown name raises a did-you-mean error."""
    try:
        return _cohorts()[name.lower()]
    except KeyError:
        raise did_you_mean(name, cohort_names(), "dataset") from None


def resolve_cohorts(selection: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"all"`` or a comma list (or sequence) of names -> validated cohort names, in order."""
    if isinstance(selection, str):
        if selection.strip().lower() == "all":
            return cohort_names()
        selection = [s for s in selection.split(",") if s.strip()]
    return [get_cohort(s.strip()).name for s in selection]
