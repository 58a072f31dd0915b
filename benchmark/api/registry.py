"""Method registry, in the style of timm's ``@register_model``.

A method is an ``nn.Module`` whose ``forward(bag: Bag) -> SurvivalOutput``. It registers itself::

    from benchmark.data.bag import Needs
    from benchmark.api.registry import register_method

    @register_method("amil", needs=Needs(magnifications=(20,)),
                     source="Ilse et al. 2018; mahmoodlab/Patch-GCN models/model_set_mil.py")
    class AMIL(nn.Module):
        def __init__(self, in_dim: int, n_bins: int = 4, dropout: float = 0.25): ...

Built-in methods live one per module in ``methods/``; that package is declared in the
``mil_benchmark.methods`` entry-point group of ``pyproject.toml`` and imported on first use, like any plugin. A module outside the
project registers the same way and is loaded with ``--plugin my_module`` or ``--plugin path/to/file.py`` (a
global option of every command) or through the
``mil_benchmark.methods`` entry-point group, without touching the harness.
"""
from __future__ import annotations

import importlib
import importlib.util
import dataclasses
import inspect
import os
import typing
import sys
from dataclasses import dataclass
from pathlib import Path
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

from torch import nn

from benchmark.data.bag import Needs
from benchmark.naming import check_registry_name, did_you_mean, suggestion

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
    #: Hyper-parameters the tuner searches besides the shared ones (``benchmark.tuning.search_spaces``):
    #: ``{name: {"low": .., "high": .., "log": ..} or {"choices": [..]} or None}`` (None leaves a shared entry
    #: out); False = nothing to tune (no trainable parameter).
    search_space: Mapping[str, Any] | bool | None = None
    #: Constructor options of the method's plain-PyTorch reference path, timed beside the default path by
    #: ``benchmark bench --reference`` (empty: the method has no separate fast path).
    reference_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Constructor options that reproduce the official code's kernel choice (``bench --official``; empty: none).
    official_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Constructor options for counting model FLOPs (e.g. recomputation switched off: it is not model work).
    flop_count_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Seconds per training draw on a 2-core CPU (one torch thread, two cells at a time): the mean s/cell of the
    #: demo BLCA cells of the measured ``make table1`` grid (docs/CORE.md "Grid cost") divided by a demo BLCA
    #: cell's 515 draws. The cost model's prior before a store has measured the method; None: unknown.
    cost_prior: float | None = None
    #: Row of the method in the CrossFusion paper's Table 1 (tables list these first, in this order; None: not
    #: in the paper). ``chance_floor``: a chance-level baseline, listed last.
    paper_row: int | None = None
    chance_floor: bool = False


_REGISTRY: dict[str, MethodSpec] = {}
_KNOWLEDGE_FIELDS = ("reference_options", "official_options", "flop_count_options", "cost_prior", "paper_row",
                     "chance_floor")
_builtins_loaded = False


