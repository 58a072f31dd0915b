"""Fake bags and output checks shared by the per-method test files."""
from __future__ import annotations

import resource

import torch

from benchmark.data.bag import Bag
from benchmark.data.graphs import build_graph
from benchmark.api.output import SurvivalOutput


def features_bag(n: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32, sample_id: str = "s",
                 slide_id: str = "a") -> Bag:
    """One slide of ``n`` seeded random 20x features ``(n, dim)``; nothing else."""
    g = torch.Generator().manual_seed(seed)
    return Bag(sample_id=sample_id, slide_ids=(slide_id,), features={20: torch.randn(n, dim, generator=g).to(dtype)})


def graph_bag(n: int = 48, in_dim: int = 32, slides: int = 2, seed: int = 0, graph: bool = True) -> Bag:
    """``n`` 20x patches on a coarse grid split over ``slides`` slides, with spatial and latent 8-NN graphs."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, in_dim, generator=g)
    coords = torch.randint(0, 12, (n, 2), generator=g) * 256
    slide_index = torch.arange(n) * slides // n
    edges = {"spatial": build_graph(coords, slide_index, 8), "latent": build_graph(feats, slide_index, 8)} if graph else {}
    return Bag(f"bag{seed}", tuple(f"s{i}" for i in range(slides)), {20: feats}, {20: coords}, {20: slide_index}, edges)


def check_survival_output(out: SurvivalOutput, n_bins: int = 4) -> None:
    """Logits ``(1, n_bins)``, a non-increasing survival curve in [0, 1] and ``risk = -sum(S)``."""
    assert out.logits.shape == (1, n_bins) and out.survival.shape == (1, n_bins) and out.risk.shape == (1,)
    s = out.survival
    assert torch.isfinite(out.logits).all()
    assert ((s >= 0) & (s <= 1)).all() and (s[:, 1:] <= s[:, :-1]).all()
    assert torch.allclose(out.risk, -s.sum(dim=1))


def check_graph_output(out: SurvivalOutput, n: int, n_bins: int = 4) -> None:
    """:func:`check_survival_output`, and one softmax over all ``n`` nodes of the bag (every slide together)."""
    check_survival_output(out, n_bins)
    weights = out.attention["attention"].scores
    assert out.attention["attention"].magnification == 20 and weights.shape == (n,)
    assert torch.allclose(weights.sum(), torch.tensor(1.0)) and (weights >= 0).all()


def seeded_outputs(model: torch.nn.Module, bag: Bag, *seeds: int, field: str = "logits") -> list[torch.Tensor]:
    """``model(bag).<field>`` once per seed, each run right after ``torch.manual_seed(seed)``."""
    outputs = []
    for seed in seeds:
        torch.manual_seed(seed)
        outputs.append(getattr(model(bag), field))
    return outputs


def assert_dropout_only_in_training(model: torch.nn.Module, bag: Bag) -> None:
    """Two differently seeded runs agree in eval mode and differ in training mode."""
    model.eval()
    a, b = seeded_outputs(model, bag, 0, 1)
    assert torch.equal(a, b)
    model.train()
    a, b = seeded_outputs(model, bag, 0, 1)
    assert not torch.equal(a, b)


def assert_attention_follows_permutation(model: torch.nn.Module, bag: Bag, permuted: Bag, perm: torch.Tensor) -> None:
    """``permuted`` holds ``bag``'s rows in order ``perm``: same risk, and the attention map moves with the rows."""
    with torch.no_grad():
        a, b = model(bag), model(permuted)
    assert torch.allclose(a.risk, b.risk, atol=1e-5)
    assert torch.allclose(a.attention["attention"].scores[perm], b.attention["attention"].scores, atol=1e-6)


def assert_eval_in_bounded_memory(model: torch.nn.Module, bag: Bag, limit_mib: float = 1500) -> None:
    """One eval forward: finite risk, one attention score per 20x patch, peak RSS growth under ``limit_mib``."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with torch.no_grad():
        out = model(bag)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert torch.isfinite(out.risk).all() and out.attention["attention"].scores.shape == (bag.num_patches(20),)
    assert grown_mib < limit_mib, f"peak memory grew by {grown_mib:.0f} MiB (an N x N float matrix is ~9.3 GiB)"
