"""Bag input checks shared by several methods.

A private module (leading underscore): it registers no method.
"""
from __future__ import annotations

from torch import Tensor

from benchmark.api import Bag, Needs
from benchmark.data.graphs import bag_graph


def checked_features(bag: Bag, magnification: int, in_dim: int, owner: str, needs_hint: str | None = None) -> Tensor:
    """``bag.features[magnification]``, refused unless it is ``(N >= 1, in_dim)``.

    Errors start with ``owner`` (the method's file). With ``needs_hint``, the missing-magnification error also
    lists the magnifications the bag has, then the hint.
    """
    if magnification not in bag.features:
        detail = "" if needs_hint is None else f" (has {sorted(bag.features)}); {needs_hint}"
        raise ValueError(f"{owner}: bag {bag.sample_id!r} has no {magnification}x features{detail}")
    feats = bag.features[magnification]
    if feats.dim() != 2 or feats.shape[0] == 0 or feats.shape[1] != in_dim:
        raise ValueError(f"{owner}: bag {bag.sample_id!r} has {magnification}x features of shape "
                         f"{tuple(feats.shape)}; expected (N >= 1, {in_dim})")
    return feats


def graph_inputs(needs: Needs, bag: Bag, edge_kind: str) -> tuple[Tensor, Tensor, int]:
    """Node features, their ``edge_kind`` edges and the magnification, as the method's ``needs`` say.

    The edges are the bag's own, or built when missing (:func:`benchmark.data.graphs.bag_graph`). An empty bag is
    refused.
    """
    magnification = needs.graph_magnification
    x = bag.features[magnification]
    if x.shape[0] == 0:
        raise ValueError(f"bag {bag.sample_id!r} has no patches at {magnification}x")
    return x, bag_graph(bag, edge_kind, k=needs.graph_k, magnification=magnification), magnification
