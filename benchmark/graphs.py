"""One neighbour-graph builder for every graph method.

pyg-lib (which PyG's ``knn_graph`` needs) is not installable here, so k-NN graphs are built with
``scipy.spatial.cKDTree``. Conventions:

- PyG ``source_to_target`` flow: ``edge_index[0]`` = neighbour (source), ``edge_index[1]`` = centre (target),
  so node i aggregates messages from its k nearest neighbours.
- No self loops; never an edge between two slides of one patient (graphs are built per slide, then offset).
- ``spatial`` = k-NN on patch coordinates; ``latent`` = k-NN in feature space, queried with the features
  themselves (the Patch-GCN notebook queried the feature index with coordinates, which is a bug).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor


def knn_edges(points: np.ndarray, k: int) -> np.ndarray:
    """Directed k-NN edges of one slide.

    Parameters
    ----------
    points : ndarray, shape (N, P)
        Coordinates (P = 2) or features (P = D) of one slide's patches.
    k : int
        Neighbours per node; fewer when the slide has ``N <= k`` patches.

    Returns
    -------
    ndarray, shape (2, N * min(k, N - 1)), int64
        Row 0 = neighbour (source), row 1 = centre (target). Empty ``(2, 0)`` when N < 2.
    """
    points = np.asarray(points, dtype=np.float64 if points.shape[1] <= 3 else np.float32)
    n = points.shape[0]
    kk = min(k, n - 1)
    if kk <= 0:
        return np.zeros((2, 0), dtype=np.int64)
    _, idx = cKDTree(points).query(points, k=kk + 1)
    idx = np.asarray(idx).reshape(n, kk + 1)
    centres = np.arange(n)[:, None]
    # Drop each node itself. With duplicate points the self index need not be in column 0, or may be
    # missing (then the last, farthest candidate is dropped instead).
    is_self = idx == centres
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    neighbours = idx[~is_self].reshape(n, kk).astype(np.int64)
    return np.stack([neighbours.reshape(-1), np.repeat(centres[:, 0], kk)]).astype(np.int64)


def build_graph(points: Tensor | np.ndarray, slide_index: Tensor | np.ndarray, k: int = 8) -> Tensor:
    """k-NN graph of a multi-slide bag, built per slide (no edges across slides).

    Parameters
    ----------
    points : (N, P) coordinates or features, rows in bag order
    slide_index : (N,) int, slide of each row
    k : neighbours per node

    Returns
    -------
    Tensor, shape (2, E), int64, indices into the bag's rows.
    """
    pts = points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    sid = slide_index.detach().cpu().numpy() if isinstance(slide_index, Tensor) else np.asarray(slide_index)
    parts = []
    for s in np.unique(sid):
        rows = np.flatnonzero(sid == s)
        e = knn_edges(pts[rows], k)
        parts.append(rows[e])
    edges = np.concatenate(parts, axis=1) if parts else np.zeros((2, 0), dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(edges, dtype=np.int64))
