"""One neighbour-graph builder for every graph method.

pyg-lib (which PyG's ``knn_graph`` needs) is not installable here, so k-NN graphs are built without it:
``scipy.spatial.cKDTree`` in low dimension (patch coordinates) and an exact chunked brute-force search in
feature space (a KD-tree degenerates in 1024-D: 27 s for 4,000 points, against about 0.1 s brute force).
Conventions:

- PyG ``source_to_target`` flow: ``edge_index[0]`` = neighbour (source), ``edge_index[1]`` = centre (target),
  so node i aggregates messages from its k nearest neighbours. (The Patch-GCN notebook stored the reverse,
  ``[centre; neighbour]``, so there node i aggregated from the nodes that have i among *their* k nearest;
  on a regular patch grid the two coincide away from the tissue border.)
- No self loops; never an edge between two slides of one patient (graphs are built per slide, then offset).
- ``spatial`` = k-NN on patch coordinates; ``latent`` = k-NN in feature space, queried with the features
  themselves (the Patch-GCN notebook queried the feature index with coordinates, which is a bug).

``python -m benchmark.data.graphs`` prints the build time at a real slide scale (a benchmark, not a test).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from benchmark.data.bag import Bag

#: Points with at most this many dimensions go to the KD-tree; more go to the brute-force search.
KDTREE_MAX_DIM = 8
#: Upper bound on the entries of one distance block of the brute-force search (128 MiB of float32).
_BLOCK_ENTRIES = 1 << 25


def _check_points(points: np.ndarray, what: str = "points") -> np.ndarray:
    points = np.asarray(points)
    if points.ndim != 2:
        raise ValueError(f"{what} must have shape (N, P), got {points.shape}")
    if points.shape[0] and not np.isfinite(points).all():
        bad = int((~np.isfinite(points)).any(axis=1).sum())
        raise ValueError(f"{what} contain NaN or inf in {bad} of {points.shape[0]} rows; cannot build a k-NN graph")
    return points


def _knn_kdtree(points: np.ndarray, kk: int) -> np.ndarray:
    """(N, kk) indices of the kk nearest other points, with a KD-tree (exact, low dimension)."""
    from scipy.spatial import cKDTree

    n = points.shape[0]
    _, idx = cKDTree(points.astype(np.float64)).query(points.astype(np.float64), k=kk + 1)
    idx = np.asarray(idx).reshape(n, kk + 1)
    # Drop each node itself. With duplicate points the self index need not be in column 0, or may be
    # missing (then the last, farthest candidate is dropped instead).
    is_self = idx == np.arange(n)[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    return idx[~is_self].reshape(n, kk)


def _knn_brute(points: np.ndarray, kk: int) -> np.ndarray:
    """(N, kk) indices of the kk nearest other points, exact squared-L2 search in row blocks (any dimension)."""
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    x = x - x.mean(dim=0, keepdim=True)  # centring shrinks the cancellation in |a|^2 - 2ab + |b|^2
    n = x.shape[0]
    sq = (x * x).sum(dim=1)
    rows = max(1, _BLOCK_ENTRIES // n)
    out = np.empty((n, kk), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            d = sq[start:stop, None] - 2.0 * (x[start:stop] @ x.T) + sq[None, :]
            # Exclude self explicitly (never rely on it being the smallest: duplicates tie with it).
            d[torch.arange(stop - start), torch.arange(start, stop)] = float("inf")
            out[start:stop] = d.topk(kk, dim=1, largest=False, sorted=True).indices.numpy()
    return out


def knn_edges(points: np.ndarray, k: int, method: str = "auto") -> np.ndarray:
    """Directed k-NN edges of one slide.

    Parameters
    ----------
    points : ndarray, shape (N, P)
        Coordinates (P = 2) or features (P = D) of one slide's patches.
    k : int
        Neighbours per node; fewer when the slide has ``N <= k`` patches.
    method : {"auto", "kdtree", "brute"}
        ``"auto"``: KD-tree when ``P <= KDTREE_MAX_DIM``, else exact brute force. Both are exact; they can
        differ only in how they break ties between equidistant neighbours.

    Returns
    -------
    ndarray, shape (2, N * min(k, N - 1)), int64
        Row 0 = neighbour (source), row 1 = centre (target), grouped by centre. Empty ``(2, 0)`` when N < 2.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if method not in ("auto", "kdtree", "brute"):
        raise ValueError(f"method must be 'auto', 'kdtree' or 'brute', got {method!r}")
    points = _check_points(points)
    n = points.shape[0]
    kk = min(k, n - 1)
    if kk <= 0:
        return np.zeros((2, 0), dtype=np.int64)
    if method == "auto":
        method = "kdtree" if points.shape[1] <= KDTREE_MAX_DIM else "brute"
    neighbours = _knn_kdtree(points, kk) if method == "kdtree" else _knn_brute(points, kk)
    centres = np.repeat(np.arange(n, dtype=np.int64), kk)
    return np.stack([neighbours.reshape(-1).astype(np.int64), centres])


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
    pts = _check_points(pts)
    if sid.shape != (pts.shape[0],):
        raise ValueError(f"slide_index must have shape ({pts.shape[0]},) to match the points, got {sid.shape}")
    parts = []
    for s in np.unique(sid):
        rows = np.flatnonzero(sid == s)
        e = knn_edges(pts[rows], k)
        parts.append(rows[e])
    edges = np.concatenate(parts, axis=1) if parts else np.zeros((2, 0), dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(edges, dtype=np.int64))


