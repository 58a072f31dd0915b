"""Search spaces of the hyper-parameter tuner (``python -m benchmark tune``).

A search space maps a parameter name to a range, written as a plain dict so that a method module, a plugin and
an experiment file (TOML) spell it the same way:

- ``{"low": 1e-5, "high": 1e-3, "log": true}``: a float range (log-uniform with ``log``);
- ``{"low": 1, "high": 4}``: an integer range (both ends integers);
- ``{"choices": [128, 256]}``: a categorical choice (one choice pins the parameter).

A parameter is either a recipe field (``lr``, ``weight_decay``, ``accumulation``, ...; every method of a
comparison shares them) or a constructor option of the method. Every method gets :data:`SHARED_SPACE` plus what
it declares with ``register_method(..., search_space=...)``; a method sets a shared entry to None to leave it
out (e.g. a model without dropout). An experiment file narrows or overrides entries (``[tune.space.amil]``,
``[tune.space."*"]`` for every method; ``false`` removes an entry). :func:`method_space` checks everything
(unknown names, empty or reversed ranges, names the constructor does not take) before any trial runs.
"""
from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping

from benchmark.naming import suggestion
from benchmark.store.records import config_hash
from benchmark.settings.recipes import Recipe
from benchmark.api.registry import constructor_options, get_method_spec

#: Shared by every method: learning rate (log-uniform), weight decay (log-uniform), dropout and the
#: accumulation window (bags per optimiser step). Ranges bracket the official values of every method
#: (lr 5e-5..2e-4, weight decay 4e-6..1e-3, dropout 0..0.3, windows of 1..32 bags; baselines.md,
#: crossfusion.md) and the demo recipe (lr 2e-4, weight decay 1e-5, windows of 8 bags).
SHARED_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"low": 1e-5, "high": 1e-3, "log": True},
    "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
    "dropout": {"low": 0.0, "high": 0.5},
    "accumulation": {"choices": [4, 8, 16, 32]},
}

#: Recipe fields a space may tune (``name`` is not a setting).
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe) if f.name != "name")
_RANGE_KEYS = {"low", "high", "log"}


class SpaceError(ValueError):
    """A search space that cannot be searched (one line, said before any trial runs)."""


@dataclass(frozen=True)
class Param:
    """One searchable parameter.

    Attributes
    ----------
    name : str
    kind : {"float", "int", "categorical"}
    low, high : float or int or None
        Range ends (inclusive); None for a categorical.
    log : bool
        Sample on a log scale.
    choices : tuple
        Values of a categorical (empty otherwise).
    """

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The value of this parameter for an Optuna trial (``trial.suggest_*``)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def values(self) -> list[Any]:
        """Values worth checking against the method (both range ends, or every choice)."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        """The plain-dict spelling (what a method or an experiment file writes)."""
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, **({"log": True} if self.log else {})}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choices_param(name: str, spec: Mapping[str, Any], where: str) -> Param:
    choices = spec["choices"]
    if set(spec) != {"choices"}:
        raise SpaceError(f"{where}: {name} gives choices together with {sorted(set(spec) - {'choices'})}; use one")
    if not isinstance(choices, (list, tuple)) or not choices:
        raise SpaceError(f"{where}: {name} has no choices (an empty choice list cannot be searched)")
    if any(not isinstance(c, (bool, int, float, str)) for c in choices):
        raise SpaceError(f"{where}: {name} choices must be numbers, booleans or strings, got {list(choices)}")
    return Param(name, "categorical", choices=tuple(choices))


def parse_param(name: str, spec: Any, where: str) -> Param:
    """One space entry (plain-dict spelling, see the module docstring) as a :class:`Param`.

    Raises
    ------
    SpaceError
        Unknown keys, a missing end, an empty or reversed range, or a log range that reaches 0.
    """
    if isinstance(spec, Param):
        return spec
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{where}: {name} must be a table like {{low = 0.0, high = 0.5}} or {{choices = [..]}}, "
                         f"got {spec!r}")
    if "choices" in spec:
        return _choices_param(name, spec, where)
    unknown = set(spec) - _RANGE_KEYS
    if unknown:
        raise SpaceError(f"{where}: {name} has unknown key(s) {sorted(unknown)}; a range takes low, high and log")
    low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
    if not (_is_number(low) and _is_number(high)):
        raise SpaceError(f"{where}: {name} needs numeric low and high, got low={low!r}, high={high!r}")
    if low >= high:
        what = "empty" if low == high else "reversed"
        raise SpaceError(f"{where}: {name} range [{low}, {high}] is {what} (low must be < high; "
                         f"pin a value with {{choices = [{low}]}})")
    if log and low <= 0:
        raise SpaceError(f"{where}: {name} is log-scaled but its range [{low}, {high}] reaches 0 or below")
    kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
    return Param(name, kind, low, high, log)


# -------------------------------------------------------------------------------------------------------
# what a method accepts
# -------------------------------------------------------------------------------------------------------
def _check_target(method: str, param: Param, accepted: set[str] | None) -> None:
    """A parameter must be a recipe field or an option the method's constructor takes."""
    if param.name in RECIPE_FIELDS:
        _check_recipe_values(method, param)
        return
    if accepted is None or param.name in accepted:
        return
    hint = suggestion(param.name, set(RECIPE_FIELDS) | accepted)
    raise SpaceError(f"search space of {method}: unknown parameter {param.name!r}{hint}: neither a recipe field "
                     f"nor an option of {method}'s constructor (options: {', '.join(sorted(accepted)) or 'none'})")


