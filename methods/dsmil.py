"""DSMIL: dual-stream multiple-instance learning, adapted to discrete-time survival.

Paper: B. Li, Y. Li, K. W. Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide Image
Classification with Self-supervised Contrastive Learning", CVPR 2021.
Official repository: github.com/binli123/dsmil-wsi (``dsmil.py``: ``FCLayer``, ``BClassifier``, ``MILNet``;
``train_tcga.py``: loss, initialisation). Survival copy compared against: RustinS/CrossFusion ``models/DSMIL.py``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from methods._layers import checked_features

from benchmark.api import AttentionMap, Bag, Needs, register_method, SurvivalOutput

STREAMS = ("both", "bag")


def _orthogonal_init(module: nn.Module) -> None:
    """The official ``apply_sparse_init`` of ``train_tcga.py``: orthogonal weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.orthogonal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


#: Tuned besides the shared space: the official switches ``--non_linearity`` (query net) and ``passing_v``
#: (value net). The model has no dropout at the official defaults (``dropout_patch 0``, ``dropout_node 0``), so
#: the shared ``dropout`` entry is left out.
SEARCH_SPACE = {"dropout": None, "nonlinear": {"choices": [True, False]}, "passing_v": {"choices": [False, True]}}


@register_method(
    "dsmil",
    cost_prior=0.0016, paper_row=2,
    needs=Needs(magnifications=(20,)),
    search_space=SEARCH_SPACE,
    source="Li et al. CVPR 2021; github.com/binli123/dsmil-wsi (dsmil.py, train_tcga.py)",
)
class DSMIL(nn.Module):
    """Dual-stream MIL (DSMIL) with one output per survival bin.

    Each of the ``C = n_bins`` survival bins plays the role of a DSMIL class:

    1. instance stream: ``c = Linear(K -> C)(H)``, ``(N, C)`` instance logits; its max over instances is the
       max-pooling prediction, ``(1, C)``;
    2. critical instance of each bin: ``m_c = argmax_n c[n, c]``;
    3. query net ``q``: ``Linear(K -> 128), ReLU, Linear(128 -> 128), Tanh`` (``nonlinear=True``, the official
       ``--non_linearity 1`` default) or ``Linear(K -> 128)``; ``Q = q(H)`` ``(N, 128)``, ``q_max = q(H[m])``
       ``(C, 128)``;
    4. values ``V = H`` (identity, ``passing_v=False``) or ``Dropout, Linear(K -> K), ReLU``;
    5. ``A = softmax_N(Q q_max^T / sqrt(128))`` ``(N, C)``, ``B = A^T V`` ``(C, K)``;
    6. bag logits ``Conv1d(C, C, kernel_size=K)(B)`` ``(1, C)``.

    With ``K = 1024``, ``C = 4`` and the defaults there are exactly 168,200 parameters (the CrossFusion
    configuration: nonlinear query, identity values).

    Parameters
    ----------
    in_dim : int
        Patch-feature dimension ``K``.
    n_bins : int
        Number of discrete-time survival bins ``C``.
    streams : {"both", "bag"}
        ``"both"`` (default): the bag logits are the output (``logits``, from which hazards, survival and risk
        follow) and the max-over-instances logits are returned in ``aux_logits``, so the shared loss (the mean
        NLL over heads) is DSMIL's ``0.5 * L_bag + 0.5 * L_max`` and the instance classifier learns.
        ``"bag"``: parity with the CrossFusion copy, which feeds only the bag logits to the loss. Its instance
        classifier then never receives a gradient (it is used only through ``argmax``) and stays at its random
        initialisation, so its "critical instances" are random projections. Use only to reproduce that number.
    nonlinear : bool
        Nonlinear query net (official default ``True``).
    query_dim : int
        Width of the query space (128 in the official code).
    passing_v : bool
        Transform the values with ``Dropout, Linear(K -> K), ReLU`` (official default ``False``).
    dropout_v : float
        Dropout on the values when ``passing_v`` (official default 0); acts only in training.

    Notes
    -----
    Deliberate deviations from the official code:

    - Classes are survival bins and the per-class BCE is replaced by the harness's discrete-time NLL on the
      sigmoid hazards (the same loss every method uses), averaged over the two streams as above.
    - The risk is taken from the bag-stream survival curve only (``-sum(S_bag)``); the official optional
      ``--average`` inference (``sigmoid(max) + sigmoid(bag)``) is not used.
    - Features are precomputed; the official ``IClassifier`` feature extractor is the identity (``FCLayer``).
    - The loop over classes of early versions is the vectorised form of the later official ``BClassifier``.

    Outputs ``attention["attention"]``: the DSMIL attention ``A`` averaged over the ``C`` bins, ``(N_20,)``,
    one score per 20x patch (each column of ``A`` sums to one, so the map does too).
    """

    def __init__(
        self,
        in_dim: int,
        n_bins: int = 4,
        streams: str = "both",
        nonlinear: bool = True,
        query_dim: int = 128,
        passing_v: bool = False,
        dropout_v: float = 0.0,
    ) -> None:
        super().__init__()
        if streams not in STREAMS:
            raise ValueError(f"methods/dsmil.py: streams must be one of {STREAMS}, got {streams!r}")
        if in_dim < 1 or n_bins < 1 or query_dim < 1:
            raise ValueError(f"methods/dsmil.py: in_dim, n_bins and query_dim must be positive, got "
                             f"{in_dim}, {n_bins}, {query_dim}")
        self.in_dim = in_dim
        self.n_bins = n_bins
        self.streams = streams
        self.instance_classifier = nn.Linear(in_dim, n_bins)
        if nonlinear:
            self.query = nn.Sequential(
                nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
            )
        else:
            self.query = nn.Linear(in_dim, query_dim)
        if passing_v:
            self.value: nn.Module = nn.Sequential(nn.Dropout(dropout_v), nn.Linear(in_dim, in_dim), nn.ReLU())
        else:
            self.value = nn.Identity()
        # Conv1d(C, C, K) on the (1, C, K) bag embedding: a full C x C x K linear map plus bias.
        self.bag_head = nn.Conv1d(n_bins, n_bins, kernel_size=in_dim)
        self.query_scale = 1.0 / math.sqrt(query_dim)
        self.apply(_orthogonal_init)

    def forward(self, bag: Bag) -> SurvivalOutput:
        """Score one bag.

        Parameters
        ----------
        bag : Bag
            Reads ``bag.features[20]``, ``(N, in_dim)``.

        Returns
        -------
        SurvivalOutput
            ``logits`` ``(1, n_bins)`` from the bag stream; ``aux_logits`` = (max-instance logits ``(1, n_bins)``,)
            when ``streams="both"``; ``attention["attention"]`` ``(N,)``.
        """
        feats = checked_features(bag, 20, self.in_dim, "methods/dsmil.py")
        instance_logits = self.instance_classifier(feats)  # (N, C)
        critical = instance_logits.argmax(dim=0)  # (C,) critical instance of each bin
        queries = self.query(feats)  # (N, Q)
        critical_queries = self.query(feats[critical])  # (C, Q)
        attention = torch.softmax(queries @ critical_queries.T * self.query_scale, dim=0)  # (N, C)
        bag_embedding = attention.T @ self.value(feats)  # (C, K)
        bag_logits = self.bag_head(bag_embedding.unsqueeze(0)).view(1, self.n_bins)
        max_logits = instance_logits.max(dim=0).values.view(1, self.n_bins)
        aux = (max_logits,) if self.streams == "both" else ()
        return SurvivalOutput.from_logits(
            bag_logits,
            aux_logits=aux,
            attention={"attention": AttentionMap(20, attention.detach().mean(dim=1))},
        )
