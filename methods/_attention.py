"""Gated attention pooling shared by AMIL, Patch-GCN and DeepGraphSurv (the Mahmood ``Attn_Net_Gated``).

A private module (leading underscore): it registers no method.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


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
