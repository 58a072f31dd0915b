"""``random``: the floor row of every table (risk from seeded noise, no learning)."""
from __future__ import annotations

import zlib

import torch
from torch import nn

from benchmark.api import Bag, Needs, register_method, SurvivalOutput



@register_method("random", needs=Needs(magnifications=(20,)), search_space=False,  # no trainable parameter
                 cost_prior=0.0002, chance_floor=True,
                 source="harness baseline (no paper): chance level")
class RandomRisk(nn.Module):
    """Chance-level baseline: logits drawn from seeded Gaussian noise, so ``risk = -sum(S)`` is noise.

    The noise of a bag depends only on its ``sample_id`` and on a seed drawn from torch's global generator
    when the model is built (the trainer seeds it with the run seed): the same run seed gives the same
    predictions, different seeds give independent ones. The model has no trainable parameter; the trainer
    skips optimisation. Expected C-index 0.5.

    Parameters
    ----------
    in_dim : int
        Unused (kept for the method contract).
    n_bins : int
        Number of discrete-time bins.
    """

    def __init__(self, in_dim: int, n_bins: int = 4) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.register_buffer("noise_seed", torch.randint(0, 2**31 - 1, (1,)))

    def forward(self, bag: Bag) -> SurvivalOutput:
        """Returns logits of shape (1, n_bins) that do not depend on the features."""
        seed = (zlib.crc32(bag.sample_id.encode()) ^ int(self.noise_seed)) % (2**63)
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(1, self.n_bins, generator=generator)
        device = bag.features[20].device if bag.features else torch.device("cpu")
        return SurvivalOutput.from_logits(logits.to(device))
