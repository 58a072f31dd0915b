"""Patch-GCN: exact parameter counts, output contract, graph use, checkpointing, determinism."""
from __future__ import annotations

import pytest
import torch

from benchmark.data.bag import Bag
from benchmark.api.registry import count_parameters, create_method, get_method_spec
from tests.helpers import check_graph_output, graph_bag, seeded_outputs

# A 48-node forward took 2.7 s with 2 threads, 0.04 s with 1 (the scatter kernels wait on a busy machine).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "in_dim, expected", [(512, 1_318_920), (768, 1_351_688), (1024, 1_384_456), (1536, 1_449_992), (2048, 1_515_528)]
)
def test_parameter_count_matches_the_official_model(in_dim, expected):
    model = create_method("patchgcn", in_dim=in_dim, n_bins=4)
    assert sum(p.numel() for p in model.parameters()) == expected
    # The official forward never uses the first block's LayerNorm (256 parameters): kept, but frozen.
    assert count_parameters(model) == expected - 256


def test_parameter_count_matches_the_official_notebook_with_one_output():
    # "Inference Benchmark.ipynb" prints 1,382,917 for n_classes=1 (GENConv MLPs with biases, learnable t).
    model = create_method("patchgcn", in_dim=1024, n_bins=1)
    assert sum(p.numel() for p in model.parameters()) == 1_382_917


def test_registration_declares_a_spatial_graph_with_coordinates():
    needs = get_method_spec("patchgcn").needs
    assert needs.graph == ("spatial",) and needs.coords and needs.graph_k == 8 and needs.magnifications == (20,)


def test_genconv_configuration():
    model = create_method("patchgcn", in_dim=32)
    for layer in model.layers:
        conv = layer.conv
        assert conv.aggr_module.learn and conv.aggr_module.t.item() == 1.0
        linears = [m for m in conv.mlp if hasattr(m, "in_channels")]  # PyG's own Linear
        assert [(m.in_channels, m.out_channels) for m in linears] == [(128, 256), (256, 128)]
        assert all(m.bias is not None for m in linears)
        assert [type(m).__name__ for m in conv.mlp][1:3] == ["LayerNorm", "ReLU"]
        assert layer.block == "res" and layer.dropout == 0.0


def test_forward_backward_and_contract():
    torch.manual_seed(0)
    model = create_method("patchgcn", in_dim=32)
    bag = graph_bag()
    model.train()
    out = model(bag)
    check_graph_output(out, 48)
    out.risk.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    # Every trainable parameter gets a gradient; the first block's LayerNorm (unused officially) is frozen.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"layers.0.norm.weight", "layers.0.norm.bias"}
    for name, grad in grads.items():
        if name in frozen:
            assert grad is None
        else:
            assert grad is not None and torch.isfinite(grad).all(), name
    assert grads["layers.1.conv.aggr_module.t"].abs() > 0  # the temperature learns


def test_single_patch_bag():
    model = create_method("patchgcn", in_dim=32).eval()
    out = model(graph_bag(n=1, slides=1))
    check_graph_output(out, 1)
    assert out.attention["attention"].scores.item() == pytest.approx(1.0)


def test_eval_is_deterministic_and_dropout_acts_only_in_training():
    torch.manual_seed(0)
    model = create_method("patchgcn", in_dim=32)
    bag = graph_bag()
    model.eval()
    assert torch.equal(model(bag).logits, model(bag).logits)
    model.train()
    a, b = seeded_outputs(model, bag, 1, 2)
    assert not torch.allclose(a, b)


def test_same_seed_same_model_and_output():
    bag = graph_bag()
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = create_method("patchgcn", in_dim=32).train()
        outs.append(model(bag).logits)
    assert torch.equal(outs[0], outs[1])


def test_the_graph_is_used_and_node_order_does_not_matter():
    torch.manual_seed(0)
    model = create_method("patchgcn", in_dim=32).eval()
    bag = graph_bag()
    base = model(bag).logits
    no_edges = Bag(bag.sample_id, bag.slide_ids, bag.features, bag.coords, bag.slide_index,
                   {"spatial": torch.zeros(2, 0, dtype=torch.long)})
    assert not torch.allclose(model(no_edges).logits, base, atol=1e-6)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    inverse = torch.argsort(perm)
    permuted = Bag(bag.sample_id, bag.slide_ids, {20: bag.features[20][perm]}, {20: bag.coords[20][perm]},
                   {20: bag.slide_index[20][perm]}, {"spatial": inverse[bag.edge_index["spatial"]]})
    out = model(permuted)
    assert torch.allclose(out.logits, base, atol=1e-5)
    assert torch.allclose(out.attention["attention"].scores, model(bag).attention["attention"].scores[perm], atol=1e-6)


def test_missing_graph_is_built_from_coordinates():
    torch.manual_seed(0)
    model = create_method("patchgcn", in_dim=32).eval()
    assert torch.equal(model(graph_bag(graph=False)).logits, model(graph_bag()).logits)


def test_activation_checkpointing_changes_neither_output_nor_gradients():
    bag = graph_bag()
    results = []
    for threshold in (None, 0):
        torch.manual_seed(0)
        model = create_method("patchgcn", in_dim=32, checkpoint_min_nodes=threshold).train()
        torch.manual_seed(1)
        out = model(bag)
        out.risk.sum().backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = results
    assert torch.allclose(la, lb, atol=1e-6)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=1e-4), name


def test_bad_options_and_empty_bag_are_refused():
    with pytest.raises(ValueError, match="edge_agg"):
        create_method("patchgcn", in_dim=32, edge_agg="radius")
    model = create_method("patchgcn", in_dim=32)
    with pytest.raises(ValueError, match="no patches"):
        model(graph_bag(n=0, slides=1, graph=False))
