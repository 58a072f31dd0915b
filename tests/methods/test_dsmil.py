"""DSMIL: parameter count, official initialisation, the two streams, and the computation itself."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.data.bag import Bag
from benchmark.fitting.losses import survival_loss
from benchmark.api.registry import count_parameters, create_method
from tests.helpers import assert_dropout_only_in_training, features_bag

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parameter_count_crossfusion_configuration():
    # Linear(1024->4) 4,100 + query 131,200 + 16,512 + Conv1d(4, 4, 1024) 16,388
    assert count_parameters(create_method("dsmil", in_dim=1024, n_bins=4)) == 168_200
    assert count_parameters(create_method("dsmil", in_dim=1024, n_bins=4, nonlinear=False)) == 168_200 - 16_512
    # passing_v adds Linear(K -> K); checked at K = 64 (an orthogonal 1024 x 1024 init is slow on CPU)
    base = count_parameters(create_method("dsmil", in_dim=64))
    assert count_parameters(create_method("dsmil", in_dim=64, passing_v=True)) == base + 64 * 64 + 64


def test_official_orthogonal_init():
    torch.manual_seed(0)
    model = create_method("dsmil", in_dim=64, n_bins=4)
    w = model.instance_classifier.weight  # (4, 64): orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(4), atol=1e-5, rtol=0)
    w = model.query[0].weight  # (128, 64): orthonormal columns
    torch.testing.assert_close(w.T @ w, torch.eye(64), atol=1e-5, rtol=0)
    for module in (model.instance_classifier, model.query[0], model.query[2], model.bag_head):
        assert torch.count_nonzero(module.bias) == 0


def reference_forward(model, feats: torch.Tensor):
    """The early official loop over classes (sort descending, take row 0), written independently."""
    inst = model.instance_classifier(feats)
    queries = model.query(feats)
    columns, embeddings = [], []
    for c in range(inst.shape[1]):
        order = torch.sort(inst[:, c], descending=True).indices
        q_max = model.query(feats[order[0]].view(1, -1))
        a = F.softmax(queries @ q_max.view(-1, 1) / math.sqrt(queries.shape[1]), dim=0)  # (N, 1)
        columns.append(a)
        embeddings.append((a * feats).sum(0))
    bag = model.bag_head(torch.stack(embeddings).unsqueeze(0)).view(1, -1)
    return bag, inst.max(0).values.view(1, -1), torch.cat(columns, 1)


def test_matches_reference_computation():
    torch.manual_seed(1)
    model = create_method("dsmil", in_dim=32, n_bins=4).eval()
    bag = features_bag(57, 32)
    out = model(bag)
    bag_logits, max_logits, attention = reference_forward(model, bag.features[20])
    torch.testing.assert_close(out.logits, bag_logits)
    torch.testing.assert_close(out.aux_logits[0], max_logits)
    torch.testing.assert_close(out.attention["attention"].scores, attention.mean(1))
    assert float(out.attention["attention"].scores.sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("streams", ["both", "bag"])
def test_instance_classifier_learns_only_with_both_streams(streams):
    torch.manual_seed(2)
    model = create_method("dsmil", in_dim=16, n_bins=4, streams=streams).train()
    out = model(features_bag(30, 16))
    assert len(out.aux_logits) == (1 if streams == "both" else 0)
    survival_loss(out, bin_index=2, censorship=0.0).backward()
    grad = model.instance_classifier.weight.grad
    if streams == "both":
        assert grad is not None and float(grad.abs().sum()) > 0
    else:  # the CrossFusion copy's flaw: argmax passes no gradient
        assert grad is None
    assert float(model.bag_head.weight.grad.abs().sum()) > 0


def test_loss_is_mean_of_bag_and_max_stream():
    torch.manual_seed(3)
    model = create_method("dsmil", in_dim=16, n_bins=4)
    out = model(features_bag(20, 16))
    bag_only = create_method("dsmil", in_dim=16, n_bins=4, streams="bag")
    bag_only.load_state_dict(model.state_dict())
    out_bag = bag_only(features_bag(20, 16))
    torch.testing.assert_close(out.risk, out_bag.risk)  # risk from the bag stream in both settings
    y, c = 1, 1.0
    from dataclasses import replace

    max_only = replace(out, logits=out.aux_logits[0], aux_logits=())
    expected = 0.5 * survival_loss(out_bag, y, c) + 0.5 * survival_loss(max_only, y, c)
    torch.testing.assert_close(survival_loss(out, y, c), expected)


def test_value_dropout_only_in_training():
    torch.manual_seed(4)
    model = create_method("dsmil", in_dim=16, n_bins=4, passing_v=True, dropout_v=0.5)
    assert_dropout_only_in_training(model, features_bag(25, 16))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="dsmil.py.*streams"):
        create_method("dsmil", in_dim=16, streams="max")
    model = create_method("dsmil", in_dim=16)
    with pytest.raises(ValueError, match="dsmil.py.*shape"):
        model(features_bag(5, 8))
    with pytest.raises(ValueError, match="dsmil.py.*20x"):
        model(Bag(sample_id="s", slide_ids=("a",), features={10: torch.randn(3, 16)}))
