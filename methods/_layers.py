"""Blocks shared by several methods: gated attention pooling, bag input checks, graph inputs and k-means.

A private module (leading underscore): it registers no method.

- :class:`GatedAttention`, :func:`attention_pool`: AMIL, Patch-GCN, DeepGraphSurv and SCMIL (the Mahmood
  ``Attn_Net_Gated``; Ilse et al. 2018).
- :func:`checked_features`, :func:`graph_inputs`: what a bag must hold before a method reads it.
- :func:`kmeans`: a seeded, memory-linear k-means in torch (SCMIL's spatial clusters, ProtoSurv's pseudo
  tissue types).
"""
from __future__ import annotations


import torch
from torch import Tensor, nn

from benchmark.api import Bag, Needs
from benchmark.data.graphs import bag_graph


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al. 2018), the official ``Attn_Net_Gated`` with one output.

    ``a = Dropout(tanh(V h))``, ``b = Dropout(sigmoid(U h))``, score ``= w^T (a * b)``.

    Parameters
    ----------
    dim : int
        Input width ``L``.
    hidden : int
        Attention width ``D``.
    dropout : float
        Dropout on both branches (training only); 0 disables it.

    Shapes: ``(N, L) -> (N,)`` unnormalised scores.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.25):
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.sigmoid_branch = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.score(self.tanh_branch(h) * self.sigmoid_branch(h)).squeeze(-1)


def attention_pool(scores: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over all N nodes of the bag (every slide of the patient together), then the weighted sum.

    ``scores`` (N,), ``h`` (N, L) -> pooled ``(1, L)`` and attention weights ``(N,)``.
    """
    weights = torch.softmax(scores, dim=0)
    return weights.unsqueeze(0) @ h, weights


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


#: Rows of the point matrix handled at once when computing point-to-centroid distances, scaled so that one
#: chunk's distance block holds about this many entries (bounds k-means memory to O(N + chunk)).
_KMEANS_BLOCK_ENTRIES = 1 << 22


def _nearest(points: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every point, computed in row chunks (never an N x K matrix at once).

    Parameters
    ----------
    points : Tensor, shape (N, D)
    centroids : Tensor, shape (K, D)

    Returns
    -------
    min_sq_dist : Tensor, shape (N,)
        Squared Euclidean distance to the nearest centroid.
    labels : Tensor, shape (N,), int64
        Index of the nearest centroid.
    """
    n, k = points.shape[0], centroids.shape[0]
    chunk = max(1, _KMEANS_BLOCK_ENTRIES // max(k, 1))
    centroid_sq = centroids.pow(2).sum(dim=1)
    min_sq_dist = torch.empty(n, dtype=points.dtype, device=points.device)
    labels = torch.empty(n, dtype=torch.long, device=points.device)
    for start in range(0, n, chunk):
        block = points[start : start + chunk]
        dist = torch.addmm(centroid_sq.unsqueeze(0), block, centroids.T, alpha=-2.0)
        best, idx = dist.min(dim=1)
        min_sq_dist[start : start + chunk] = (best + block.pow(2).sum(dim=1)).clamp(min=0.0)
        labels[start : start + chunk] = idx
    return min_sq_dist, labels


def _weighted_kmeans_plus_plus(points: Tensor, weights: Tensor, n_clusters: int, generator: torch.Generator) -> Tensor:
    """k-means++ D^2 seeding of weighted points (one candidate per step): (K, D) centroids, K <= len(points)."""
    n = points.shape[0]
    sq_norm = points.pow(2).sum(dim=1)

    def sq_dist_to(i: int) -> Tensor:
        return torch.addmv(sq_norm + sq_norm[i], points, points[i], alpha=-2.0).clamp(min=0.0)

    first = int(torch.multinomial(weights, 1, generator=generator).item())
    chosen = [first]
    min_dist = sq_dist_to(first)
    for _ in range(1, n_clusters):
        mass = weights * min_dist
        if float(mass.sum()) <= 0.0:  # every remaining point coincides with a chosen one
            mass = torch.ones(n, device=points.device)
            mass[chosen] = 0.0
        nxt = int(torch.multinomial(mass, 1, generator=generator).item())
        chosen.append(nxt)
        torch.minimum(min_dist, sq_dist_to(nxt), out=min_dist)
    return points[chosen]


def _kmeans_parallel_init(
    points: Tensor, n_clusters: int, generator: torch.Generator, oversampling: float = 2.0, rounds: int = 5
) -> Tensor:
    """Scalable k-means++ ("k-means||", Bahmani et al. 2012), the seeding cuML runs for ``init='k-means++'``.

    Each round samples every point independently with probability ``min(1, l * d^2 / phi)``, ``l = oversampling * K``;
    the candidates, weighted by the points closest to them, are reduced to K centroids by weighted k-means++.
    Costs ``rounds`` chunked distance passes instead of K sequential passes over all N points.
    """
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device=points.device).item())
    candidates = points[first : first + 1]
    min_dist, _ = _nearest(points, candidates)
    for _ in range(rounds):
        phi = float(min_dist.sum())
        if phi <= 0.0:
            break
        prob = (oversampling * n_clusters * min_dist / phi).clamp(max=1.0)
        picked = (torch.rand(n, generator=generator, device=points.device) < prob).nonzero(as_tuple=True)[0]
        if picked.numel() == 0:
            continue
        candidates = torch.cat([candidates, points[picked]])
        new_dist, _ = _nearest(points, points[picked])
        min_dist = torch.minimum(min_dist, new_dist)
    if candidates.shape[0] < n_clusters:
        # Too few distinct candidates (tiny or duplicated data): top up with random points.
        extra = torch.randperm(n, generator=generator, device=points.device)[: n_clusters - candidates.shape[0]]
        return torch.cat([candidates, points[extra]])
    _, owner = _nearest(points, candidates)
    weights = torch.bincount(owner, minlength=candidates.shape[0]).float()
    return _weighted_kmeans_plus_plus(candidates, weights.clamp(min=1e-12), n_clusters, generator)


@torch.no_grad()
def kmeans(points: Tensor, n_clusters: int, n_iter: int = 5, seed: int = 1) -> Tensor:
    """Seeded k-means (scalable k-means++ seeding, then at most ``n_iter`` Lloyd iterations), linear in memory.

    Parameters
    ----------
    points : Tensor, shape (N, D)
        Points to cluster (any float dtype; computed in float32).
    n_clusters : int
        Number of clusters K (clipped to ``[1, N]``).
    n_iter : int
        Maximum number of Lloyd iterations (the official SCMIL code uses cuML with ``max_iter=5``);
        stops early when no label changes.
    seed : int
        Seed of a private generator, so the result does not depend on (or disturb) the global RNG.

    Returns
    -------
    Tensor, shape (N,), int64
        Cluster label of every point, in ``0..K-1``. Empty clusters keep their previous centroid.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"kmeans expects a non-empty (N, D) matrix, got shape {tuple(points.shape)}")
    points = points.float()
    n = points.shape[0]
    k = max(1, min(int(n_clusters), n))
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=points.device)
    generator = torch.Generator(device=points.device)
    generator.manual_seed(seed)
    centroids = _kmeans_parallel_init(points, k, generator)
    _, labels = _nearest(points, centroids)
    for _ in range(n_iter):
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        _, new_labels = _nearest(points, centroids)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels
