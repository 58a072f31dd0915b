"""AMIL: the MCAT / Patch-GCN parameter counts, attention map, dropout only in training, permutation invariance."""
import pytest
import torch

from benchmark.data.bag import Bag, Needs
from benchmark.api.registry import count_parameters, create_method, get_method_spec
from tests.helpers import check_survival_output, features_bag, seeded_outputs

# Patch-GCN's AMIL: only the first Linear changes with the input dim
EXPECTED_PARAMETERS = {512: 657_925, 768: 788_997, 1024: 920_069, 1536: 1_182_213, 2048: 1_444_357}


@pytest.mark.parametrize("in_dim", sorted(EXPECTED_PARAMETERS))
def test_parameter_count_matches_the_official_model(in_dim):
    assert count_parameters(create_method("amil", in_dim=in_dim, n_bins=4)) == EXPECTED_PARAMETERS[in_dim]


def _bag():
    return features_bag(50, 32, sample_id="p0", slide_id="s0")


def test_registered_with_20x_needs_and_returns_the_output_contract():
    spec = get_method_spec("amil")
    assert spec.needs == Needs(magnifications=(20,)) and spec.loss == "nll" and "Patch-GCN" in spec.source
    torch.manual_seed(0)
    model = create_method("amil", in_dim=32).eval()
    out = model(_bag())
    check_survival_output(out)
    att = out.attention["attention"]
    assert att.magnification == 20 and att.scores.shape == (50,)
    assert torch.all(att.scores >= 0) and att.scores.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_dropout_only_in_training_and_permutation_invariance():
    torch.manual_seed(0)
    model = create_method("amil", in_dim=32)
    bag = _bag()
    model.eval()
    a, b = model(bag).risk, model(bag).risk
    assert torch.equal(a, b)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    shuffled = Bag("p0", ("s0",), {20: bag.features[20][perm]})
    assert torch.allclose(model(shuffled).risk, a, atol=1e-6)
    model.train()
    c, d = seeded_outputs(model, bag, 1, 2, field="risk")
    assert not torch.equal(c, d)


def test_empty_bag_is_a_clear_error():
    model = create_method("amil", in_dim=8)
    with pytest.raises(ValueError, match="p0"):
        model(Bag("p0", ("s0",), {20: torch.zeros(0, 8)}))
