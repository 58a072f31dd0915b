"""Every setting of ``run`` and ``tune``, declared once, and the one merge: defaults < experiment file < command line.

Each :class:`Setting` names its experiment-file key, its command-line flag, the TOML types it accepts, its
default, its allowed values (from :mod:`benchmark.choices`) and its meaning. The same table builds the argparse
options (:func:`add_arguments`), checks an experiment file (:func:`read_experiment_file`, unknown keys get a
"did you mean"), merges the three sources (:func:`merge`) and writes the reference of every key
(:func:`reference_markdown`, docs/SETTINGS.md, tested equal). One parser per kind of value (:func:`parse_indices`,
:func:`parse_assignments`, :func:`parse_option_value`, :func:`parse_shard`) names the option it parses in its
error. Nothing here imports torch, so ``python -m benchmark --help`` starts fast.
"""
from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmark import choices
from benchmark.naming import did_you_mean

#: Sections of the settings, in the order the reference lists them. ``tune`` keys live in a ``[tune]`` table.
SECTIONS = {
    "grid": "Which cells: methods x cohorts x backbones x repeats x seeds x folds",
    "data": "Where the data are (real data given apart from a data root: docs/DATA.md)",
    "training": "How each cell is trained and scored (part of the cell's configuration)",
    "execution": "Where and how the cells run (no effect on a result, except `precision`)",
    "tune": "`benchmark tune` only, in a `[tune]` table (docs/TUNING.md)",
}


@dataclass(frozen=True)
class Setting:
    """One setting: experiment-file ``key``, command-line ``flag``, accepted TOML ``types``, ``default``."""

    key: str
    flag: str
    types: tuple[type, ...]
    default: Any
    help: str
    section: str
    choices: tuple[str, ...] | None = None
    cli_type: Callable[[str], Any] | None = None
    path: bool = False  # relative paths in an experiment file are taken from the file's folder
    many: bool = False  # the flag takes several values (``--features 20x=A 10x=B``)
    cli: bool = True  # False: experiment file only (tables of values)
    metavar: str | None = None

    @property
    def type_names(self) -> str:
        names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "table"}
        return " or ".join(names[t] for t in self.types)


