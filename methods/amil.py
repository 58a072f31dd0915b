"""AMIL: gated-attention MIL with the MCAT / Patch-GCN survival head."""
from __future__ import annotations

import torch
from torch import nn

from methods._layers import GatedAttention

from benchmark.api import AttentionMap, Bag, Needs, register_method, SurvivalOutput


#: Tuned besides the shared space (``benchmark/tuning/search_spaces.py``): the attention / ``rho`` width of
#: MCAT's ``size_arg`` "small" (256) and "big" (384), and the embedding width (512 in both; 256 for small
#: features).
SEARCH_SPACE = {"attention_dim": {"choices": [256, 384]}, "hidden": {"choices": [256, 512]}}


@register_method(
    "amil",
    cost_prior=0.0055, paper_row=1,
    needs=Needs(magnifications=(20,)),
    search_space=SEARCH_SPACE,
    source="Ilse et al., ICML 2018; survival form of mahmoodlab/MCAT and mahmoodlab/Patch-GCN models/model_set_mil.py",
)
class AMIL(nn.Module):
    """Attention-based MIL (AMIL / ABMIL) for survival, as ``MIL_Attention_FC_surv`` (``size_arg="small"``).

    Paper: Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018. Survival
    form and the published AMIL numbers: Chen et al., MCAT (ICCV 2021) and Patch-GCN (MICCAI 2021);
    official code ``github.com/mahmoodlab/MCAT`` / ``github.com/mahmoodlab/Patch-GCN``, ``models/model_set_mil.py``.

    Architecture (``N`` = patches at 20x, ``D`` = ``in_dim``)::

        h = Dropout(ReLU(Linear(D -> 512)(x)))                   # (N, 512)
        a = Linear(256 -> 1)(Dropout(tanh(Linear(512 -> 256) h)) * Dropout(sigmoid(Linear(512 -> 256) h)))   # (N, 1)
        w = softmax(a over N)                                     # (N,)  -> attention map
        z = Dropout(ReLU(Linear(512 -> 256)(w^T h)))              # (256,)
        logits = Linear(256 -> n_bins)(z)                         # (1, n_bins)

    920,069 parameters at ``in_dim=1024`` with 4 bins; PyTorch default initialisation; dropout 0.25, active only
    in training (``nn.Dropout`` follows ``self.training``).

    Deliberate deviations: the first layer takes the backbone's dimension (the official code fixes 1024);
    a multi-slide patient is one bag with attention over all its patches (the official behaviour); the
    returned attention map holds the post-softmax weights (the official code returns the raw scores).

    Parameters
    ----------
    in_dim : int
        Patch-feature dimension.
    n_bins : int
        Number of discrete-time bins.
    dropout : float
        Dropout probability (0.25 as ``--drop_out`` in the official CLI).
    hidden : int
        Width after the first layer (512, ``size_arg="small"``).
    attention_dim : int
        Attention and ``rho`` width (256).
    """

    def __init__(self, in_dim: int, n_bins: int = 4, dropout: float = 0.25, hidden: int = 512, attention_dim: int = 256) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attention_dim, dropout)
        self.rho = nn.Sequential(nn.Linear(hidden, attention_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(attention_dim, n_bins)

    def forward(self, bag: Bag) -> SurvivalOutput:
        """``bag.features[20]`` of shape (N, in_dim) -> logits (1, n_bins) and the attention map (N,)."""
        x = bag.features[20]
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"AMIL: bag {bag.sample_id!r} needs (N > 0, D) features at 20x, got {tuple(x.shape)}")
        h = self.embed(x)  # (N, hidden)
        weights = torch.softmax(self.attention(h), dim=0)  # (N,)
        pooled = weights @ h  # (hidden,)
        logits = self.classifier(self.rho(pooled)).unsqueeze(0)  # (1, n_bins)
        return SurvivalOutput.from_logits(logits, attention={"attention": AttentionMap(20, weights.detach())})
