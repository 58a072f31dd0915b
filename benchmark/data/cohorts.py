"""The registry of cohorts and backbones (patch encoders), read from the data files ``datasets/*.toml`` and from
registry files outside the package (tables ``[cohorts.<name>]`` and ``[backbones.<name>]``). One module reads
both, so a registry file is parsed and checked in one place. A backbone has a true feature dim and optional
named variants with their own dims, addressed as ``<name>-<variant>`` or ``<name>:<variant>`` (e.g.
``resnet50-full``, 2048-d); feature folders on disk use the canonical name.

Every key of a table is checked: an unknown key (``patinets = 400``) is an error naming the file, the table and
the closest known key.

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
    _cohorts.cache_clear()
    _backbones.cache_clear()


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
            check_keys(body, section, name, path)
            merged[name.lower()] = dict(body, _file=str(path))
    return merged


#: The keys a registry table may hold (anything else is a typo, reported with the closest key).
COHORT_KEYS = ("title", "projects", "patients", "slides", "events", "censoring", "time_min", "time_median",
               "time_max", "real_clinical", "real_splits", "table_source", "columns")
BACKBONE_KEYS = ("dim", "description", "trident", "synthetic_noise", "synthetic_signal", "variants")
VARIANT_KEYS = ("dim", "description", "trident")
#: ``[cohorts.<name>.columns]``: the clinical table's columns (see :class:`benchmark.data.clinical.ColumnMap`).
COLUMN_KEYS = ("patient", "slide", "time", "event", "censorship", "unit")


def _unknown_key(key: str, known: tuple[str, ...], where: str) -> ValueError:
    return ValueError(f"{where}: {did_you_mean(key, list(known), 'key')}")


def check_keys(body: dict, section: str, name: str, path: object) -> None:
    """Raise ValueError (file, table, did-you-mean) for a key the registry does not know."""
    known = COHORT_KEYS if section == "cohorts" else BACKBONE_KEYS
    for key in body:
        if key not in known:
            raise _unknown_key(key, known, f"{path}: [{section}.{name}]")
    nested = {"columns": COLUMN_KEYS} if section == "cohorts" else {}
    for sub, keys in nested.items():
        if sub in body and not isinstance(body[sub], dict):
            raise ValueError(f"{path}: [{section}.{name}] {sub} must be a table")
        for key in body.get(sub, {}) if sub in body else ():
            if key not in keys:
                raise _unknown_key(key, keys, f"{path}: [{section}.{name}.{sub}]")
    for vname, vbody in (body.get("variants") or {}).items() if section == "backbones" else ():
        for key in vbody if isinstance(vbody, dict) else ():
            if key not in VARIANT_KEYS:
                raise _unknown_key(key, VARIANT_KEYS, f"{path}: [{section}.{name}.variants.{vname}]")


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
    #: the clinical table's column mapping (``[cohorts.<name>.columns]``), as ``((key, value), ...)``
    columns: tuple[tuple[str, str], ...] = ()

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
                columns=tuple(sorted((str(k), str(v)) for k, v in (body.get("columns") or {}).items())),
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


# ---------------------------------------------------------------------------------------------------------
# backbones
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    """One patch encoder (or one variant of it)."""

    name: str  # canonical name, also the folder name of its features
    dim: int
    description: str
    base: str  # name of the base backbone (== name when not a variant)
    variant: str | None = None
    trident: str | None = None  # encoder name in TRIDENT output folders (features_<trident>)
    synthetic_noise: float = 1.0  # per-coordinate noise std of the synthetic features
    # How strongly the encoder expresses the planted prognostic morphology: a factor on the synthetic preset's
    # amplitude (data v4). Backbones differ here, not only in noise, so the synthetic Table 2 can rank them.
    synthetic_signal: float = 1.0


@lru_cache(maxsize=1)
def _backbones() -> dict[str, Backbone]:
    out: dict[str, Backbone] = {}
    for name, body in load_definitions("backbones").items():
        try:
            out.update(_backbone_entries(name, body))
        except KeyError as exc:
            raise ValueError(f"{body['_file']}: backbone {name!r} lacks field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{body['_file']}: backbone {name!r}: {exc}") from None
    return out


def _backbone_entries(name: str, body: dict) -> dict[str, Backbone]:
    """The backbone ``name`` of one registry table and its variants."""
    dim = int(body["dim"])
    noise = float(body.get("synthetic_noise", 1.0))
    signal = float(body.get("synthetic_signal", 1.0))
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not (noise >= 0 and signal >= 0):  # also refuses NaN
        raise ValueError("synthetic_noise and synthetic_signal must be >= 0")
    trident = body.get("trident")
    out = {name: Backbone(name, dim, body.get("description", ""), name, None, trident, noise, signal)}
    for vname, vbody in body.get("variants", {}).items():
        full = f"{name}-{vname}"
        check_registry_name(full, "backbone", body["_file"])
        out[full] = Backbone(
            full, int(vbody["dim"]), vbody.get("description", ""), name, vname,
            vbody.get("trident", f"{trident}_{vname}" if trident else None), noise, signal,
        )
    return out


def backbone_names(include_variants: bool = True) -> list[str]:
    """Registered backbone names (base names first in file order, each followed by its variants)."""
    return [n for n, b in _backbones().items() if include_variants or b.variant is None]


def get_backbone(name: str) -> Backbone:
    """The backbone ``name`` (``resnet50``, ``resnet50-full`` or ``resnet50:full``); unknown -> did-you-mean."""
    key = name.lower().replace(":", "-")
    try:
        return _backbones()[key]
    except KeyError:
        raise did_you_mean(name, backbone_names(), "backbone") from None


def resolve_backbones(selection: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"all"`` (the five base backbones) or a comma list of names -> validated canonical names."""
    if isinstance(selection, str):
        if selection.strip().lower() == "all":
            return backbone_names(include_variants=False)
        selection = [s for s in selection.split(",") if s.strip()]
    return [get_backbone(s.strip()).name for s in selection]


def check_dim(found: int, backbone: Backbone, path: object) -> None:
    """Raise a clear error when a feature file's dim disagrees with the declared backbone."""
    if found == backbone.dim:
        return
    same = [b.name for b in _backbones().values() if b.dim == found and b.base == backbone.base]
    hint = f" Did you mean backbone {same[0]!r} ({found}-d)?" if same else ""
    raise ValueError(
        f"{path}: features have dim {found}, but backbone {backbone.name!r} declares dim {backbone.dim}.{hint}"
    )