def register_method(
    name: str,
    *,
    needs: Needs = Needs(),
    source: str = "",
    loss: str = "nll",
    in_all: bool = True,
    search_space: Mapping[str, Any] | bool | None = None,
    **knowledge: Any,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator that registers a method under ``name``.

    The builder is called as ``builder(in_dim=..., n_bins=..., **options)``. ``search_space`` declares the
    method's own tunable hyper-parameters (see :class:`MethodSpec`); the tuner checks it against the builder.
    ``knowledge`` holds what the harness's tools need to know about this method and nothing else tells them:
    ``reference_options``, ``official_options``, ``flop_count_options``, ``cost_prior``, ``paper_row``,
    ``chance_floor`` (see :class:`MethodSpec`).
    """
    unknown = set(knowledge) - set(_KNOWLEDGE_FIELDS)
    if unknown:
        raise ValueError(f"register_method({name!r}): {did_you_mean(sorted(unknown)[0], _KNOWLEDGE_FIELDS, 'field')}")
    if loss not in ("nll", "cox"):
        raise ValueError(f"loss must be 'nll' or 'cox', got {loss!r}")

    check_registry_name(name, "method", "register_method")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        existing = _REGISTRY.get(key)
        if existing is not None and existing.builder is not builder and existing.module != builder.__module__:
            raise ValueError(f"method {name!r} is already registered by {existing.module}")
        _REGISTRY[key] = MethodSpec(
            name=key, builder=builder, needs=needs, source=source, module=builder.__module__, loss=loss, in_all=in_all,
            search_space=search_space, **knowledge,
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


class PluginError(ImportError):
    """A ``--plugin`` that could not be loaded; the message is one line naming the plugin and the problem."""


_loaded_plugin_files: dict[str, str] = {}


def load_plugin(plugin: str) -> None:
    """Import one plugin: an importable module name (``my_methods``, ``pkg.methods``) or a ``.py`` file path.

    A file is imported under a module name derived from its path (``mil_benchmark_plugin_<stem>``) and only
    once per process, so it can be given again (worker processes load the same list).

    Raises
    ------
    PluginError
        The module is not found, the file does not exist, or importing it raised; one line naming the plugin.
    """
    text = str(plugin).strip()
    is_file = text.endswith(".py") or "/" in text or os.sep in text
    try:
        if is_file:
            _import_file(Path(text))
        else:
            importlib.import_module(text)
    except PluginError:
        raise
    except ModuleNotFoundError as exc:
        raise PluginError(f"--plugin {text}: cannot import it ({exc}); give an importable module name (on "
                          "PYTHONPATH) or the path of a .py file") from None
    except Exception as exc:  # the plugin's own code failed: report it, not a traceback of the harness
        where = _plugin_location(exc)
        raise PluginError(f"--plugin {text}: importing it raised {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}{where}") from exc


def _import_file(path: Path) -> None:
    if not path.is_file():
        raise PluginError(f"--plugin {path}: {'is not a file' if path.exists() else 'does not exist'}")
    key = str(path.resolve())
    if key in _loaded_plugin_files:
        return
    name = "mil_benchmark_plugin_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"--plugin {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _loaded_plugin_files[key] = name


def _plugin_location(exc: BaseException) -> str:
    """`` (file:line)`` of the innermost frame of a plugin's exception, when known."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}:{exc.lineno})"
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""


def load_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import external modules or ``.py`` files that register methods (the global ``--plugin`` option)."""
    for mod in modules:
        load_plugin(mod)


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


def _parameters(callable_: Any) -> tuple[set[str], bool]:
    """Keyword names of ``callable_`` and whether it also takes ``**kwargs``."""
    signature = inspect.signature(callable_)
    names = {p.name for p in signature.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", "in_dim", "n_bins"}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    return names, takes_any


def _class_options(cls: type) -> set[str] | None:
    """Keyword names of a class's ``__init__``; its ``**options`` are the fields of ``cls.options_type`` (a
    dataclass) when it declares one, else unknown (None)."""
    names, takes_any = _parameters(cls.__init__)
    if not takes_any:
        return names
    options_type = getattr(cls, "options_type", None)
    if options_type is None or not dataclasses.is_dataclass(options_type):
        return None
    return names | {f.name for f in dataclasses.fields(options_type)}


def constructor_options(builder: Any) -> set[str] | None:
    """Option names the method's builder accepts, or None when they cannot be known.

    A factory that forwards ``**options`` to a class (``def crossfusion(in_dim, n_bins, **options) ->
    CrossFusion``) is followed to that class through its return annotation; a class that takes ``**options``
    names them with an ``options_type`` dataclass.
    """
    if inspect.isclass(builder):
        return _class_options(builder)
    names, takes_any = _parameters(builder)
    if not takes_any:
        return names
    try:
        returned = typing.get_type_hints(builder).get("return")
    except Exception:  # noqa: BLE001 (an unresolvable annotation: the options cannot be known)
        return None
    if not inspect.isclass(returned):
        return None
    forwarded = _class_options(returned)
    return None if forwarded is None else names | forwarded


def check_method_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options the method's constructor does not take (before any cell runs, not as a failed cell).

    A builder whose options cannot be known (``**kwargs`` without a class to follow) takes anything; its own
    code judges the values.
    """
    known = constructor_options(get_method_spec(name).builder)
    if known is None:
        return
    unknown = sorted(set(options) - known)
    if unknown:
        hint = suggestion(unknown[0], known)
        raise ValueError(f"--method-option {name}.{unknown[0]}: method {name!r} takes no option {unknown[0]!r}"
                         f"{hint}; its options: {', '.join(sorted(known)) or 'none'}")


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
