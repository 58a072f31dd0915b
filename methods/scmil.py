"""SCMIL: soft-filtered, spatially clustered local self-attention MIL for survival.

Paper: Yang, Z. et al. "SCMIL: Sparse Context-aware Multiple Instance Learning for Predicting Cancer
Survival Probability Distribution in Whole Slide Images", MICCAI 2024 (arXiv 2407.00664).
Official repository: github.com/yang-ze-kang/SCMIL (``models/SCMIL.py``, ``models/SoftFilter.py``,
``models/AMIL.py``; configuration ``configs/luad_scmil.yaml``).

Deviation: the gated attention pooling is the shared :class:`methods._layers.GatedAttention` (same layers and
initialisation order as the official ``Attn_Net_Gated``; weights saved under the official names load too).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from benchmark.api import AttentionMap, Bag, Needs, register_method, SurvivalOutput
from methods._layers import GatedAttention, kmeans


def _global_zscore(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``(x - mean) / std`` with one scalar mean and std over the whole matrix, as in the official code."""
    return (x - x.mean()) / x.std().clamp(min=eps) if x.numel() > 1 else x - x.mean()


def window_sizes(counts: Tensor, cluster_size: int) -> Tensor:
    """Split clusters into attention windows as the official code does.

    A cluster of ``n >= 2 * cluster_size`` tokens becomes ``n // cluster_size`` consecutive windows of near-equal
    size (the first ``n % splits`` windows get one more token); smaller non-empty clusters stay whole.

    Parameters
    ----------
    counts : Tensor, shape (K,), int64
        Tokens per cluster, in label order.
    cluster_size : int

    Returns
    -------
    Tensor, shape (W,), int64
        Window sizes in the order of the label-sorted tokens (every size is ``< 2 * cluster_size``).
    """
    splits = torch.where(counts >= 2 * cluster_size, counts // cluster_size, (counts > 0).long())
    cluster_of_window = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), splits)
    first_window = torch.cumsum(splits, 0) - splits
    position = torch.arange(cluster_of_window.numel(), device=counts.device) - first_window[cluster_of_window]
    n = counts[cluster_of_window]
    s = splits[cluster_of_window]
    return n // s + (position < n % s).long()