def _check_recipe_values(method: str, param: Param) -> None:
    """Every value of a recipe-field parameter must make a valid recipe (e.g. lr > 0, accumulation >= 1)."""
    from benchmark.settings.recipes import get_recipe

    for value in param.values():
        try:
            get_recipe("demo", {param.name: value})
        except (TypeError, ValueError) as exc:
            raise SpaceError(f"search space of {method}: {param.name}={value!r} is not a valid recipe value "
                             f"({exc})") from None


# -------------------------------------------------------------------------------------------------------
# one method's space
# -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """The checked space of one method."""

    method: str
    params: tuple[Param, ...]

    def suggest(self, trial) -> dict[str, Any]:
        """One setting: ``{name: value}`` for every parameter, drawn through the trial."""
        return {p.name: p.suggest(trial) for p in self.params}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {p.name: p.to_dict() for p in self.params}

    def digest(self) -> str:
        """Short hash of the space (a changed space is a new study, never mixed with the old one)."""
        return config_hash(self.to_dict())[:8]


def _merge_overrides(space: dict[str, Any], overrides: Mapping[str, Any] | None, method: str) -> dict[str, Any]:
    """The experiment file's entries for every method (``"*"``), then for this one; ``false`` removes."""
    merged = dict(space)
    for scope in ("*", method):
        for name, spec in dict((overrides or {}).get(scope) or {}).items():
            if spec is False or spec is None:
                merged.pop(name, None)
            else:
                merged[name] = spec
    return merged


def method_space(method: str, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> SearchSpace:
    """The checked search space of a registered method.

    Parameters
    ----------
    method : str
        Registered method name.
    overrides : mapping, optional
        ``{"*" or method: {name: spec or False}}`` from an experiment file.

    Raises
    ------
    SpaceError
        A bad entry (see :func:`parse_param`), a name that is neither a recipe field nor a constructor option,
        or an empty space (nothing to tune).
    """
    spec = get_method_spec(method)
    declared = {**SHARED_SPACE, **dict(spec.search_space or {})}
    merged = _merge_overrides({k: v for k, v in declared.items() if v is not None}, overrides, spec.name)
    accepted = constructor_options(spec.builder)
    where = f"search space of {spec.name}"
    params = []
    for name in sorted(merged):
        param = parse_param(name, merged[name], where)
        _check_target(spec.name, param, accepted)
        params.append(param)
    if not params:
        raise SpaceError(f"{where} is empty: nothing to tune")
    return SearchSpace(spec.name, tuple(params))


def check_override_scopes(overrides: Mapping[str, Any] | None, methods: list[str]) -> None:
    """Every method named in ``[tune.space.<method>]`` must be among the tuned methods (typos caught)."""
    for scope in (overrides or {}):
        if scope != "*" and scope not in methods:
            raise SpaceError(f"[tune.space.{scope}]: {scope!r} is not among the tuned methods {methods}")


def split_setting(setting: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's setting as (recipe-field overrides, constructor options)."""
    recipe = {k: v for k, v in setting.items() if k in RECIPE_FIELDS}
    return recipe, {k: v for k, v in setting.items() if k not in RECIPE_FIELDS}


def tunable(method: str) -> bool:
    """Whether a method has anything to tune (the ``random`` floor has no trainable parameter)."""
    return get_method_spec(method).search_space is not False
