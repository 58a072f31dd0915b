"""The shared survival losses against hand-computed values."""
import math

import pytest
import torch

from benchmark.fitting.losses import cox_partial_likelihood, nll_surv_loss, survival_loss
from benchmark.api.output import SurvivalOutput

LN2 = math.log(2.0)


def test_nll_zero_logits_hand_values():
    # logits 0 -> h = 1/2 in every bin, S_pad = [1, 1/2, 1/4, 1/8, 1/16]
    logits = torch.zeros(2, 4)
    bins = torch.tensor([1, 2])
    censorship = torch.tensor([0.0, 1.0])
    # event in bin 1: -(log S_pad[1] + log h[1]) = 2 ln 2; censored in bin 2: -log S_pad[3] = 3 ln 2
    assert nll_surv_loss(logits, bins, censorship, alpha=0.0).item() == pytest.approx(2.5 * LN2, rel=1e-6)
    # alpha 0.5: uncensored kept whole, censored halved -> (2 ln2 + 1.5 ln2) / 2
    assert nll_surv_loss(logits, bins, censorship, alpha=0.5).item() == pytest.approx(1.75 * LN2, rel=1e-6)
    # alpha 1: censored samples contribute nothing
    assert nll_surv_loss(logits, bins, censorship, alpha=1.0).item() == pytest.approx(LN2, rel=1e-6)


def test_nll_general_logits_hand_values():
    z = [1.0, -1.0, 2.0, 0.0]
    sig = [1 / (1 + math.exp(-v)) for v in z]
    s_pad = [1.0]
    for h in sig:
        s_pad.append(s_pad[-1] * (1 - h))
    logits = torch.tensor([z])
    event_bin2 = -(math.log(s_pad[2]) + math.log(sig[2]))
    censored_bin0 = -math.log(s_pad[1])
    assert nll_surv_loss(logits, torch.tensor([2]), torch.tensor([0.0])).item() == pytest.approx(event_bin2, rel=1e-6)
    assert nll_surv_loss(logits, torch.tensor([0]), torch.tensor([1.0]), alpha=0.2).item() == pytest.approx(
        0.8 * censored_bin0, rel=1e-6)


def test_nll_clamps_log_arguments_at_1e7():
    logits = torch.full((1, 4), -100.0)  # h[0] ~ 4e-44, clamped at 1e-7
    loss = nll_surv_loss(logits, torch.tensor([0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert torch.isfinite(loss)


def test_nll_rejects_out_of_range_bins():
    with pytest.raises(ValueError, match="bins must lie"):
        nll_surv_loss(torch.zeros(1, 4), torch.tensor([4]), torch.tensor([0.0]))


def test_survival_loss_averages_heads_and_adds_aux_loss():
    main = torch.zeros(1, 4)
    aux = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    out = SurvivalOutput.from_logits(main, aux_logits=(aux,), aux_loss=torch.tensor(0.3))
    expected = (nll_surv_loss(main, torch.tensor([2]), torch.tensor([0.0]), 0.2)
                + nll_surv_loss(aux, torch.tensor([2]), torch.tensor([0.0]), 0.2)) / 2 + 0.3
    assert survival_loss(out, 2, 0.0, alpha=0.2).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="Cox"):
        survival_loss(SurvivalOutput.from_log_risk(torch.tensor(0.1)), 0, 0.0)


def test_cox_partial_likelihood_hand_value():
    eta = torch.tensor([0.5, -0.2, 1.0])
    time = torch.tensor([2.0, 5.0, 1.0])
    event = torch.tensor([1.0, 0.0, 1.0])
    # events: sample 0 (t=2, risk set {0, 1}) and sample 2 (t=1, risk set {0, 1, 2})
    term0 = 0.5 - math.log(math.exp(0.5) + math.exp(-0.2))
    term2 = 1.0 - math.log(math.exp(0.5) + math.exp(-0.2) + math.exp(1.0))
    assert cox_partial_likelihood(eta, time, event).item() == pytest.approx(-(term0 + term2) / 2, rel=1e-6)


def test_cox_breslow_ties_and_degenerate_windows():
    eta = torch.tensor([0.3, -0.4])
    lse = math.log(math.exp(0.3) + math.exp(-0.4))
    tied = cox_partial_likelihood(eta, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert tied.item() == pytest.approx(-((0.3 - lse) + (-0.4 - lse)) / 2, rel=1e-6)
    # a window without events carries no ranking information: no loss
    assert cox_partial_likelihood(eta, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])) is None
    with pytest.raises(ValueError, match="at least 2"):
        cox_partial_likelihood(torch.tensor([0.1]), torch.tensor([1.0]), torch.tensor([1.0]))


def test_cox_gradient_pushes_event_risk_up():
    eta = torch.zeros(3, requires_grad=True)
    loss = cox_partial_likelihood(eta, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 0.0]))
    loss.backward()
    assert eta.grad[0] < 0 < eta.grad[1]  # descent raises the early event's risk, lowers the others'