def _s(key: str, flag: str | None, types, default, section: str, help: str, **kw) -> Setting:
    types = types if isinstance(types, tuple) else (types,)
    return Setting(key, flag or f"--{key.replace('_', '-')}", types, default, help, section, **kw)


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    _s("methods", None, (str, list), "amil", "grid", "'all' or a comma list of registered methods"),
    _s("datasets", "--dataset", (str, list), "blca", "grid", "'all' or a comma list of cohorts"),
    _s("backbones", "--backbone", (str, list), "resnet50", "grid",
       "'all' (the five base backbones) or a comma list"),
    _s("folds", None, (str, list, int), "all", "grid", "outer folds, e.g. 0-4, 0,2 or all"),
    _s("seeds", "--seed", (str, list, int), "0", "grid", "training seed(s), e.g. 0 or 0-2"),
    _s("seeding", None, str, "per-fold", "grid", "per-fold: each fold's training seed derived from (seed, repeat, "
       "fold), so folds vary as training runs do; shared: the seed for every fold, as the official codes (parity; "
       "filed apart, label seeding=shared)", choices=choices.SEEDINGS),
    _s("repeats", None, int, 1, "grid", "repeated cross-validation: R split sets (repeat 0 = the cohort's split "
       "files, 1..R-1 stratified patient-level folds drawn with seed r)", cli_type=int),
    _s("repeat", None, (str, list, int), None, "grid", "only these repeats, e.g. 2 or 1-3 (instead of repeats)"),
    _s("data_root", None, str, None, "data", "real data root (default: the embedded synthetic cohorts)", path=True),
    _s("clinical", None, str, None, "data", "clinical table, .csv or MCAT's .csv.zip as shipped "
       "(default <cohort dir>/clinical.csv)", path=True, metavar="FILE"),
    _s("splits", None, str, None, "data", "folder of MCAT splits_{k}.csv files (e.g. written by `benchmark splits`)",
       path=True, metavar="DIR"),
    _s("columns", None, (str, dict), None, "data", "the clinical table's columns and their meaning: patient=..,"
       "slide=..,time=..,event=..|censorship=..,unit=months|days|years (exactly one of event / censorship; "
       "default: the cohort's registry mapping, else MCAT's case_id, slide_id, survival_months, censorship)",
       metavar="KEY=COLUMN,..."),
    _s("features", None, (str, list, dict), None, "data", "feature folder(s): one (CLAM FEAT_DIR, TRIDENT job "
       "folder, ...) or one per magnification, e.g. 20x=DIR 10x=DIR 5x=DIR", path=True, many=True,
       metavar="[MAGx=]DIR"),
    _s("layout", None, str, "auto", "data", "feature layout (auto: every slide of the table is checked)",
       choices=choices.LAYOUT_CHOICES),
    _s("missing_features", None, str, "error", "data", "slides of the table without a feature file: stop "
       "(error) or leave them out and report what each fold loses (drop)", choices=choices.MISSING_FEATURES),
    _s("registry", None, (str, list), [], "data", "registry file(s) of extra cohorts and backbones (TOML)",
       path=True, cli=False),
    _s("signal", None, str, "mixed", "data", "planted signal of the embedded synthetic cohorts (ignored with a "
       "data root); results default to results/synthetic-<signal> when it is not 'mixed'",
       choices=choices.SIGNALS),
    _s("recipe", None, str, None, "training", "paper | mahmood | demo (default: demo on synthetic data, paper "
       "on real data)"),
    _s("set", None, dict, {}, "training", "recipe fields changed, e.g. lr=3e-4 epochs=4", cli=False),
    _s("method_options", None, dict, {}, "training", "constructor options per method, e.g. "
       "[method_options.amil] dropout = 0.1 (`*` = every method)", cli=False),
    _s("selection", None, str, "last", "training", "model selection; paper-max looks at the reported fold "
       "(optimistic, marked in tables)", choices=choices.SELECTIONS),
    _s("unit", None, str, "patient", "training", "bag unit", choices=choices.UNITS),
    _s("bin_rule", None, str, "train", "training", "time-bin edges from the training fold (train), the whole "
       "cohort (MCAT's rule) or its slides (CrossFusion's)", choices=choices.BIN_RULES),
    _s("n_bins", None, int, 4, "training", "discrete-time bins", cli_type=int),
    _s("precision", None, str, "fp32", "execution", "autocast precision of training (fp16 with a gradient "
       "scaler, CUDA only)", choices=choices.PRECISIONS),
    _s("results", None, str, None, "execution", "result store root (default results/synthetic or "
       "results/real)", path=True),
    _s("jobs", None, int, 1, "execution", "cells at a time (worker processes, each with one torch thread)",
       cli_type=int),
    _s("device", None, str, "auto", "execution", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."),
    _s("save_weights", None, (str, bool), "none", "execution", "none (records only; `plot heatmap` retrains a "
       "cell on request) or last (the selected model's weights beside each record)",
       choices=choices.SAVE_WEIGHTS),
    _s("plugins", None, list, [], "execution", "modules or .py files that register extra methods", path=False,
       cli=False),
    _s("executor", None, str, "local", "execution", "where cells run (`benchmark list executors`)"),
    _s("address", None, str, None, "execution", "Ray cluster: auto, host:port or ray://host:port "
       "(default $RAY_ADDRESS, else a local Ray)"),
    _s("cpus_per_cell", None, (int, float), None, "execution", "CPUs (torch threads) per cell (default 1 per "
       "worker or Ray task; every core for one job)", cli_type=float),
    _s("gpus_per_cell", None, (int, float), 0.0, "execution", "GPUs per cell with the ray executor, e.g. 0.5 "
       "packs two cells on a GPU", cli_type=float),
    _s("shard", None, str, None, "execution", "run only shard I of N of the grid (0-based; e.g. a Slurm array "
       "task)", metavar="I/N"),
)}