def bag_graph(bag: Bag, kind: str, k: int = 8, magnification: int = 20) -> Tensor:
    """The ``kind`` graph of a bag: the loader's cached one, else built here from the bag's own data.

    Parameters
    ----------
    bag : benchmark.data.bag.Bag
    kind : {"spatial", "latent"}
    k : neighbours per node (used only when the graph is built here)
    magnification : rows of ``bag.features[magnification]`` the graph indexes

    Returns
    -------
    Tensor, shape (2, E), int64, on the device of the bag's features.
    """
    feats = bag.features[magnification]
    n = feats.shape[0]
    edge_index = bag.edge_index.get(kind)
    if edge_index is None:
        if kind == "spatial":
            if magnification not in bag.coords:
                raise ValueError(
                    f"bag {bag.sample_id!r} has neither a 'spatial' graph nor {magnification}x coordinates to build one"
                )
            points = bag.coords[magnification]
        elif kind == "latent":
            points = feats
        else:
            raise ValueError(f"unknown graph kind {kind!r}; expected 'spatial' or 'latent'")
        slides = bag.slide_index.get(magnification)
        if slides is None:
            slides = torch.zeros(n, dtype=torch.long)
        edge_index = build_graph(points, slides, k=k).to(feats.device)
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"bag {bag.sample_id!r}: edge_index[{kind!r}] must have shape (2, E), got {tuple(edge_index.shape)}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
        raise ValueError(
            f"bag {bag.sample_id!r}: edge_index[{kind!r}] indexes outside the {n} rows of its {magnification}x features"
        )
    return edge_index.long()


def _benchmark(n_nodes: int = 13_496, feat_dim: int = 1024, k: int = 8) -> None:
    """Print build times of both graph kinds on a synthetic slide of ``n_nodes`` patches (square-ish grid)."""
    import time

    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n_nodes * 1.3)))
    cells = rng.choice(side * side, size=n_nodes, replace=False)
    coords = np.stack([cells % side, cells // side], axis=1).astype(np.int64) * 256
    feats = rng.standard_normal((n_nodes, feat_dim)).astype(np.float32)
    slides = np.zeros(n_nodes, dtype=np.int64)
    build_graph(coords[:100], slides[:100], k)  # warm up imports
    for kind, pts in (("spatial", coords), ("latent", feats)):
        t0 = time.perf_counter()
        e = build_graph(pts, slides, k)
        print(f"{kind:8s} k={k}: N={n_nodes:,} P={pts.shape[1]:>4d} -> E={e.shape[1]:,} in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Time k-NN graph construction at a real slide scale.")
    parser.add_argument("--nodes", type=int, default=13_496)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("-k", type=int, default=8)
    a = parser.parse_args()
    _benchmark(a.nodes, a.dim, a.k)
