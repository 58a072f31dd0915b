"""One run configuration, from the command line (or an experiment file) through the runner into every record
and back.

:class:`RunConfig` is everything that determines one cell's result: the cell's coordinates (method, cohort,
backbone, fold, seed) and its settings (recipe and overrides, the method's options, selection rule, unit, bin
rule, data source). It is frozen and serialisable: the runner and trainer consume it, each record stores it once
(``record["config"]``), :meth:`RunConfig.from_record` rebuilds it and :meth:`RunConfig.to_cli` prints the exact
``run`` command that recreates the cell (same ``config_hash``).

:class:`Experiment` is a grid of them (methods x cohorts x backbones x folds x seeds under shared settings) plus
how to execute it (results folder, jobs, device, weights); it loads from an experiment file (TOML) and the
command line overrides the file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from benchmark.choices import (
    BIN_RULES, LAYOUT_CHOICES, MISSING_FEATURES, PRECISIONS, SAVE_WEIGHTS, SEEDINGS, SELECTIONS, SIGNALS, UNITS,
)
from benchmark.store.records import Cell, config_hash
from benchmark.settings.options import check_choice as _check_choice, parse_option_value
from benchmark.settings.recipes import Recipe, get_recipe

DEFAULT_N_BINS = 4
#: Record keys of ``config`` that describe how the settings were spelled, not what they resolve to: they are
#: left out of ``config_hash``, so the same resolved configuration always has the same hash.
UNHASHED_KEYS = ("overrides", "signal", "registry", "tuning")
DATA_SOURCE_DEFAULTS = {"layout": "auto", "missing_features": "error"}
FEATURE_KEYS = ("any", "20x", "10x", "5x")


def feature_items(spec: Any) -> tuple[tuple[str, str], ...]:
    """``--features`` in any spelling -> sorted ``((magnification or "any", absolute folder), ...)``.

    Accepts ``"DIR"``, ``["20x=DIR", "10x=DIR"]``, ``{"20x": DIR}`` (experiment files, records) or pairs.
    """
    if not spec:
        return ()
    if isinstance(spec, (str, os.PathLike)):
        spec = [spec]
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        pairs = [tuple(x) if isinstance(x, (list, tuple)) else _feature_pair(str(x)) for x in spec]
    out: dict[str, str] = {}
    for key, folder in pairs:
        key = "any" if key in (None, "", "any") else str(key).strip().lower()
        key = key if key.endswith("x") or key == "any" else f"{key}x"
        if key not in FEATURE_KEYS:
            raise ValueError(f"--features {key}=...: magnification must be one of 20x, 10x, 5x")
        if key in out:
            raise ValueError(f"--features: {key} is given twice")
        out[key] = os.path.abspath(str(folder))
    if "any" in out and len(out) > 1:
        raise ValueError("--features: give either one folder or one folder per magnification (20x=DIR 10x=DIR ...)")
    return tuple(sorted(out.items()))


def _feature_pair(text: str) -> tuple[str | None, str]:
    key, sep, folder = text.partition("=")
    if sep and key.strip().lower().rstrip("x").isdigit():
        return key.strip(), folder
    return None, text


def _data_source_cli(config: "RunConfig") -> list[str]:
    """The ``run`` options of a configuration's data source (nothing for the defaults)."""
    args: list[str] = []
    for name in ("clinical", "splits", "columns"):
        if getattr(config, name) is not None:
            args += [f"--{name}", getattr(config, name)]
    if config.features:
        args += ["--features"] + [v if k == "any" else f"{k}={v}" for k, v in config.features]
    for name, default in DATA_SOURCE_DEFAULTS.items():
        if getattr(config, name) != default:
            args.append(f"--{name.replace('_', '-')}={getattr(config, name)}")
    return args + [f"--registry={path}" for path in config.registry]


