"""Method registry, in the style of timm's ``@register_model``.

A method is an ``nn.Module`` whose ``forward(bag: Bag) -> SurvivalOutput``. It registers itself::

    from benchmark.data.bag import Needs
    from benchmark.training.registry import register_method

    @register_method("amil", needs=Needs(magnifications=(20,)),
                     source="Ilse et al. 2018; mahmoodlab/Patch-GCN models/model_set_mil.py")
    class AMIL(nn.Module):
        def __init__(self, in_dim: int, n_bins: int = 4, dropout: float = 0.25): ...

Built-in methods live one per module in ``methods/``; that package is declared in the
``mil_benchmark.methods`` entry-point group of ``pyproject.toml`` and imported on first use, like any plugin. A module outside the
project registers the same way and is loaded with ``--plugin my_module`` or through the
``mil_benchmark.methods`` entry-point group, without touching the harness.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

from torch import nn

from benchmark.data.bag import Needs
from benchmark.naming import did_you_mean

ENTRY_POINT_GROUP = "mil_benchmark.methods"


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about a method."""

    name: str
    builder: Callable[..., nn.Module]
    needs: Needs
    source: str
    module: str
    #: Survival head: "nll" (shared discrete-time NLL) or "cox" (windowed Cox partial likelihood).
    loss: str = "nll"
    #: Methods excluded from ``--methods all`` (e.g. the ``random`` floor is still included by default).
    in_all: bool = True
    #: Hyper-parameters the tuner searches besides the shared ones (``benchmark.training.search_spaces``):
    #: ``{name: {"low": .., "high": .., "log": ..} or {"choices": [..]} or None}`` (None leaves a shared entry
    #: out); False = nothing to tune (no trainable parameter).
    search_space: Mapping[str, Any] | bool | None = None


_REGISTRY: dict[str, MethodSpec] = {}
_builtins_loaded = False


def register_method(
    name: str,
    *,
    needs: Needs = Needs(),
    source: str = "",
    loss: str = "nll",
    in_all: bool = True,
    search_space: Mapping[str, Any] | bool | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator that registers a method under ``name``.

    The builder is called as ``builder(in_dim=..., n_bins=..., **options)``. ``search_space`` declares the
    method's own tunable hyper-parameters (see :class:`MethodSpec`); the tuner checks it against the builder.
    """
    if loss not in ("nll", "cox"):
        raise ValueError(f"loss must be 'nll' or 'cox', got {loss!r}")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        existing = _REGISTRY.get(key)
        if existing is not None and existing.builder is not builder and existing.module != builder.__module__:
            raise ValueError(f"method {name!r} is already registered by {existing.module}")
        _REGISTRY[key] = MethodSpec(
            name=key, builder=builder, needs=needs, source=source, module=builder.__module__, loss=loss, in_all=in_all,
            search_space=search_space,
        )
        return builder

    return decorator


def load_builtin_methods() -> None:
    """Import every method package declared in the ``mil_benchmark.methods`` entry-point group (the harness's own
    ``methods`` package among them, see ``pyproject.toml``); each module registers itself on import."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def load_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import external modules that register methods (the ``--plugin`` option)."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise ImportError(f"could not import plugin module {mod!r}: {exc}") from exc


def method_names(only_in_all: bool = False) -> list[str]:
    load_builtin_methods()
    return sorted(n for n, s in _REGISTRY.items() if s.in_all or not only_in_all)


def get_method_spec(name: str) -> MethodSpec:
    load_builtin_methods()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise did_you_mean(name, list(_REGISTRY), "method") from None


def resolve_methods(selection: str) -> list[str]:
    """``"all"`` or a comma list of names -> registered names, in order, validated."""
    if selection.strip().lower() == "all":
        return method_names(only_in_all=True)
    names = [s.strip().lower() for s in selection.split(",") if s.strip()]
    for n in names:
        get_method_spec(n)
    return names


def create_method(name: str, in_dim: int, n_bins: int = 4, **options: Any) -> nn.Module:
    """Instantiate a registered method.

    Parameters
    ----------
    name : str
        Registered method name (case-insensitive).
    in_dim : int
        Patch-feature dimension of the backbone.
    n_bins : int
        Number of discrete-time survival bins (output logits).
    **options
        Method-specific keyword options (see each method's docstring).
    """
    spec = get_method_spec(name)
    return spec.builder(in_dim=in_dim, n_bins=n_bins, **options)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
