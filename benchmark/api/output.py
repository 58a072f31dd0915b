"""The one survival output every method returns, and its sign contract.

Discrete-time head (the default, shared by every method)::

    logits  (1, n_bins)
    hazards = sigmoid(logits)                  # P(event in bin k | survived to bin k)
    S       = cumprod(1 - hazards, dim=1)      # P(T > end of bin k), monotone non-increasing in [0, 1]
    risk    = -sum(S, dim=1)                   # (1,)  HIGHER risk = SHORTER survival

Cox head (an option of some methods): ``logits``/``hazards``/``survival`` are None and ``risk`` is the
log partial hazard (higher = shorter survival), trained with the harness's windowed Cox loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class AttentionMap:
    """Attention each patch of one magnification receives, aligned with ``bag.features[magnification]`` rows.

    ``scores`` has shape ``(N_m,)``; padding tokens are already cropped away.
    """

    magnification: int
    scores: Tensor


@dataclass
class SurvivalOutput:
    """Output of a method's forward pass on one bag.

    Attributes
    ----------
    risk : Tensor, shape (1,)
        Higher = shorter survival. ``-sum(S)`` for the discrete-time head.
    logits, hazards, survival : Tensor, shape (1, n_bins), or None for a Cox head
    attention : dict of str to AttentionMap
        Optional attention maps for heatmaps (e.g. ``"attention"``, ``"coarse_cross"``).
    aux_logits : tuple of Tensor
        Extra discrete-time heads scored by the shared loss too (the loss is the mean of the
        NLL over ``logits`` and every entry here), e.g. DSMIL's max-instance stream.
    aux_loss : Tensor or None
        A scalar regulariser added to the survival loss as is (already weighted by the method).
    """

    risk: Tensor
    logits: Tensor | None = None
    hazards: Tensor | None = None
    survival: Tensor | None = None
    attention: dict[str, AttentionMap] = field(default_factory=dict)
    aux_logits: tuple[Tensor, ...] = ()
    aux_loss: Tensor | None = None

    @property
    def is_cox(self) -> bool:
        return self.logits is None

    @classmethod
    def from_logits(cls, logits: Tensor, **kwargs) -> "SurvivalOutput":
        """Build the discrete-time output from ``(1, n_bins)`` logits."""
        if logits.dim() == 1:
            logits = logits.unsqueeze(0)
        hazards = torch.sigmoid(logits)
        survival = torch.cumprod(1 - hazards, dim=1)
        risk = -survival.sum(dim=1)
        return cls(risk=risk, logits=logits, hazards=hazards, survival=survival, **kwargs)

    @classmethod
    def from_log_risk(cls, log_risk: Tensor, **kwargs) -> "SurvivalOutput":
        """Build a Cox-head output from a scalar log partial hazard."""
        return cls(risk=log_risk.reshape(1), **kwargs)