def _frozen_items(mapping: Mapping[str, Any] | tuple | None) -> tuple[tuple[str, Any], ...]:
    """A mapping as a sorted tuple of (key, value) pairs (hashable, order-independent)."""
    items = dict(mapping or ())
    return tuple(sorted((str(k), v) for k, v in items.items()))


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if not math.isfinite(value) else f"{value:g}"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one cell's result.

    Attributes
    ----------
    method, cohort, backbone : str
        Registered names (lower case).
    fold, seed : int
        Outer fold index and training seed.
    precision : {"fp32", "bf16", "fp16"}
        Autocast precision of the training forward passes (``benchmark.fitting.precision``); part of the
        configuration because it changes the trained weights.
    repeat : int
        Repeat of repeated cross-validation: 0 = the cohort's split files, r >= 1 = stratified patient-level
        folds drawn with seed r (``benchmark.data.splits.repeated_folds``).
    recipe : str
        Named recipe (``benchmark.settings.recipes``).
    overrides : tuple of (field, value)
        Recipe fields changed from the named recipe (``--set``), parsed to the field's type; fields equal to the
        recipe's own value are dropped, so two spellings of one recipe are one configuration.
    method_options : tuple of (name, value)
        Constructor options of this method only (``--method-option``).
    selection : {"last", "inner", "paper-max"}
    unit : {"patient", "slide"}
    bin_rule : {"train", "cohort"}
    n_bins : int
    data_root : str or None
        Real data root (absolute path); None = the embedded synthetic cohorts with ``signal``.
    signal : str
        Planted signal of the embedded synthetic cohorts (``mixed`` is the default data).
    clinical, splits : str or None
        The data source's clinical table (csv or MCAT's ``.csv.zip``) and split folder, when given apart from a
        data root (``--clinical``, ``--splits``); absolute paths.
    features : tuple of (magnification, folder)
        Feature folders (``--features DIR`` -> ``(("any", DIR),)``, ``--features 20x=A 10x=B`` ->
        ``(("10x", B), ("20x", A))``); absolute paths.
    layout : {"auto", "default", "trident", "clam", "crossfusion"}
    missing_features : {"error", "drop"}
        Slides of the table without a feature file stop the run, or are left out (reported per fold).
    registry : tuple of str
        Registry files (cohorts, backbones) the cell's names come from (``--registry``,
        ``$MIL_BENCHMARK_REGISTRY``); read again when the cell is rebuilt from its record.
    seeding : {"per-fold", "shared"}
        How the training seed (initialisation, sampling, dropout) follows from ``seed``: derived from
        (seed, repeat, fold), or ``seed`` itself for every fold (parity with the official codes; the store files
        such cells apart, label ``seeding=shared``).
    tuning : str or None
        Id of the tuning protocol that chose ``tuned`` (``benchmark.tuning.study``); None for an untuned cell.
    columns : str or None
        The clinical table's column mapping (``--columns``, canonical ``patient=..,slide=..,time=..,
        event=..|censorship=..,unit=..`` text of ``benchmark.data.clinical.ColumnMap.spec``); None = the cohort's
        registry mapping or the MCAT columns. Stored and hashed only when given, so cells without a mapping keep
        their hash.
    tuned : tuple of (name, value)
        The setting the tuner chose for this outer fold: recipe fields and constructor options, applied over
        ``overrides`` and ``method_options``. The label and the store folder name only the protocol, so the
        folds of one tuned cell (each with its own setting) are filed together, apart from the untuned cell.
    """

    method: str
    cohort: str
    backbone: str = "resnet50"
    fold: int = 0
    seed: int = 0
    recipe: str = "demo"
    overrides: tuple[tuple[str, Any], ...] = ()
    method_options: tuple[tuple[str, Any], ...] = ()
    selection: str = "last"
    unit: str = "patient"
    bin_rule: str = "train"
    n_bins: int = DEFAULT_N_BINS
    data_root: str | None = None
    signal: str = "mixed"
    repeat: int = 0
    clinical: str | None = None
    splits: str | None = None
    features: tuple[tuple[str, str], ...] = ()
    layout: str = "auto"
    missing_features: str = "error"
    registry: tuple[str, ...] = ()
    precision: str = "fp32"
    tuning: str | None = None
    tuned: tuple[tuple[str, Any], ...] = ()
    columns: str | None = None
    seeding: str = "per-fold"

    def __post_init__(self) -> None:
        setattr_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("method", "cohort", "backbone", "recipe"):
            setattr_(name, str(getattr(self, name)).lower())
        setattr_("fold", int(self.fold))
        setattr_("seed", int(self.seed))
        setattr_("repeat", int(self.repeat))
        if self.repeat < 0:
            raise ValueError(f"--repeat: repeats are numbered from 0, got {self.repeat}")
        setattr_("n_bins", int(self.n_bins))
        _check_choice(self.selection, SELECTIONS, "--selection")
        _check_choice(self.unit, UNITS, "--unit")
        _check_choice(self.bin_rule, BIN_RULES, "--bin-rule")
        _check_choice(self.signal, SIGNALS, "--signal")
        _check_choice(self.precision, PRECISIONS, "--precision")
        _check_choice(self.seeding, SEEDINGS, "--seeding")
        if self.n_bins < 2:
            raise ValueError(f"--n-bins: needs at least 2 bins, got {self.n_bins}")
        options = {k: parse_option_value(v) if isinstance(v, str) else v for k, v in dict(self.method_options).items()}
        setattr_("method_options", _frozen_items(options))
        setattr_("overrides", _frozen_items(self._effective_overrides(dict(self.overrides))))
        self._normalise_data_source(setattr_)
        setattr_("tuned", _frozen_items(self.tuned))
        if self.tuned and not self.tuning:
            raise ValueError("a tuned setting needs the id of the tuning protocol that chose it")

    def _normalise_data_source(self, setattr_) -> None:
        """Absolute paths, features as sorted (magnification, folder) pairs, checked choices."""
        for name in ("data_root", "clinical", "splits"):
            if getattr(self, name) is not None:
                setattr_(name, os.path.abspath(str(getattr(self, name))))
        setattr_("features", feature_items(self.features))
        setattr_("registry", tuple(os.path.abspath(str(p)) for p in self.registry))
        _check_choice(self.layout, LAYOUT_CHOICES, "--layout")
        _check_choice(self.missing_features, MISSING_FEATURES, "--missing-features")

    def data_source(self) -> dict[str, Any]:
        """The data-source settings that differ from the defaults (what a record stores and the loader takes)."""
        given = {"clinical": self.clinical, "splits": self.splits, "features": dict(self.features) or None,
                 "layout": self.layout, "missing_features": self.missing_features, "columns": self.columns}
        return {k: v for k, v in given.items() if v is not None and v != DATA_SOURCE_DEFAULTS.get(k)}

    def loader_arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``load_cohort`` for the data source (see :meth:`data_source`)."""
        source = self.data_source()
        if "features" in source:
            source["features"] = {(None if k == "any" else k): v for k, v in source["features"].items()}
        return source

    def _effective_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Overrides parsed to their recipe field types, without those equal to the named recipe's value."""
        if not overrides:
            return {}
        base, changed = get_recipe(self.recipe), get_recipe(self.recipe, overrides)
        return {k: getattr(changed, k) for k in overrides if getattr(changed, k) != getattr(base, k)}

    # ---- what the runner and trainer use ------------------------------------------------------------------
    def resolved_recipe(self) -> Recipe:
        """The named recipe with the overrides (and the tuned recipe fields) applied."""
        return get_recipe(self.recipe, {**dict(self.overrides), **_tuned_parts(self.tuned)[0]})

    @property
    def options(self) -> dict[str, Any]:
        """The method's constructor options (the tuned ones included) as a dict."""
        return {**dict(self.method_options), **_tuned_parts(self.tuned)[1]}

    def variant(self) -> dict[str, Any]:
        """What differs from the named recipe's defaults for this method (empty for a default cell)."""
        out: dict[str, Any] = dict(self.overrides)
        out.update(self.method_options)
        defaults = {"unit": "patient", "bin_rule": "train", "n_bins": DEFAULT_N_BINS, "precision": "fp32"}
        out.update({k: getattr(self, k) for k, v in defaults.items() if getattr(self, k) != v})
        if self.tuning:
            out["tuned"] = self.tuning
        if self.seeding == "shared":  # filed apart from the default per-fold cells, in the folder of older records
            out["seeding"] = "shared"
        return out

    def label(self) -> str:
        """Readable configuration label for tables, e.g. ``demo``, ``demo, lr=0.001, dropout=0.1`` or
        ``demo, tuned t30-s0-...`` (a tuned cell: its per-fold settings are in its records)."""
        parts = [self.recipe] + [f"tuned {v}" if k == "tuned" else f"{k}={_format_value(v)}"
                                 for k, v in self.variant().items()]
        return ", ".join(parts)

    def store_key(self) -> str:
        """The configuration's folder name in the store: the recipe name, plus a short hash of :meth:`variant`
        when anything differs from the defaults (so variants never overwrite each other's cells)."""
        variant = self.variant()
        return self.recipe if not variant else f"{self.recipe}+{config_hash(variant)[:6]}"

    @property
    def cell(self) -> Cell:
        """The cell's coordinates in the result store."""
        return Cell(self.method, self.cohort, self.backbone, self.fold, self.seed, self.store_key(), self.selection,
                    self.repeat)

    def with_(self, **changes: Any) -> "RunConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ---- records ------------------------------------------------------------------------------------------
    def record_config(self, in_dim: int, data_root: str | None, synthetic: Mapping[str, Any] | None) -> dict[str, Any]:
        """The ``config`` stored in a record: the resolved settings, how they were spelled, and the data facts.

        ``data_root`` is the folder the cohort was read from (a control signal's generated folder too);
        ``synthetic`` holds ``version`` and ``backbone`` parameters of the embedded generator (None for real data).
        """
        config: dict[str, Any] = {
            "recipe": self.resolved_recipe().to_dict(),
            "overrides": dict(self.overrides),
            "method_options": self.options,
            "unit": self.unit,
            "bin_rule": self.bin_rule,
            "n_bins": self.n_bins,
            "in_dim": int(in_dim),
            "data_root": data_root,
            "signal": self.signal,
            "synthetic_version": None if synthetic is None else synthetic["version"],
        }
        if synthetic is not None:
            config["synthetic_backbone"] = dict(synthetic["backbone"])
        config.update(self.data_source())  # only what differs from the defaults: older hashes stay valid
        if self.registry:
            config["registry"] = list(self.registry)
        if self.precision != "fp32":  # absent for fp32, so records written before the option keep their hash
            config["precision"] = self.precision
        if self.tuning:
            config["tuning"] = {"id": self.tuning, "params": dict(self.tuned)}
        if self.seeding != "shared":  # absent for shared, the seeding of every record written without the entry
            config["seeding"] = self.seeding
        return config

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RunConfig":
        """Rebuild the configuration of a stored record (any record schema)."""
        config = record.get("config") or {}
        if "recipe" not in config:
            raise ValueError(f"{record.get('_path', 'record')}: no stored configuration to rebuild the run from")
        recipe = dict(config["recipe"])
        name = str(recipe.pop("name"))
        overrides = config.get("overrides")
        if overrides is None:  # records written before overrides were stored: the difference to the named recipe
            base = get_recipe(name).to_dict()
            overrides = {k: v for k, v in recipe.items() if base.get(k) != v}
        signal = config.get("signal") or "mixed"
        data_root = None if signal != "mixed" else config.get("data_root")
        tuning = config.get("tuning") or {}
        tuned = dict(tuning.get("params") or {})
        options = {k: v for k, v in (config.get("method_options") or {}).items() if k not in tuned}
        return cls(
            method=record["method"], cohort=record["cohort"], backbone=record["backbone"], fold=int(record["fold"]),
            seed=int(record["seed"]), recipe=name, overrides=overrides, method_options=options,
            selection=record["selection"], unit=config.get("unit") or record.get("unit") or "patient",
            bin_rule=config.get("bin_rule") or "train", n_bins=config.get("n_bins") or DEFAULT_N_BINS,
            data_root=data_root, signal=signal, repeat=int(record.get("repeat") or 0), clinical=config.get("clinical"),
            splits=config.get("splits"), features=config.get("features") or (), layout=config.get("layout") or "auto",
            missing_features=config.get("missing_features") or "error", registry=config.get("registry") or (),
            precision=config.get("precision") or "fp32", tuning=tuning.get("id"),
            tuned=tuned, columns=config.get("columns"), seeding=config.get("seeding") or "shared",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``RunConfig(**d)`` rebuilds it)."""
        out = dataclasses.asdict(self)
        out["overrides"], out["method_options"] = dict(self.overrides), dict(self.method_options)
        out["features"], out["registry"] = dict(self.features), list(self.registry)
        out["tuned"] = dict(self.tuned)
        return out

    def to_cli(self, results: str | Path | None = None) -> str:
        """The ``python -m benchmark run`` command that recreates exactly this cell.

        A tuned cell is spelled with its chosen setting as plain options: the same resolved configuration
        (same ``config_hash``), filed as an untuned cell.
        """
        args = ["python", "-m", "benchmark", "run", "--methods", self.method, "--dataset", self.cohort,
                "--backbone", self.backbone, "--folds", str(self.fold), "--seed", str(self.seed),
                "--recipe", self.recipe, "--selection", self.selection]
        args += ["--repeat", str(self.repeat)] if self.repeat else []
        tuned_recipe = _tuned_parts(self.tuned)[0]
        args += [f"--set={k}={_format_value(v)}" for k, v in sorted({**dict(self.overrides), **tuned_recipe}.items())]
        args += [f"--method-option={self.method}.{k}={_format_value(v)}" for k, v in sorted(self.options.items())]
        defaults = {"unit": "patient", "bin_rule": "train", "n_bins": DEFAULT_N_BINS, "signal": "mixed",
                    "precision": "fp32", "seeding": "per-fold"}
        args += [f"--{k.replace('_', '-')}={getattr(self, k)}" for k, v in defaults.items() if getattr(self, k) != v]
        if self.data_root is not None:
            args += ["--data-root", self.data_root]
        args += _data_source_cli(self)
        if results is not None:
            args += ["--results", str(results)]
        return shlex.join(args)


def _tuned_parts(tuned: tuple[tuple[str, Any], ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tuned setting as (recipe-field overrides, constructor options)."""
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
    return ({k: v for k, v in tuned if k in recipe_fields}, {k: v for k, v in tuned if k not in recipe_fields})


def hashed_config(config: Mapping[str, Any]) -> str:
    """``config_hash`` of a record's ``config``: the resolved settings only (see ``UNHASHED_KEYS``)."""
    return config_hash({k: v for k, v in config.items() if k not in UNHASHED_KEYS})


# ---------------------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------------------
#: The placeholder coordinates of :attr:`Experiment.shared` (each cell sets its own).
ANY = "*"


@dataclass(frozen=True)
class Experiment:
    """A grid of :class:`RunConfig` under shared settings, and how to execute it.

    ``shared`` is a :class:`RunConfig` holding every setting the cells have in common (recipe, overrides,
    selection, unit, bins, data source, precision); its coordinates are placeholders that each cell sets
    (method, cohort, backbone, fold, seed, repeat) and its ``method_options`` stay empty: ``method_options``
    here maps a method name (or ``"*"`` for every method) to its options, and each cell receives only its own
    method's. ``folds`` None means every fold of the cohort. The remaining fields say how to execute the grid
    and are part of no cell's result.
    """

    methods: tuple[str, ...]
    cohorts: tuple[str, ...]
    backbones: tuple[str, ...] = ("resnet50",)
    folds: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    repeats: tuple[int, ...] = (0,)
    shared: RunConfig = RunConfig(ANY, ANY)
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # execution
    results: str | None = None
    jobs: int = 1
    device: str = "auto"
    save_weights: str = "none"
    plugins: tuple[str, ...] = ()
    executor: str = "local"
    address: str | None = None
    cpus_per_cell: float | None = None  # None: one per worker (all cores for one in-process job)
    gpus_per_cell: float = 0.0
    shard: tuple[int, int] | None = None

    def cell_config(self, method: str, cohort: str, backbone: str, repeat: int = 0, seed: int = 0,
                    fold: int = 0) -> RunConfig:
        """The configuration of one cell of the grid."""
        return self.shared.with_(method=method, cohort=cohort, backbone=backbone, repeat=repeat, seed=seed,
                                 fold=fold, method_options=_frozen_items(self.options_for(method)))

    def options_for(self, method: str) -> dict[str, Any]:
        """The options that reach ``method``: the ``"*"`` ones, then its own (which win)."""
        return {**dict(self.method_options.get("*", {})), **dict(self.method_options.get(method, {}))}

    def configs(self, n_folds: int) -> list[RunConfig]:
        """Every cell, ordered cohort -> backbone -> method -> repeat -> seed -> fold (consecutive cells share a
        cohort)."""
        folds = self.folds if self.folds is not None else tuple(range(n_folds))
        bad = [k for k in folds if k >= n_folds]
        if bad:
            raise ValueError(f"--folds: the cohorts have only {n_folds} folds (0-{n_folds - 1}); got {bad}")
        return [self.cell_config(m, c, b, r, s, k)
                for c in self.cohorts for b in self.backbones for m in self.methods for r in self.repeats
                for s in self.seeds for k in folds]

    def check(self) -> None:
        """Validate the execution settings and the method options once, before any cell (a bad value is one
        clear error; the shared cell settings were validated when ``shared`` was built)."""
        unknown = [m for m in self.method_options if m != "*" and m not in self.methods]
        if unknown:
            raise ValueError(f"--method-option: method(s) {unknown} are not among the selected methods "
                             f"{list(self.methods)}")
        if self.jobs < 1:
            raise ValueError("--jobs must be >= 1")
        _check_choice(self.save_weights, SAVE_WEIGHTS, "--save-weights")
        if self.cpus_per_cell is not None and self.cpus_per_cell <= 0:
            raise ValueError(f"--cpus-per-cell: must be > 0, got {self.cpus_per_cell}")
        if self.gpus_per_cell < 0:
            raise ValueError(f"--gpus-per-cell: must be >= 0, got {self.gpus_per_cell}")