TUNE_SETTINGS: dict[str, Setting] = {s.key: s for s in (
    _s("trials", None, int, 30, "tune", "finished trials per outer fold", cli_type=int),
    _s("budget", None, str, "trials", "tune", "equal number of trials or equal wall-clock time per method",
       choices=choices.TUNING_BUDGETS),
    _s("timeout_per_method", None, (int, float), None, "tune", "seconds of trials per method with budget time "
       "(split over its outer folds)", cli_type=float, metavar="S"),
    _s("sampler_seed", None, int, 0, "tune", "TPE sampler seed, the same for every method", cli_type=int),
    _s("pruner", None, str, "median", "tune", "pruner fed every epoch", choices=choices.PRUNERS),
    _s("inner_folds", None, int, 3, "tune", "inner CV folds of each outer training fold (1 = one inner split)",
       cli_type=int),
    _s("storage", None, str, None, "tune", "journal file or RDB URL (sqlite:///tune.db); default "
       "<results>/tuning/optuna.journal"),
    _s("space", None, dict, {}, "tune", "search-space overrides, [tune.space.<method>] tables", cli=False),
)}


# ---- parsers: one per kind of value, each naming its option ------------------------------------------------
def parse_indices(text: Any, option: str) -> list[int]:
    """``"0-4"``, ``"0,2,3"``, ``3`` or ``[0, 2]`` -> sorted non-negative integers (folds, seeds, repeats)."""
    text = ",".join(str(v) for v in text) if isinstance(text, list) else str(text)
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            out.update(range(int(first), int(last) + 1) if sep else [int(first)])
        except ValueError:
            raise ValueError(f"{option}: cannot parse {text!r} (expected e.g. 0-4 or 0,2,3)") from None
    if not out or min(out) < 0:
        raise ValueError(f"{option}: no valid value in {text!r}")
    return sorted(out)


def parse_assignments(items: list[str] | None, option: str = "--set") -> dict[str, str]:
    """``["lr=3e-4", "epochs=4"]`` -> ``{"lr": "3e-4", "epochs": "4"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_option_value(text: str) -> Any:
    """A value typed on the command line: int, float, bool, None or string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_shard(text: str | None, option: str = "--shard") -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; None stays None."""
    if text is None:
        return None
    index, slash, count = str(text).strip().partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"{option}: expected i/n (e.g. 0/4), got {text!r}") from None
    if not slash or n < 1:
        raise ValueError(f"{option} {text}: the shard count n must be at least 1")
    if not 0 <= i < n:
        raise ValueError(f"{option} {text}: the shard index must be in 0..{n - 1} (shards are numbered from 0)")
    return i, n


def check_choice(value: Any, allowed: tuple[str, ...], option: str) -> None:
    """One line naming the option when ``value`` is not allowed."""
    if value not in allowed:
        raise ValueError(f"{option}: {value!r} is not one of {', '.join(allowed)}")


# ---- argparse ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, table: dict[str, Setting], sections: tuple[str, ...],
                  choices_of: dict[str, tuple[str, ...]] | None = None) -> None:
    """Add the command-line options of ``table``'s settings in ``sections``; every default is None, so
    :func:`merge` knows what the command line gave. ``choices_of`` adds registry names (e.g. executors)."""
    for setting in table.values():
        if not setting.cli or setting.section not in sections:
            continue
        allowed = (choices_of or {}).get(setting.key, setting.choices)
        default_text = "" if setting.default in (None, [], {}) else f" (default {setting.default})"
        kwargs: dict[str, Any] = dict(dest=setting.key, default=None, help=setting.help + default_text)
        if setting.many:
            kwargs.update(nargs="+", action="extend")
        elif setting.cli_type is not None:
            kwargs["type"] = setting.cli_type
        if allowed is not None:
            kwargs["choices"] = allowed
        if setting.metavar:
            kwargs["metavar"] = setting.metavar
        parser.add_argument(setting.flag, **kwargs)


# ---- experiment files ----------------------------------------------------------------------------------------
def read_experiment_file(path: str | Path) -> dict[str, Any]:
    """An experiment file (TOML) as a dict of settings, every key and type checked (``[tune]`` included).

    Example::

        methods = ["amil", "dsmil"]
        datasets = "blca,ucec"
        folds = "0-4"
        recipe = "demo"
        [set]
        lr = 3e-4
        [method_options.amil]
        dropout = 0.1
        [tune]
        trials = 20
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read the experiment file ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not valid TOML ({exc})") from None
    tune = data.pop("tune", {})
    _check_keys(data, SETTINGS, f"--config {path}")
    if not isinstance(tune, dict):
        raise ValueError(f"--config {path}: tune must be a table ([tune])")
    _check_keys(tune, TUNE_SETTINGS, f"--config {path}: [tune]")
    for key, setting in SETTINGS.items():
        if setting.path and key in data:
            data[key] = _from_folder(path.parent, data[key])
    return {**data, "tune": tune} if tune else data


