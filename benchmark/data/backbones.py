"""Backbone (patch-encoder) registry: the backbone half of :mod:`benchmark.data.cohorts`, re-exported under
this name (one module reads every registry file; see there).

A backbone has a true feature dim and optional named variants with their own dims, addressed as
``<name>-<variant>`` or ``<name>:<variant>`` (e.g. ``resnet50-full``, 2048-d). Feature folders on disk use the
canonical name (``resnet50``, ``resnet50-full``).
"""
from benchmark.data.cohorts import (  # noqa: F401 (re-exported)
    Backbone, backbone_names, check_dim, get_backbone, resolve_backbones,
)

__all__ = ["Backbone", "backbone_names", "check_dim", "get_backbone", "resolve_backbones"]
