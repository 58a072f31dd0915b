"""One cheap training procedure registered under several names: ``null0``, ``null1``, ... (``--plugin
methods._null_copies``), the null design of ``make calibration``.

Every copy is the same model, loss and recipe; copy ``i`` only draws ``i`` extra numbers from torch's global
generator before its layers are built, so its initialisation (and dropout stream) differs from the other
copies' while its expected performance is the same. With ``--seeding per-fold`` the trainer also reseeds every
cell, so every (copy, fold) is an independent draw of the training procedure: a test that marks copies as
different on such a column makes a false claim. Not part of the built-in methods (the module name starts with
an underscore, so ``methods`` does not import it).
"""
from __future__ import annotations

import torch
from torch import nn

from benchmark.api import Bag, Needs, SurvivalOutput, register_method

#: How many copies are registered.
N_COPIES = 3


class MeanPoolMLP(nn.Module):
    """Mean of the 20x patch features -> a small MLP (one hidden layer, dropout) -> discrete-time logits.

    Parameters
    ----------
    in_dim, n_bins : int
        Feature dimension and number of discrete-time bins.
    copy : int
        Which copy: how many numbers are drawn from the global generator before the layers are built.
    hidden : int
        Hidden units.
    """

    def __init__(self, in_dim: int, n_bins: int = 4, copy: int = 0, hidden: int = 16) -> None:
        super().__init__()
        if copy:
            torch.rand(copy)  # shifts the initialisation stream: the copies differ only here
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.25), nn.Linear(hidden, n_bins))

    def forward(self, bag: Bag) -> SurvivalOutput:
        logits = self.net(bag.features[20].float().mean(dim=0, keepdim=True))
        return SurvivalOutput.from_logits(logits)


def _register(index: int) -> None:
    def build(in_dim: int, n_bins: int = 4) -> nn.Module:
        return MeanPoolMLP(in_dim, n_bins, copy=index)

    build.__module__ = __name__
    register_method(f"null{index}", needs=Needs(magnifications=(20,)), search_space=False, in_all=False,
                    source="harness calibration (no paper): one training procedure under several names")(build)


for _index in range(N_COPIES):
    _register(_index)
