"""ProtoSurv: output contract (NLL and Cox heads), prototype losses, tissue types, sampling, 50k-node bag."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from benchmark.data.bag import Bag
from benchmark.data.graphs import build_graph
from benchmark.api.registry import count_parameters, create_method, get_method_spec, method_names
from methods.protosurv import compatibility_loss, orthogonality_loss, pseudo_tissue_types
from tests.helpers import assert_attention_follows_permutation, assert_eval_in_bounded_memory, check_survival_output

#: Narrow prototype width for the large-bag test (the published 768 is covered by the parameter count).
SMALL = dict(proto_dim=48, proto_mlp_hidden=32, hidden=16)


def make_bag(n: int, in_dim: int = 16, seed: int = 0, n_slides: int = 1, with_types: bool = True) -> Bag:
    g = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 50_000, (n, 2), generator=g)
    slide_index = torch.randint(0, n_slides, (n,), generator=g)
    return Bag(
        sample_id=f"bag{n}",
        slide_ids=tuple(f"slide{i}" for i in range(n_slides)),
        features={20: torch.randn(n, in_dim, generator=g)},
        coords={20: coords},
        slide_index={20: slide_index},
        edge_index={"spatial": build_graph(coords, slide_index, k=4)},
        tissue_type=torch.randint(0, 5, (n,), generator=g) if with_types else None,
    )


def test_registration():
    nll, cox = get_method_spec("protosurv"), get_method_spec("protosurv_cox")
    assert nll.loss == "nll" and nll.in_all and cox.loss == "cox" and not cox.in_all
    assert nll.needs.graph == ("spatial",) and nll.needs.tissue_types and nll.needs.coords and nll.needs.graph_k == 4
    assert "protosurv" in method_names(only_in_all=True) and "protosurv_cox" not in method_names(only_in_all=True)


@pytest.mark.parametrize(
    "name, in_dim, expected",
    [("protosurv", 1024, 52_070_279), ("protosurv", 1536, 62_098_311), ("protosurv_cox", 1024, 52_067_971)],
)
def test_parameter_count(name, in_dim, expected):
    with torch.device("meta"):
        model = create_method(name, in_dim=in_dim, n_bins=4)
    assert count_parameters(model) == expected


def test_nll_output_contract():
    torch.manual_seed(0)
    model = create_method("protosurv", in_dim=16, **SMALL).eval()
    out = model(make_bag(200, n_slides=2))
    check_survival_output(out)
    assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    amap = out.attention["attention"]
    assert amap.magnification == 20 and amap.scores.shape == (200,)
    assert torch.isclose(amap.scores.sum(), torch.tensor(1.0), atol=1e-5) and torch.all(amap.scores > 0)


def test_cox_head_returns_log_risk():
    torch.manual_seed(0)
    model = create_method("protosurv_cox", in_dim=16, **SMALL).eval()
    out = model(make_bag(100))
    assert out.is_cox and out.logits is None and out.risk.shape == (1,) and out.aux_loss is not None
    assert model.classifier.bias is None and model.classifier.out_features == 1


def test_attention_map_follows_row_permutation():
    torch.manual_seed(0)
    model = create_method("protosurv", in_dim=16, **SMALL).eval()
    bag = make_bag(150)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(1))
    new_row = torch.empty_like(perm)
    new_row[perm] = torch.arange(150)
    permuted = Bag(
        "p",
        ("s",),
        {20: bag.features[20][perm]},
        coords={20: bag.coords[20][perm]},
        edge_index={"spatial": new_row[bag.edge_index["spatial"]]},
        tissue_type=bag.tissue_type[perm],
    )
    assert_attention_follows_permutation(model, bag, permuted, perm)


def test_dropout_and_node_sampling_only_in_training():
    torch.manual_seed(0)
    model = create_method("protosurv", in_dim=16, max_nodes=50, **SMALL)
    bag = make_bag(200)
    model.eval()
    with torch.no_grad():
        first, second = model(bag), model(bag)
    assert torch.equal(first.logits, second.logits)
    assert torch.all(first.attention["attention"].scores > 0)  # every node attended at evaluation
    model.train()
    with torch.no_grad():
        a, b = model(bag), model(bag)
    assert not torch.equal(a.logits, b.logits)
    assert int((a.attention["attention"].scores > 0).sum()) == 50  # at most max_nodes drawn in training


def test_one_patch_bag_without_edges():
    model = create_method("protosurv", in_dim=16, **SMALL).eval()
    bag = make_bag(1)
    assert bag.edge_index["spatial"].shape == (2, 0)
    out = model(bag)
    assert torch.isfinite(out.risk).all() and torch.isfinite(out.aux_loss)
    assert out.attention["attention"].scores.tolist() == [pytest.approx(1.0)]


def test_gradient_reaches_prototypes_and_graph():
    torch.manual_seed(0)
    model = create_method("protosurv", in_dim=16, **SMALL).train()
    out = model(make_bag(120))
    (out.risk.sum() + out.aux_loss).backward()
    for param in (model.proto_offsets, model.proto_log_sigma, model.proto_mlp[0].weight, model.refine[0].to_k.weight,
                  model.fusion[-1].to_q.weight, model.pre_fc[0].weight, model.first_conv.aggr_module.t, model.mlp_comp[0].weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_pseudo_types_when_bag_has_none():
    bag = make_bag(300, with_types=False)
    types = pseudo_tissue_types(bag.features[20])
    assert torch.equal(types, pseudo_tissue_types(bag.features[20]))  # seeded
    sizes = torch.bincount(types, minlength=5)
    assert types.min() >= 0 and types.max() <= 4 and torch.all(sizes[:-1] >= sizes[1:])  # numbered by size
    model = create_method("protosurv", in_dim=16, **SMALL).eval()
    with torch.no_grad():
        assert torch.equal(model(bag).risk, model(bag).risk)


def test_bad_tissue_types_raise_clearly():
    model = create_method("protosurv", in_dim=16, **SMALL)
    bag = make_bag(20)
    bag.tissue_type = torch.full((20,), 7)
    with pytest.raises(ValueError, match="outside 0..4"):
        model(bag)
    bag.tissue_type = torch.zeros(19, dtype=torch.long)
    with pytest.raises(ValueError, match="19 tissue types for 20 patches"):
        model(bag)


def test_compatibility_loss_prefers_prototypes_near_their_type():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=g) * 5
    types = torch.arange(5).repeat(20)
    feats = centres[types] + 0.1 * torch.randn(100, 8, generator=g)
    right = centres.repeat_interleave(3, dim=0)  # 3 prototypes per type, type-major
    wrong = centres.roll(1, dims=0).repeat_interleave(3, dim=0)
    assert compatibility_loss(feats, right, types, 5) < compatibility_loss(feats, wrong, types, 5)


@pytest.mark.parametrize("impl", ["small_gram", "official"])
def test_orthogonality_loss(impl):
    assert orthogonality_loss(torch.eye(6), impl) == pytest.approx(0.0, abs=1e-6)
    rank_one = torch.ones(6, 6)
    assert orthogonality_loss(rank_one, impl) == pytest.approx(math.sqrt(2 - 2 / math.sqrt(6)), abs=1e-6)
    # 4 P <= D: the small Gram; rows orthonormal, so G / ||G|| = I_P-block / sqrt(P) (known answer)
    rows = torch.eye(24)[:6]
    assert orthogonality_loss(rows, impl) == pytest.approx(math.sqrt(2 - 2 * math.sqrt(6 / 24)), abs=1e-6)


@pytest.mark.parametrize("shape", [(40, 1024), (40, 160), (3, 12)])
def test_orthogonality_small_gram_equals_the_official_form(shape):
    """Value and gradient of the P x P form (used while 4 P <= D) equal the official D x D Gram's in float64
    (1e-12 value, 1e-10 gradient); in float32 they are within 1e-5 (value) and 1e-4 + 1e-6 (gradient) of the
    float64 truth."""
    torch.manual_seed(0)
    s64 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    values, grads = {}, {}
    for impl in ("small_gram", "official"):
        for dtype in (torch.float64, torch.float32):
            s = s64.detach().to(dtype).requires_grad_()
            loss = orthogonality_loss(s, impl)
            loss.backward()
            values[impl, dtype], grads[impl, dtype] = loss.detach().double(), s.grad.double()
    truth, truth_grad = values["official", torch.float64], grads["official", torch.float64]
    torch.testing.assert_close(values["small_gram", torch.float64], truth, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads["small_gram", torch.float64], truth_grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(values["small_gram", torch.float32], truth, rtol=1e-5, atol=0)
    torch.testing.assert_close(grads["small_gram", torch.float32], truth_grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="orthogonality_impl"):
        orthogonality_loss(s64, "fast")


def test_fifty_thousand_nodes_in_bounded_memory():
    torch.manual_seed(0)
    model = create_method("protosurv", in_dim=8, **SMALL).eval()
    bag = make_bag(50_000, in_dim=8, n_slides=2)
    assert_eval_in_bounded_memory(model, bag)


def test_tissue_type_source_is_chosen_and_recorded(tiny_root):
    """Synthetic true tissue types are privileged: read only with tissue_types="truth"; by default a real user's
    choice (a file when present, else k-means) and the record says which."""
    from benchmark.data.loader import load_cohort

    cohort = load_cohort("blca", data_root=tiny_root, backbone="resnet50")
    sample = cohort.folds[0].val[0]
    bag = cohort.bag(sample, get_method_spec("protosurv").needs)
    assert bag.tissue_source == "synthetic-truth" and bag.tissue_type is not None
    used = {}
    for source in ("file", "kmeans", "truth"):
        model = create_method("protosurv", in_dim=cohort.in_dim, tissue_types=source).eval()
        with torch.no_grad():
            model(bag)
        used[source] = model.tissue_types_used
    assert used == {"file": {"kmeans"}, "kmeans": {"kmeans"}, "truth": {"synthetic-truth"}}
    real = dataclasses.replace(bag, tissue_source="file")
    model = create_method("protosurv", in_dim=cohort.in_dim).eval()
    with torch.no_grad():
        model(real)
    assert model.tissue_types_used == {"file"}
    with pytest.raises(ValueError, match="tissue_types must be one of"):
        create_method("protosurv", in_dim=cohort.in_dim, tissue_types="guess")
    with pytest.raises(ValueError, match="no tissue types"):
        create_method("protosurv", in_dim=cohort.in_dim, tissue_types="truth")(dataclasses.replace(bag, tissue_type=None))