class SoftFilter(nn.Module):
    """Instance scorer that re-weights each patch: ``x <- sigmoid(MLP(x)) * x``.

    Shapes: ``x`` (N, D) -> filtered (N, D), scores (N,) in (0, 1).
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.score(x)
        return x * scores, scores.squeeze(1)


class ClusterLocalAttention(nn.Module):
    """Multi-head self-attention restricted to k-means windows, plus a residual (no LayerNorm, no FFN).

    Parameters
    ----------
    dim : int
        Token dimension (divisible by ``n_heads``).
    n_heads : int
    cluster_size : int
        Target tokens per cluster: ``K = max(1, L // cluster_size)`` clusters per slide.
    feature_weight : float
        Weight of the z-scored features against ``1 - feature_weight`` for the z-scored coordinates.
    dropout : float
        Attention-probability dropout and output dropout (training only).
    kmeans_iter, kmeans_seed : int
        Lloyd iterations and seed of the k-means.
    """

    #: Tokens per attention batch: bounds the (windows, heads, s, s) score tensor to ~this * 2 * cluster_size * heads.
    max_tokens_per_batch = 8192

    def __init__(
        self,
        dim: int,
        n_heads: int = 8,
        cluster_size: int = 64,
        feature_weight: float = 0.8,
        dropout: float = 0.25,
        kmeans_iter: int = 5,
        kmeans_seed: int = 1,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"methods/scmil.py: feature dim {dim} is not divisible by {n_heads} attention heads")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.cluster_size = cluster_size
        self.feature_weight = feature_weight
        self.kmeans_iter = kmeans_iter
        self.kmeans_seed = kmeans_seed
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    @torch.no_grad()
    def cluster(self, x: Tensor, coords: Tensor, slide_index: Tensor | None = None) -> Tensor:
        """Cluster labels (L,) of the tokens, k-means per slide on ``[w * z(x), (1 - w) * z(coords)]``.

        Labels of different slides never coincide, so a window never spans two slides.
        """
        labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        slides = [None] if slide_index is None else torch.unique(slide_index).tolist()
        offset = 0
        for s in slides:
            rows = slice(None) if s is None else (slide_index == s).nonzero(as_tuple=True)[0]
            feats, xy = x[rows].float(), coords[rows].float()
            n_clusters = max(1, feats.shape[0] // self.cluster_size)
            points = torch.cat(
                [self.feature_weight * _global_zscore(feats), (1 - self.feature_weight) * _global_zscore(xy)], dim=1
            )
            labels[rows] = kmeans(points, n_clusters, n_iter=self.kmeans_iter, seed=self.kmeans_seed) + offset
            offset += n_clusters
        return labels

    def forward(self, x: Tensor, coords: Tensor, slide_index: Tensor | None = None) -> Tensor:
        """Shapes: ``x`` (L, D), ``coords`` (L, 2), ``slide_index`` (L,) or None -> (L, D), rows in input order."""
        labels = self.cluster(x, coords, slide_index)
        order = torch.argsort(labels, stable=True)
        sizes = window_sizes(torch.bincount(labels), self.cluster_size)
        starts = torch.cumsum(sizes, 0) - sizes

        n_tokens, dim = x.shape
        qkv = self.to_qkv(x).view(n_tokens, 3, self.n_heads, self.head_dim)
        outputs, rows = [], []
        # Windows of equal size are batched together; every token belongs to exactly one window.
        for size in torch.unique(sizes).tolist():
            window_starts = starts[sizes == size]
            per_batch = max(1, self.max_tokens_per_batch // size)
            for b in range(0, window_starts.numel(), per_batch):
                positions = window_starts[b : b + per_batch, None] + torch.arange(size, device=x.device)
                idx = order[positions]  # (W, size) token rows
                qw, kw, vw = qkv[idx].permute(2, 0, 3, 1, 4)  # each (W, heads, size, head_dim)
                scores = qw @ kw.transpose(-1, -2) / math.sqrt(self.head_dim)
                probs = self.attn_dropout(scores.softmax(dim=-1))
                outputs.append((probs @ vw).transpose(1, 2).reshape(-1, dim))
                rows.append(idx.reshape(-1))
        attended = torch.cat(outputs)[torch.argsort(torch.cat(rows))]
        return self.to_out(attended) + x


#: The official ``Attn_Net_Gated`` parameter names -> :class:`methods._layers.GatedAttention`'s.
_OFFICIAL_POOL_NAMES = {"attention_a.": "tanh_branch.", "attention_b.": "sigmoid_branch.", "attention_c.": "score."}


def _official_pool_names(module, state_dict, prefix, *args) -> None:
    """Load weights saved under the official pooling names (``pool.attention_a.0.weight``, ...)."""
    for key in [k for k in state_dict if k.startswith(prefix + "pool.attention_")]:
        rest = key[len(prefix + "pool."):]
        for old, new in _OFFICIAL_POOL_NAMES.items():
            if rest.startswith(old):
                state_dict[prefix + "pool." + new + rest[len(old):]] = state_dict.pop(key)


#: Tuned besides the shared space: the cluster size (the cluster count is ``kept patches // cluster_size``; 64
#: in ``luad_scmil.yaml``) and the feature weight of the k-means distance (0.8; 1 = features only).
SEARCH_SPACE = {"cluster_size": {"choices": [32, 64, 128]}, "feature_weight": {"low": 0.5, "high": 1.0}}


@register_method(
    "scmil",
    cost_prior=0.022, paper_row=6,
    needs=Needs(magnifications=(20,), coords=True),
    search_space=SEARCH_SPACE,
    source="Yang et al. MICCAI 2024 (arXiv 2407.00664); github.com/yang-ze-kang/SCMIL models/SCMIL.py",
)
class SCMIL(nn.Module):
    """SCMIL with the SoftFilter and one clustered local self-attention layer (the ``luad_scmil.yaml`` setup).

    Forward pass on a bag with ``N`` patches at 20x, ``D = in_dim``:

    1. SoftFilter: ``s = sigmoid(Linear(256->1)(GELU(Linear(D->256)(x))))``, ``x <- s * x`` (N, D).
    2. Patches with ``s > 0.5`` ("kept", L of them) go through :class:`ClusterLocalAttention` when ``L > 1``:
       k-means (``K = max(1, L // 64)`` per slide) on ``[0.8 z(features), 0.2 z(coords)]``, windows of the
       label-sorted tokens (clusters of >= 128 tokens split into ``size // 64`` windows), 8-head attention
       within each window, ``to_out`` + residual. Other patches ("bypass") keep their filtered features.
    3. Gated attention pooling (hidden 256, dropout 0.25) over all N rows -> (D,).
    4. ``Linear(D -> n_bins)`` logits for the shared discrete-time NLL.

    Parameters
    ----------
    in_dim : int
        Patch-feature dimension (must be divisible by ``n_heads``); the hidden size equals it, as in the
        official code with the SoftFilter on.
    n_bins : int
        Output survival bins.
    cluster_size : int, default 64
    feature_weight : float, default 0.8
    n_heads : int, default 8
    dropout : float, default 0.25
        Attention-probability, attention-output and pooling dropout (training only).
    kmeans_iter : int, default 5
    kmeans_seed : int, default 1
        The official cuML call uses ``random_state=1``.

    Returns (forward)
    -----------------
    SurvivalOutput with ``logits`` (1, n_bins) and attention maps at 20x, aligned with ``bag.features[20]`` rows:
    ``"attention"`` (gated pooling weights, (N,)) and ``"soft_filter"`` (SoftFilter scores, (N,)).

    Deviations from the official code (deliberate)
    ----------------------------------------------
    - Head and loss: the paper's register-based mixture-density head (``SurvivalMDN``, K = 100 Gaussians on
      ``softplus^-1(t)``, its own likelihood) is replaced by ``Linear(D -> n_bins)`` trained with the shared
      4-bin NLL, like every other baseline. (The official ``SCMIL`` class already has such a classifier.)
    - k-means: cuML is replaced by :func:`kmeans` in torch: scalable k-means++ seeding (k-means||, oversampling 2,
      5 rounds, then weighted k-means++ on the candidates; cuML's ``init='k-means++'`` runs this algorithm too), then
      at most 5 Lloyd iterations, stopping early on unchanged labels (cuML's centroid tolerance is not reproduced),
      with a private generator seeded 1. Distances are computed in row chunks, so memory is linear in N.
    - z-scoring: as in the official code, one global mean and std over the whole feature matrix and one over the
      coordinate matrix (not per dimension); the std is clamped at 1e-6 so identical coordinates do not give NaN.
    - Patient bags with several slides are clustered per slide (coordinates of different slides are unrelated),
      so no window spans two slides; the official code is slide-level, where this is the same thing.
    - Token order: the official layer leaves the attended tokens in cluster-sorted order before pooling; here
      they are put back in bag order. Pooling is permutation invariant, so the output is unchanged, and the
      attention maps line up with the bag's rows.
    - Dead parameters of the official module are not built: ``fc1`` (skipped when the SoftFilter is on) and the
      unused ``SelfAttention`` inside ``ClusterLocalAttention`` (``D^2 + D`` and ``4 D^2 + 4 D`` parameters).
      With 4 bins: 4,990,214 parameters at 1024-d (official object 10,238,214), 10,630,406 at 1536-d,
      1,447,174 at 512-d, 889,094 at 384-d (the paper's Lunit features; official object 1,628,294).
    """

    def __init__(
        self,
        in_dim: int,
        n_bins: int = 4,
        cluster_size: int = 64,
        feature_weight: float = 0.8,
        n_heads: int = 8,
        dropout: float = 0.25,
        kmeans_iter: int = 5,
        kmeans_seed: int = 1,
    ) -> None:
        super().__init__()
        self.soft_filter = SoftFilter(in_dim, hidden=256)
        self.cluster_attention = ClusterLocalAttention(
            in_dim,
            n_heads=n_heads,
            cluster_size=cluster_size,
            feature_weight=feature_weight,
            dropout=dropout,
            kmeans_iter=kmeans_iter,
            kmeans_seed=kmeans_seed,
        )
        self.pool = GatedAttention(in_dim, hidden=256, dropout=dropout)
        self.register_load_state_dict_pre_hook(_official_pool_names)
        self.classifier = nn.Linear(in_dim, n_bins)

    def forward(self, bag: Bag) -> SurvivalOutput:
        x = bag.features[20]
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"methods/scmil.py: bag {bag.sample_id!r} has no 20x patches (features {tuple(x.shape)})")
        if 20 not in bag.coords:
            raise ValueError(f"methods/scmil.py: bag {bag.sample_id!r} has no 20x coordinates (Needs(coords=True))")
        coords = bag.coords[20]
        slide_index = bag.slide_index.get(20)

        filtered, scores = self.soft_filter(x)
        kept = (scores > 0.5).nonzero(as_tuple=True)[0]
        h = filtered
        if kept.numel() > 1:
            attended = self.cluster_attention(
                filtered[kept], coords[kept], None if slide_index is None else slide_index[kept]
            )
            h = filtered.index_copy(0, kept, attended)
        weights = self.pool(h).softmax(dim=0)
        pooled = weights @ h
        logits = self.classifier(pooled).unsqueeze(0)
        return SurvivalOutput.from_logits(
            logits,
            attention={"attention": AttentionMap(20, weights), "soft_filter": AttentionMap(20, scores)},
        )
