"""DeepGraphSurv (Patch-GCN's DeepGraphConv): parameter count, latent graph, output contract, determinism."""
from __future__ import annotations

import pytest
import torch

from benchmark.data.bag import Bag
from benchmark.data.graphs import build_graph
from benchmark.api.registry import count_parameters, create_method, get_method_spec
from tests.helpers import check_graph_output, graph_bag, seeded_outputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parameter_count_matches_the_official_model():
    assert count_parameters(create_method("deepgraphsurv", in_dim=1024, n_bins=4)) == 790_021


def test_registration_declares_a_latent_graph():
    needs = get_method_spec("deepgraphsurv").needs
    assert needs.graph == ("latent",) and needs.graph_k == 8 and needs.magnifications == (20,)


def test_gin_layers_match_the_official_structure():
    model = create_method("deepgraphsurv", in_dim=64)
    for conv, first in ((model.conv1, 64), (model.conv2, 256), (model.conv3, 256)):
        linears = [m for m in conv.nn if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(first, 256), (256, 256)]
        assert float(conv.eps) == 0.0 and not isinstance(conv.eps, torch.nn.Parameter)  # eps = 0, not trained


def test_forward_backward_and_contract():
    torch.manual_seed(0)
    model = create_method("deepgraphsurv", in_dim=32).train()
    bag = graph_bag()
    out = model(bag)
    check_graph_output(out, 48)
    out.risk.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_single_patch_bag():
    model = create_method("deepgraphsurv", in_dim=32).eval()
    out = model(graph_bag(n=1, slides=1))
    check_graph_output(out, 1)


def test_uses_the_latent_graph_built_from_features_when_missing():
    torch.manual_seed(0)
    model = create_method("deepgraphsurv", in_dim=32).eval()
    bag = graph_bag()
    assert torch.equal(model(graph_bag(graph=False)).logits, model(bag).logits)
    # The latent graph, not the spatial one, drives the convolutions.
    swapped = Bag(bag.sample_id, bag.slide_ids, bag.features, bag.coords, bag.slide_index,
                  {"latent": bag.edge_index["spatial"]})
    assert not torch.allclose(model(swapped).logits, model(bag).logits, atol=1e-6)
    expected = build_graph(bag.features[20], bag.slide_index[20], 8)
    assert torch.equal(bag.edge_index["latent"], expected)


def test_node_order_does_not_matter():
    torch.manual_seed(0)
    model = create_method("deepgraphsurv", in_dim=32).eval()
    bag = graph_bag()
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    inverse = torch.argsort(perm)
    permuted = Bag(bag.sample_id, bag.slide_ids, {20: bag.features[20][perm]}, {20: bag.coords[20][perm]},
                   {20: bag.slide_index[20][perm]}, {"latent": inverse[bag.edge_index["latent"]]})
    assert torch.allclose(model(permuted).logits, model(bag).logits, atol=1e-5)


def test_dropout_only_in_training_and_seeded_determinism():
    bag = graph_bag()
    torch.manual_seed(0)
    model = create_method("deepgraphsurv", in_dim=32, resample=0.2)
    model.eval()
    assert torch.equal(model(bag).logits, model(bag).logits)
    model.train()
    a, b, c = seeded_outputs(model, bag, 1, 1, 2)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="edge_agg"):
        create_method("deepgraphsurv", in_dim=32, edge_agg="knn")
