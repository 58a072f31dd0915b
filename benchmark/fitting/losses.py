"""The one survival loss every method is trained with.

Two heads share this module:

- the discrete-time NLL of Zadeh & Schmid as written in the MCAT / Patch-GCN code
  (``mahmoodlab/Patch-GCN: utils/utils.py`` ``nll_loss``), used by every method registered with
  ``loss="nll"`` (the default), with the ``aux_logits`` / ``aux_loss`` rule of ``docs/ARCHITECTURE.md``;
- a Cox partial likelihood over a *window* of samples (the samples of one gradient-accumulation window),
  for methods registered with ``loss="cox"``. With one bag per window the partial likelihood is constant,
  so the trainer never calls it on fewer than two samples.
"""
from __future__ import annotations

import torch
from torch import Tensor

from benchmark.api.output import SurvivalOutput

#: Lower clamp of every log argument (the MCAT / Patch-GCN value).
LOG_EPS = 1e-7


def nll_surv_loss(logits: Tensor, bins: Tensor, censorship: Tensor, alpha: float = 0.0, eps: float = LOG_EPS) -> Tensor:
    """Discrete-time negative log-likelihood, averaged over the batch.

    With hazards ``h = sigmoid(logits)``, survival ``S_k = prod_{j<=k} (1 - h_j)`` and the padded survival
    ``S_pad = [1, S_1, ..., S_K]``::

        uncensored = -(1 - c) * (log S_pad[Y] + log h[Y])     # alive at the start of bin Y, event in bin Y
        censored   = -c * log S_pad[Y + 1]                    # alive through bin Y
        loss       = (1 - alpha) * (censored + uncensored) + alpha * uncensored

    Every log argument is clamped below at ``eps`` (1e-7), as in the official code.

    Parameters
    ----------
    logits : Tensor, shape (B, K)
        Per-bin logits.
    bins : Tensor, shape (B,)
        Integer bin ``Y`` in ``0..K-1`` of each sample's time.
    censorship : Tensor, shape (B,)
        1 = censored (alive at last follow-up), 0 = event.
    alpha : float
        Extra weight on the uncensored term (0 in the Mahmood CLI, 0.2 in CrossFusion).

    Returns
    -------
    Tensor, shape ()
        Mean loss over the batch.
    """
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    bins = bins.reshape(-1, 1).long().to(logits.device)
    c = censorship.reshape(-1, 1).to(dtype=logits.dtype, device=logits.device)
    if bins.shape[0] != logits.shape[0]:
        raise ValueError(f"nll_surv_loss: {logits.shape[0]} rows of logits but {bins.shape[0]} bins")
    n_bins = logits.shape[1]
    if bool((bins < 0).any()) or bool((bins >= n_bins).any()):
        raise ValueError(f"nll_surv_loss: bins must lie in 0..{n_bins - 1}, got {bins.flatten().tolist()}")
    hazards = torch.sigmoid(logits)
    survival = torch.cumprod(1 - hazards, dim=1)
    survival_padded = torch.cat([torch.ones_like(c), survival], dim=1)
    s_before = torch.gather(survival_padded, 1, bins).clamp(min=eps)
    h_at = torch.gather(hazards, 1, bins).clamp(min=eps)
    s_after = torch.gather(survival_padded, 1, bins + 1).clamp(min=eps)
    uncensored = -(1 - c) * (torch.log(s_before) + torch.log(h_at))
    censored = -c * torch.log(s_after)
    loss = (1 - alpha) * (censored + uncensored) + alpha * uncensored
    return loss.mean()


def survival_loss(output: SurvivalOutput, bin_index: int | Tensor, censorship: float | Tensor, alpha: float = 0.0) -> Tensor:
    """Loss of one bag for a discrete-time method: the NLL rule of ``docs/ARCHITECTURE.md``.

    The NLL is the mean over the main head (``output.logits``) and every head in ``output.aux_logits``;
    ``output.aux_loss`` (already weighted by the method) is added as is.

    Parameters
    ----------
    output : SurvivalOutput
        Output of ``model(bag)``; ``logits`` of shape (1, K).
    bin_index : int or Tensor
        Bin of the sample's time.
    censorship : float or Tensor
        1 = censored, 0 = event.
    alpha : float
        Weight of the uncensored term (see :func:`nll_surv_loss`).

    Returns
    -------
    Tensor, shape ()
    """
    if output.is_cox:
        raise ValueError("survival_loss needs a discrete-time output; Cox heads are scored with cox_partial_likelihood")
    device = output.logits.device
    y = torch.as_tensor(bin_index, device=device).reshape(1)
    c = torch.as_tensor(censorship, dtype=output.logits.dtype, device=device).reshape(1)
    heads = (output.logits, *output.aux_logits)
    loss = torch.stack([nll_surv_loss(h.reshape(1, -1), y, c, alpha) for h in heads]).mean()
    if output.aux_loss is not None:
        loss = loss + output.aux_loss.reshape(())
    return loss


def cox_partial_likelihood(log_risk: Tensor, time: Tensor, event: Tensor) -> Tensor | None:
    """Negative Cox partial log-likelihood of a window of samples (Breslow handling of tied times).

    ::

        loss = -(1 / n_events) * sum_{i: event_i} [ eta_i - log sum_{j: t_j >= t_i} exp(eta_j) ]

    Parameters
    ----------
    log_risk : Tensor, shape (B,)
        Log partial hazard ``eta`` of each sample (higher = shorter survival).
    time : Tensor, shape (B,)
        Follow-up times.
    event : Tensor, shape (B,)
        1 = event observed, 0 = censored.

    Returns
    -------
    Tensor, shape (), or None
        None when the window has no event: such a window carries no information on the ranking
        and contributes no Cox loss (the trainer then skips it).

    Raises
    ------
    ValueError
        On fewer than two samples, where the partial likelihood is constant.
    """
    eta = log_risk.reshape(-1)
    if eta.numel() < 2:
        raise ValueError("cox_partial_likelihood needs a window of at least 2 samples (it is constant on one)")
    t = time.reshape(-1).to(device=eta.device, dtype=eta.dtype)
    d = event.reshape(-1).to(device=eta.device, dtype=eta.dtype)
    if float(d.sum()) == 0.0:
        return None
    # at_risk[i, j] = 1 when sample j is still at risk at sample i's time (t_j >= t_i)
    at_risk = t.reshape(1, -1) >= t.reshape(-1, 1)
    masked = eta.reshape(1, -1).expand(eta.numel(), -1).masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(masked, dim=1)
    return -((eta - log_denominator) * d).sum() / d.sum()
