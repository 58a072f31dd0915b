"""The unit every method consumes: one bag of patch features (one patient, or one slide).

Data flows one way: cohort -> clinical table + splits + features -> :class:`Bag` -> method ->
:class:`benchmark.api.output.SurvivalOutput` -> metrics -> result store -> tables and plots.

A method declares what it reads with :class:`Needs`; the loader fills only those fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

#: Magnifications the harness knows, coarse to fine.
MAGNIFICATIONS: tuple[int, ...] = (5, 10, 20)


@dataclass(frozen=True)
class Needs:
    """What a method reads from a bag. Only these fields are loaded from disk.

    Attributes
    ----------
    magnifications : tuple of int
        Magnifications whose features the method reads, e.g. ``(20,)`` or ``(5, 10, 20)``.
    coords : bool
        Whether the method reads patch coordinates (level-0 top-left pixels).
    graph : tuple of str
        Neighbour graphs the method reads, among ``"spatial"`` (k-NN on coordinates) and
        ``"latent"`` (k-NN in feature space). Built at :attr:`graph_magnification`.
    graph_magnification : int
        Magnification the graphs (and tissue types) are built at.
    graph_k : int
        Number of neighbours per node.
    tissue_types : bool
        Whether the method reads a per-patch tissue-type label at ``graph_magnification``.
    """

    magnifications: tuple[int, ...] = (20,)
    coords: bool = False
    graph: tuple[str, ...] = ()
    graph_magnification: int = 20
    graph_k: int = 8
    tissue_types: bool = False

    def __post_init__(self) -> None:
        bad = [m for m in self.magnifications if m not in MAGNIFICATIONS]
        if bad or not self.magnifications:
            raise ValueError(f"magnifications must be a non-empty subset of {MAGNIFICATIONS}, got {self.magnifications}")
        bad_graph = [g for g in self.graph if g not in ("spatial", "latent")]
        if bad_graph:
            raise ValueError(f"unknown graph kind(s) {bad_graph}; expected 'spatial' or 'latent'")

    def describe(self) -> str:
        """Short human-readable summary, e.g. ``"5x+10x+20x, coords, graph:spatial"``."""
        parts = ["+".join(f"{m}x" for m in self.magnifications)]
        if self.coords:
            parts.append("coords")
        if self.graph:
            parts.append("graph:" + ",".join(self.graph))
        if self.tissue_types:
            parts.append("tissue types")
        return ", ".join(parts)


@dataclass
class Bag:
    """Features of one sample (a patient's slides concatenated, or one slide).

    Shapes (``N_m`` = number of patches at magnification ``m``, ``D`` = backbone dim):

    - ``features[m]``: ``(N_m, D)`` float32
    - ``coords[m]``: ``(N_m, 2)`` int64 level-0 top-left pixel coordinates (when requested)
    - ``slide_index[m]``: ``(N_m,)`` int64, position of each patch's slide in :attr:`slide_ids`
    - ``edge_index[kind]``: ``(2, E)`` int64, PyG ``source_to_target`` convention
      (row 0 = neighbour/source, row 1 = centre/target), no self loops, never between slides,
      indices into the rows of ``features[graph_magnification]``
    - ``tissue_type``: ``(N_g,)`` int64 in ``0..4`` (tumour, stroma, lymphocytes, necrosis, other)
      at the graph magnification, or None when unavailable
    - ``tissue_source``: where ``tissue_type`` comes from: ``"file"`` (a per-patch tissue-type file, as a real
      user can have) or ``"synthetic-truth"`` (the synthetic generator's true types: privileged information)
    """

    sample_id: str
    slide_ids: tuple[str, ...]
    features: dict[int, Tensor]
    coords: dict[int, Tensor] = field(default_factory=dict)
    slide_index: dict[int, Tensor] = field(default_factory=dict)
    edge_index: dict[str, Tensor] = field(default_factory=dict)
    tissue_type: Tensor | None = None
    tissue_source: str | None = None

    @property
    def in_dim(self) -> int:
        return next(iter(self.features.values())).shape[1]

    def num_patches(self, magnification: int = 20) -> int:
        return int(self.features[magnification].shape[0])

    def to(self, device: torch.device | str) -> "Bag":
        """A copy with every tensor on ``device``."""
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return replace(
            self,
            features=mv(self.features),
            coords=mv(self.coords),
            slide_index=mv(self.slide_index),
            edge_index=mv(self.edge_index),
            tissue_type=None if self.tissue_type is None else self.tissue_type.to(device),
        )
