"""ProtoSurv: a Patch-GCN graph branch fused with per-tissue-type prototypes by cross-attention.

Paper: Wu, J. et al. "Leveraging Tumor Heterogeneity: Heterogeneous Graph Representation Learning for Cancer
Survival Prediction in Whole Slide Images", NeurIPS 2024 (openreview tsIKrvexBd).
Official repository: github.com/wjx-error/ProtoSurv (``models/model_protosurv_v1.py`` class ``LINKX_PROTO_oldv``,
``models/utils/proto_utils_v1.py``, ``models/utils/model_utils.py``, ``utils/utils_loss.py``,
``configs/protosurv.yml``).

Two registered names share one module: ``protosurv`` (the shared 4-bin NLL head) and ``protosurv_cox`` (the
official Cox head, scored by the trainer's windowed Cox partial likelihood).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import DeepGCNLayer, GENConv

from methods._layers import kmeans

from benchmark.api import AttentionMap, Bag, Needs, register_method, SurvivalOutput

#: Tissue types of the official code, in order (every class >= 4 of its classifier is mapped to "other").
TISSUE_TYPES: tuple[str, ...] = ("tumour", "stroma", "lymphocytes", "necrosis", "other")

#: Sources of the per-patch tissue types (option ``tissue_types``).
TISSUE_TYPE_SOURCES = ("file", "kmeans", "truth")
_NEEDS = Needs(magnifications=(20,), coords=True, graph=("spatial",), graph_k=4, tissue_types=True)
_SOURCE = "Wu et al. NeurIPS 2024; github.com/wjx-error/ProtoSurv models/model_protosurv_v1.py"


def pseudo_tissue_types(features: Tensor, n_types: int = 5, seed: int = 0, n_iter: int = 20) -> Tensor:
    """k-means pseudo tissue types of one bag, numbered by decreasing cluster size.

    A fallback when no per-patch tissue-type labels are available. The numbering rule (largest cluster = 0)
    makes the labels deterministic, but unlike real tissue types they carry no meaning shared across slides.

    Parameters
    ----------
    features : Tensor, shape (N, D)
    n_types : int
    seed : int
        Seed of the k-means (:func:`methods._layers.kmeans`, scalable k-means++ seeding + Lloyd).
    n_iter : int
        Maximum Lloyd iterations.

    Returns
    -------
    Tensor, shape (N,), int64 in ``0..n_types-1``.
    """
    labels = kmeans(features.detach(), n_types, n_iter=n_iter, seed=seed)
    sizes = torch.bincount(labels, minlength=n_types)
    # Stable sort on (-size) so ties keep the k-means label order.
    rank_of_cluster = torch.empty_like(sizes)
    rank_of_cluster[torch.argsort(-sizes, stable=True)] = torch.arange(n_types, device=sizes.device)
    return rank_of_cluster[labels]


class PrototypeCrossAttention(nn.Module):
    """The official ``MultiHeadCrossAttention``: prototypes (queries) attend to a set of node vectors.

    ``q <- q + LN(Dropout(out_proj(MHA(q, kv))))``, then ``q <- q + LN(Dropout(MLP(q)))``; queries and keys are
    LayerNorm'ed per head (no affine) before the dot product. No attention-probability dropout, as official.

    Shapes: ``queries`` (Q, dim), ``nodes`` (M, kv_dim) -> (Q, dim), attention (heads, Q, M).
    """

    def __init__(self, kv_dim: int, dim: int = 768, mlp_hidden: int = 512, n_heads: int = 3, dropout: float = 0.2):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"methods/protosurv.py: prototype dim {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.resid_drop = nn.Dropout(dropout)
        self.att_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.LayerNorm(mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, dim))
        self.mlp_drop = nn.Dropout(dropout)
        self.post_norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, nodes: Tensor) -> tuple[Tensor, Tensor]:
        heads, hd = self.n_heads, self.head_dim
        q = F.layer_norm(self.to_q(queries).view(-1, heads, hd), (hd,))
        k = F.layer_norm(self.to_k(nodes).view(-1, heads, hd), (hd,))
        v = self.to_v(nodes).view(-1, heads, hd)
        attention = torch.einsum("qhd,mhd->hqm", q, k).div(math.sqrt(hd)).softmax(dim=-1)
        update = torch.einsum("hqm,mhd->qhd", attention, v).reshape(queries.shape[0], heads * hd)
        out = queries + self.att_norm(self.resid_drop(self.out_proj(update)))
        out = out + self.post_norm(self.mlp_drop(self.mlp(out)))
        return out, attention


def _genconv(hidden: int) -> GENConv:
    # PyG >= 2 default: no bias in the GENConv MLP (see the class docstring).
    return GENConv(hidden, hidden, aggr="softmax", t=1.0, learn_t=True, num_layers=2, norm="layer")


def compatibility_loss(features: Tensor, prototypes: Tensor, types: Tensor, n_types: int) -> Tensor:
    """The official prototype-compatibility loss.

    ``d[n, c]`` = mean over type c's prototypes of the L2 distance from node n to them;
    loss = ``(sum_n d[n, type_n] + logsumexp over (n, c != type_n) of -d[n, c]) / (N * n_types)``.

    Shapes: ``features`` (N, D), ``prototypes`` (n_types * K, D) type-major, ``types`` (N,) -> scalar.
    """
    n = features.shape[0]
    dist = torch.cdist(features, prototypes).view(n, n_types, -1).mean(dim=2)  # (N, n_types)
    is_own = F.one_hot(types, n_types).bool()
    positives = dist[is_own]
    negatives = dist[~is_own]
    negative_term = torch.logsumexp(-negatives, dim=0) if negatives.numel() else dist.new_zeros(())
    return (positives.sum() + negative_term) / (n * n_types)


#: How :func:`orthogonality_loss` is computed (option ``orthogonality_impl``).
ORTHOGONALITY_IMPLS = ("small_gram", "official")


def _check_orthogonality_impl(impl: str) -> str:
    if impl not in ORTHOGONALITY_IMPLS:
        raise ValueError(f"methods/protosurv.py: orthogonality_impl must be one of "
                         f"{', '.join(ORTHOGONALITY_IMPLS)}, got {impl!r}")
    return impl


def orthogonality_loss(prototypes: Tensor, impl: str = "small_gram") -> Tensor:
    """The official orthogonality loss ``|| G/||G||_F - I/||I||_F ||_F`` with ``G = S^T S`` (D x D).

    ``impl="official"`` forms ``G`` as the official code does (``O(P D^2)``). ``"small_gram"`` (default) uses
    ``||S^T S||_F = ||S S^T||_F`` and ``tr(S^T S) = ||S||_F^2``: the loss is
    ``sqrt(2 - 2 r)`` with ``r = ||S||_F^2 / (||S S^T||_F sqrt(D))``, from the P x P Gram (``O(P^2 D)``; about
    30 times faster with its gradient for P = 40, D = 1024). Same value to rounding. It applies when
    ``4 P <= D``, where ``r <= sqrt(P / D) <= 1/2`` so the difference does not cancel; otherwise the official
    form is used.

    Shapes: ``prototypes`` S (P, D) -> scalar.
    """
    _check_orthogonality_impl(impl)
    n_prototypes, dim = prototypes.shape
    if impl == "small_gram" and 4 * n_prototypes <= dim:
        ratio = prototypes.pow(2).sum() / (torch.linalg.matrix_norm(prototypes @ prototypes.T) * math.sqrt(dim))
        return torch.sqrt(2 - 2 * ratio)
    gram = prototypes.T @ prototypes
    eye = torch.eye(dim, device=gram.device, dtype=gram.dtype)
    return torch.linalg.matrix_norm(gram / torch.linalg.matrix_norm(gram) - eye / math.sqrt(dim))


class ProtoSurv(nn.Module):
    """ProtoSurv (``LINKX_PROTO_oldv`` with ``configs/protosurv.yml``) for one bag.

    Forward pass on a bag with ``N`` patches at 20x, ``D = in_dim``, ``T = 5`` tissue types, ``K = 8`` prototypes
    per type, ``P = 768``:

    1. Graph branch (spatial k-NN graph): ``pre_fc`` Linear(D->128), LN, GELU, Dropout(.25) = x0; x1 = bare
       GENConv(x0); x2, x3 = DeepGCNLayer('res', GENConv, LN, GELU, dropout .1); ``post_fc`` on cat[x0..x3]:
       Linear(512->P), LN, GELU, Dropout(.25), Linear(P->P) -> node context (N, P).
    2. Prototypes: per type, the mean raw feature of its nodes (of all nodes when the type is absent) ->
       ``proto_mlp`` Linear(D->P), LN, GELU, Dropout(.2) -> ``mu + exp(log_sigma) * r`` (learnt ``log_sigma``
       (T, 1, P), ``r`` (T, K, P)) -> two cross-attention layers per type over the raw features (3 heads).
    3. Fusion: four cross-attention layers, all T*K prototypes attending to the node context.
    4. Head: mean over prototypes, LayerNorm without affine, then ``Linear(P -> n_bins)`` (NLL) or
       ``Linear(P -> 1, bias=False)`` (Cox log-risk).
    5. ``aux_loss = 0.01 * compatibility + 0.1 * orthogonality`` on the prototypes mapped back to feature space by
       ``mlp_comp`` (Linear(P->D, no bias), LN, GELU, Linear(D->D, no bias)), against all N raw features.

    During training at most ``max_nodes`` (25,000) random nodes enter each attention stage (independent draws for
    the refinement and the fusion, as official); the graph branch always sees all nodes. All nodes at evaluation.

    Parameters
    ----------
    in_dim : int
        Patch-feature dimension.
    n_bins : int
        Output bins of the NLL head (ignored by the Cox head).
    head : {"nll", "cox"}
    n_types, n_prototypes : int, default 5, 8
    hidden : int, default 128
        Graph-branch width.
    proto_dim : int, default 768
    proto_mlp_hidden : int, default 512
    n_heads : int, default 3
    refine_iters, fusion_layers : int, default 2, 4
    dropout : float, default 0.25
        Graph-branch dropout; the prototype modules use 0.2 and the residual GCN blocks 0.1, as official.
    max_nodes : int, default 25,000
    compatibility_weight, orthogonality_weight : float, default 0.01, 0.1
    pseudo_type_seed : int, default 0
        Seed of the k-means pseudo tissue types.
    tissue_types : {"file", "kmeans", "truth"}, default "file"
        Where the per-patch tissue types come from: ``file`` = a tissue-type file when the data has one (what a
        real user can have), else k-means pseudo-types; ``kmeans`` = always k-means; ``truth`` = the synthetic
        generator's true types (privileged information, only when asked). ``tissue_types_used`` collects the
        sources the model actually read; the runner records it.
    orthogonality_impl : {"small_gram", "official"}, default "small_gram"
        How the orthogonality loss is computed (:func:`orthogonality_loss`): from the P x P Gram of the
        prototypes, or from the official D x D one (the reference). Same value to rounding.

    Returns (forward)
    -----------------
    SurvivalOutput: ``logits`` (1, n_bins) for the NLL head, or the log-risk (1,) for the Cox head;
    ``aux_loss`` (scalar); ``attention["attention"]`` (N,) = the last fusion layer's attention, averaged over
    heads and prototypes, aligned with ``bag.features[20]`` rows (zero for nodes not drawn during training).

    Deviations from the official code (deliberate)
    ----------------------------------------------
    - Heads: the NLL head (the default ``protosurv`` row) replaces the Cox head of the paper so the method trains
      through the shared loss; it has a bias (a discrete-time head needs baseline hazards). The Cox head is kept
      as ``protosurv_cox``: it returns the log-risk, and the trainer scores a Cox partial likelihood over a
      window of samples (the official code uses batches of 6 slides with >= 2 events).
    - Tissue types (option ``tissue_types``): a per-patch type file when the data has one; the synthetic
      generator's true types only with ``tissue_types="truth"``. Otherwise per-bag k-means pseudo-types (:func:`pseudo_tissue_types`, seed 0, numbered by decreasing size)
      stand in for the paper's fine-tuned-UNI classifier (not released) and for the CONCH zero-shot substitute.
      The pre-computed UNI prototypes (``use_pre_proto``) are not supported: they only fit UNI-v1 features.
    - Graph: spatial 4-NN as the official ``graph_construction.py`` (``radius=5``), built by the harness's k-d tree
      builder in PyG's source-to-target direction (each node aggregates from its own 4 nearest neighbours; the
      official HNSW edges point the other way) and never across slides of a patient.
    - GENConv MLPs without bias (PyG >= 2 default, the 2024 code's environment); Patch-GCN's row uses biases.
    - Not reproduced: the data augmentation of the official loader (feature noise, node zeroing, edge dropping),
      its exclusion of all-zero (augmented) rows from the type means, activation checkpointing (memory only).
    - The compatibility loss one-hot encodes types with ``n_types`` classes (the official ``F.one_hot`` infers the
      width from the largest label present, which fails when the last type is absent).
    - Dead modules of the official code are not built: ``ProtoGNN.norm``, ``.lin``, ``.proto_mlp`` and the norm of
      the first (bare-conv) GCN block: 919,808 parameters.
    - Parameters (4 bins, NLL head): 52,070,279 at 1024-d (1536-d: 62,098,311; 512-d: 42,566,535); the
      ``protosurv_cox`` head has 2,308 fewer. The official object at 1024-d has 52,987,779: 919,808 dead, and a
      768-weight Cox head instead of the 3,076 of the NLL head. Most of it is the 14 cross-attention layers.
      Only ``pre_fc``, ``proto_mlp``, the refinement ``to_k``/``to_v`` and ``mlp_comp`` depend on ``in_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        n_bins: int = 4,
        head: str = "nll",
        n_types: int = 5,
        n_prototypes: int = 8,
        hidden: int = 128,
        proto_dim: int = 768,
        proto_mlp_hidden: int = 512,
        n_heads: int = 3,
        refine_iters: int = 2,
        fusion_layers: int = 4,
        dropout: float = 0.25,
        max_nodes: int = 25_000,
        compatibility_weight: float = 0.01,
        orthogonality_weight: float = 0.1,
        pseudo_type_seed: int = 0,
        tissue_types: str = "file",
        orthogonality_impl: str = "small_gram",
    ) -> None:
        super().__init__()
        if head not in ("nll", "cox"):
            raise ValueError(f"methods/protosurv.py: head must be 'nll' or 'cox', got {head!r}")
        self.head_kind = head
        self.n_types = n_types
        self.n_prototypes = n_prototypes
        self.refine_iters = refine_iters
        self.max_nodes = max_nodes
        self.compatibility_weight = compatibility_weight
        self.orthogonality_weight = orthogonality_weight
        self.pseudo_type_seed = pseudo_type_seed
        if tissue_types not in TISSUE_TYPE_SOURCES:
            raise ValueError(f"methods/protosurv.py: tissue_types must be one of {', '.join(TISSUE_TYPE_SOURCES)}, "
                             f"got {tissue_types!r}")
        self.tissue_types = tissue_types
        self.orthogonality_impl = _check_orthogonality_impl(orthogonality_impl)
        self.tissue_types_used: set[str] = set()

        # Graph branch.
        self.pre_fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout))
        self.first_conv = _genconv(hidden)
        self.gcn_blocks = nn.ModuleList(
            DeepGCNLayer(_genconv(hidden), nn.LayerNorm(hidden), nn.GELU(), block="res", dropout=0.1) for _ in range(2)
        )
        self.post_fc = nn.Sequential(
            nn.Linear(4 * hidden, proto_dim),
            nn.LayerNorm(proto_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(proto_dim, proto_dim),
        )

        # Prototypes.
        self.proto_mlp = nn.Sequential(
            nn.Linear(in_dim, proto_dim), nn.LayerNorm(proto_dim), nn.GELU(), nn.Dropout(0.2)
        )
        self.proto_log_sigma = nn.Parameter(torch.empty(n_types, 1, proto_dim))
        nn.init.xavier_uniform_(self.proto_log_sigma)
        self.proto_offsets = nn.Parameter(torch.randn(n_types, n_prototypes, proto_dim))
        self.refine = nn.ModuleList(
            PrototypeCrossAttention(in_dim, proto_dim, proto_mlp_hidden, n_heads, dropout=0.2)
            for _ in range(n_types * refine_iters)
        )
        self.fusion = nn.ModuleList(
            PrototypeCrossAttention(proto_dim, proto_dim, proto_mlp_hidden, n_heads, dropout=0.2)
            for _ in range(fusion_layers)
        )

        # Head and the map back to feature space for the prototype losses.
        self.pred_norm = nn.LayerNorm(proto_dim, elementwise_affine=False)
        self.classifier = nn.Linear(proto_dim, 1, bias=False) if head == "cox" else nn.Linear(proto_dim, n_bins)
        self.mlp_comp = nn.Sequential(
            nn.Linear(proto_dim, in_dim, bias=False), nn.LayerNorm(in_dim), nn.GELU(), nn.Linear(in_dim, in_dim, bias=False)
        )

    def _tissue_types(self, bag: Bag, n: int) -> Tensor:
        types = self._chosen_types(bag)
        if types is None:
            self.tissue_types_used.add("kmeans")
            return pseudo_tissue_types(bag.features[20], self.n_types, seed=self.pseudo_type_seed)
        self.tissue_types_used.add(str(bag.tissue_source or "file"))
        types = types.long().reshape(-1)
        if types.numel() != n:
            raise ValueError(
                f"methods/protosurv.py: bag {bag.sample_id!r} has {types.numel()} tissue types for {n} patches at 20x"
            )
        if n and (int(types.min()) < 0 or int(types.max()) >= self.n_types):
            raise ValueError(
                f"methods/protosurv.py: bag {bag.sample_id!r} has tissue types outside 0..{self.n_types - 1} "
                f"({', '.join(TISSUE_TYPES[: self.n_types])})"
            )
        return types

    def _chosen_types(self, bag: Bag) -> Tensor | None:
        """The bag's tissue types when ``tissue_types`` allows their source, else None (k-means)."""
        if self.tissue_types == "kmeans" or bag.tissue_type is None:
            if self.tissue_types == "truth":
                raise ValueError(f"methods/protosurv.py: tissue_types='truth' but bag {bag.sample_id!r} has no "
                                 "tissue types (only the synthetic cohorts carry their true types)")
            return None
        if self.tissue_types == "file" and bag.tissue_source == "synthetic-truth":
            return None  # the generator's truth is privileged: a real user has no such labels
        return bag.tissue_type

    def _draw(self, n: int, device: torch.device) -> Tensor | None:
        """Random node subset for an attention stage during training; None means all nodes."""
        if not self.training or n <= self.max_nodes:
            return None
        return torch.randperm(n, device=device)[: self.max_nodes]

    def prototypes(self, x: Tensor, types: Tensor) -> Tensor:
        """Refined prototypes (T*K, P), type-major, from raw features ``x`` (M, D) and their ``types`` (M,)."""
        sums = torch.zeros(self.n_types, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, types, x)
        counts = torch.bincount(types, minlength=self.n_types).unsqueeze(1)
        mu = torch.where(counts > 0, sums / counts.clamp(min=1), x.mean(dim=0, keepdim=True))
        initial = self.proto_mlp(mu).unsqueeze(1) + self.proto_log_sigma.exp() * self.proto_offsets  # (T, K, P)
        refined = []
        for t in range(self.n_types):
            proto = initial[t]
            for layer in self.refine[t * self.refine_iters : (t + 1) * self.refine_iters]:
                proto, _ = layer(proto, x)
            refined.append(proto)
        return torch.cat(refined)

    def forward(self, bag: Bag) -> SurvivalOutput:
        x = bag.features[20]
        n = x.shape[0]
        if x.dim() != 2 or n == 0:
            raise ValueError(f"methods/protosurv.py: bag {bag.sample_id!r} has no 20x patches (features {tuple(x.shape)})")
        if "spatial" not in bag.edge_index:
            raise ValueError(f"methods/protosurv.py: bag {bag.sample_id!r} has no spatial graph (Needs(graph=('spatial',)))")
        edge_index = bag.edge_index["spatial"]
        types = self._tissue_types(bag, n)

        # Prototypes from (a sample of) the raw features.
        drawn = self._draw(n, x.device)
        prototypes = self.prototypes(x, types) if drawn is None else self.prototypes(x[drawn], types[drawn])

        # Graph branch on all nodes.
        x0 = self.pre_fc(x)
        x1 = self.first_conv(x0, edge_index)
        x2 = self.gcn_blocks[0](x1, edge_index)
        x3 = self.gcn_blocks[1](x2, edge_index)
        context = self.post_fc(torch.cat([x0, x1, x2, x3], dim=1))

        # Fusion on an independent sample of the node context.
        drawn = self._draw(n, x.device)
        keys = context if drawn is None else context[drawn]
        fused = prototypes
        for layer in self.fusion:
            fused, attention = layer(fused, keys)
        node_attention = attention.mean(dim=(0, 1))
        if drawn is not None:
            node_attention = node_attention.new_zeros(n).index_copy(0, drawn, node_attention)

        mapped = self.mlp_comp(prototypes)
        aux_loss = self.compatibility_weight * compatibility_loss(x, mapped, types, self.n_types)
        aux_loss = aux_loss + self.orthogonality_weight * orthogonality_loss(mapped, self.orthogonality_impl)

        out = self.classifier(self.pred_norm(fused.mean(dim=0)))
        maps = {"attention": AttentionMap(20, node_attention)}
        if self.head_kind == "cox":
            return SurvivalOutput.from_log_risk(out, attention=maps, aux_loss=aux_loss)
        return SurvivalOutput.from_logits(out.unsqueeze(0), attention=maps, aux_loss=aux_loss)


#: Tuned besides the shared space: prototypes per tissue type (``num_proto`` 8 official) and the fusion depth
#: (``fusion_layer_to_p`` 4 official).
SEARCH_SPACE = {"n_prototypes": {"choices": [4, 8, 16]}, "fusion_layers": {"low": 1, "high": 4}}


@register_method("protosurv", needs=_NEEDS, search_space=SEARCH_SPACE, source=_SOURCE, cost_prior=0.17, paper_row=7,
                 reference_options={"orthogonality_impl": "official"})  # the D x D Gram of the official loss
def protosurv(in_dim: int, n_bins: int = 4, **options) -> ProtoSurv:
    """ProtoSurv with the shared discrete-time NLL head (see :class:`ProtoSurv`)."""
    return ProtoSurv(in_dim, n_bins, head="nll", **options)


# Kept out of ``--methods all`` so Table 1 has one ProtoSurv row (the NLL head); run it by name.
@register_method("protosurv_cox", needs=_NEEDS, source=_SOURCE + " (official Cox head)", loss="cox", in_all=False,
                 search_space=SEARCH_SPACE)
def protosurv_cox(in_dim: int, n_bins: int = 4, **options) -> ProtoSurv:
    """ProtoSurv with the official Cox head (log-risk; windowed Cox loss in the trainer). ``n_bins`` is unused."""
    return ProtoSurv(in_dim, n_bins, head="cox", **options)
