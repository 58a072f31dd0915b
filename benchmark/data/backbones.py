"""Backbone (patch-encoder) registry, read from ``datasets/*.toml`` (tables ``[backbones.<name>]``).

A backbone has a true feature dim and optional named variants with their own dims, addressed as
``<name>-<variant>`` or ``<name>:<variant>`` (e.g. ``resnet50-full``, 2048-d). Feature folders on disk use the
canonical name (``resnet50``, ``resnet50-full``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from benchmark.data.cohorts import load_definitions
from benchmark.naming import check_registry_name, did_you_mean


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