def _check_keys(data: dict[str, Any], table: dict[str, Setting], where: str) -> None:
    for key, value in data.items():
        if key not in table:
            raise ValueError(f"{where}: {did_you_mean(key, list(table), 'setting')}")
        types = table[key].types
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{where}: {key} must be a {table[key].type_names}, got {type(value).__name__}")


def _from_folder(base: Path, value: Any) -> Any:
    """Paths of an experiment file, relative ones taken from the file's folder (``20x=DIR`` items too)."""
    if isinstance(value, dict):
        return {k: str(base / str(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_folder(base, v) for v in value]
    key, sep, folder = str(value).partition("=")
    if sep and key.strip().lower().rstrip("x").isdigit():
        return f"{key}={base / folder}"
    return str(base / str(value))


# ---- the merge ---------------------------------------------------------------------------------------------
def merge(args: argparse.Namespace, file: dict[str, Any] | None = None,
          table: dict[str, Setting] = SETTINGS) -> dict[str, Any]:
    """``table``'s settings: the defaults, then ``file`` (an experiment file's keys), then what the command line
    gave (options left at None were not given)."""
    merged = {key: setting.default for key, setting in table.items()}
    merged.update({k: v for k, v in (file or {}).items() if k in table})
    merged.update({k: getattr(args, k) for k, s in table.items() if s.cli and getattr(args, k, None) is not None})
    return merged


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of ``run`` / ``tune``: :func:`merge` of the experiment file (``--config``) and the command
    line, with the values that combine rather than override (plugins, ``--set``, ``--no-weights``) resolved;
    ``given`` holds the keys the file or the command line set (the rest are defaults)."""
    file = read_experiment_file(args.config) if getattr(args, "config", None) else {}
    merged = merge(args, file)
    if isinstance(merged["save_weights"], bool):  # an experiment file may say true / false
        merged["save_weights"] = "last" if merged["save_weights"] else "none"
    if getattr(args, "no_weights", False):
        merged["save_weights"] = "none"
    check_choice(merged["save_weights"], choices.SAVE_WEIGHTS, "--save-weights")
    merged["plugins"] = list(file.get("plugins") or []) + list(getattr(args, "plugin", []) or [])
    registry = file.get("registry") or []
    merged["registry"] = [registry] if isinstance(registry, str) else list(registry)
    merged["set"] = {**{k: str(v) for k, v in (file.get("set") or {}).items()},
                     **parse_assignments(getattr(args, "overrides", None), "--set")}
    merged["tune"] = merge(args, file.get("tune"), TUNE_SETTINGS)
    merged["given"] = set(file) | {k for k, s in SETTINGS.items() if s.cli and getattr(args, k, None) is not None}
    return merged


# ---- the reference -----------------------------------------------------------------------------------------
def reference_markdown() -> str:
    """The reference of every experiment-file key (docs/SETTINGS.md is this text; a test keeps them equal)."""
    lines = ["# Settings: experiment-file keys and command-line options", "",
             "Generated from `benchmark/settings/options.py` (`python -m benchmark list settings --markdown`). "
             "An experiment file (`run --config FILE.toml`, `tune --config FILE.toml`) may give any key below; "
             "an option given on the command line wins over the file, the file over the default. Relative paths "
             "in a file are taken from the file's folder.", ""]
    for section, title in SECTIONS.items():
        table = TUNE_SETTINGS if section == "tune" else SETTINGS
        lines += [f"## {section}", "", title + ".", "", "| key | option | type | default | meaning |",
                  "|---|---|---|---|---|"]
        for s in (s for s in table.values() if s.section == section):
            allowed = f" One of: {', '.join(s.choices)}." if s.choices else ""
            flag = f"`{s.flag}`" if s.cli else "(file only)"
            default = "" if s.default in (None, [], {}) else f"`{s.default}`"
            lines.append(f"| `{s.key}` | {flag} | {s.type_names} | {default} | {s.help}.{allowed} |")
        lines.append("")
    return "\n".join(lines)
