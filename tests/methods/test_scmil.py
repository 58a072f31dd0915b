"""SCMIL: output contract, clustered-window attention, k-means, memory on a 50k-patch bag."""
from __future__ import annotations

import pytest
import torch

from benchmark.data.bag import Bag
from benchmark.api.registry import count_parameters, create_method, get_method_spec
from methods._layers import kmeans
from methods.scmil import SCMIL, ClusterLocalAttention, window_sizes
from tests.helpers import assert_attention_follows_permutation, assert_eval_in_bounded_memory, check_survival_output


def make_bag(n: int, in_dim: int = 16, seed: int = 0, n_slides: int = 1) -> Bag:
    g = torch.Generator().manual_seed(seed)
    return Bag(
        sample_id=f"bag{n}",
        slide_ids=tuple(f"slide{i}" for i in range(n_slides)),
        features={20: torch.randn(n, in_dim, generator=g)},
        coords={20: torch.randint(0, 50_000, (n, 2), generator=g)},
        slide_index={20: torch.randint(0, n_slides, (n,), generator=g)},
    )


def blob_bag(n_blobs: int = 4, per_blob: int = 64, in_dim: int = 16, seed: int = 0) -> tuple[Bag, torch.Tensor]:
    """Well-separated feature blobs (k-means recovers them from any start), with their blob label per row."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_blobs, in_dim, generator=g) * 20
    blob = torch.arange(n_blobs).repeat_interleave(per_blob)
    feats = centres[blob] + 0.1 * torch.randn(len(blob), in_dim, generator=g)
    coords = torch.randint(0, 1000, (len(blob), 2), generator=g)
    return Bag("blobs", ("s",), {20: feats}, coords={20: coords}), blob


def keep_everything(model: SCMIL) -> SCMIL:
    """Make the SoftFilter keep every patch (score ~1), so the clustered attention sees the whole bag."""
    with torch.no_grad():
        model.soft_filter.score[2].weight.zero_()
        model.soft_filter.score[2].bias.fill_(20.0)
    return model


def test_registered_with_coords():
    spec = get_method_spec("scmil")
    assert spec.needs.coords and spec.needs.magnifications == (20,) and spec.loss == "nll"


@pytest.mark.parametrize("in_dim, expected", [(1024, 4_990_214), (512, 1_447_174), (384, 889_094)])
def test_parameter_count(in_dim, expected):
    with torch.device("meta"):
        model = create_method("scmil", in_dim=in_dim, n_bins=4)
    assert count_parameters(model) == expected


def test_output_contract_and_attention_rows():
    torch.manual_seed(0)
    model = create_method("scmil", in_dim=16).eval()
    bag = make_bag(300, n_slides=2)
    out = model(bag)
    check_survival_output(out)
    for name in ("attention", "soft_filter"):
        amap = out.attention[name]
        assert amap.magnification == 20 and amap.scores.shape == (300,)
    assert torch.isclose(out.attention["attention"].scores.sum(), torch.tensor(1.0), atol=1e-5)


def test_attention_map_follows_row_permutation():
    torch.manual_seed(0)
    bag, _ = blob_bag()
    model = keep_everything(create_method("scmil", in_dim=16)).eval()
    perm = torch.randperm(bag.num_patches(), generator=torch.Generator().manual_seed(1))
    permuted = Bag("p", ("s",), {20: bag.features[20][perm]}, coords={20: bag.coords[20][perm]})
    assert_attention_follows_permutation(model, bag, permuted, perm)


def test_attention_stays_inside_clusters():
    torch.manual_seed(0)
    bag, blob = blob_bag()
    layer = ClusterLocalAttention(16, cluster_size=64, dropout=0.0).eval()
    x, xy = bag.features[20], bag.coords[20].float()
    changed = x.clone()
    changed[0] += 1.0  # a token of blob 0
    with torch.no_grad():
        before, after = layer(x, xy), layer(changed, xy)
    others = blob != 0
    assert torch.allclose(before[others], after[others], atol=1e-6)
    assert not torch.allclose(before[~others][1:], after[~others][1:])


def test_windows_never_span_slides():
    layer = ClusterLocalAttention(16, cluster_size=8)
    bag = make_bag(200, n_slides=2)
    labels = layer.cluster(bag.features[20], bag.coords[20], bag.slide_index[20])
    first = set(labels[bag.slide_index[20] == 0].tolist())
    second = set(labels[bag.slide_index[20] == 1].tolist())
    assert first and second and not first & second


def test_window_sizes_split_large_clusters_like_official():
    sizes = window_sizes(torch.tensor([1, 127, 128, 200, 0]), cluster_size=64)
    assert sizes.tolist() == [1, 127, 64, 64, 67, 67, 66]


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = keep_everything(create_method("scmil", in_dim=16))
    bag = make_bag(400)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(bag).logits, model(bag).logits)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(bag).logits, model(bag).logits)


def test_one_patch_bag():
    model = create_method("scmil", in_dim=16).eval()
    out = model(make_bag(1))
    assert torch.isfinite(out.risk).all()
    assert out.attention["attention"].scores.tolist() == [pytest.approx(1.0)]


def test_empty_bag_and_bad_dim_raise_clearly():
    with pytest.raises(ValueError, match="no 20x patches"):
        create_method("scmil", in_dim=16)(make_bag(0))
    with pytest.raises(ValueError, match="not divisible"):
        create_method("scmil", in_dim=12)


def test_gradient_reaches_soft_filter_and_attention():
    torch.manual_seed(0)
    model = create_method("scmil", in_dim=16).train()
    out = model(make_bag(500))
    out.risk.sum().backward()
    assert model.soft_filter.score[0].weight.grad.abs().sum() > 0
    assert model.cluster_attention.to_qkv.weight.grad.abs().sum() > 0


def test_kmeans_recovers_blobs_and_is_seeded():
    bag, blob = blob_bag(n_blobs=6, per_blob=50)
    labels = kmeans(bag.features[20], 6, seed=3)
    # Same partition as the planted blobs (labels may be renamed).
    pairs = set(zip(blob.tolist(), labels.tolist()))
    assert len(pairs) == 6 and len({p[1] for p in pairs}) == 6
    points = torch.randn(3000, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kmeans(points, 40, seed=1), kmeans(points, 40, seed=1))
    assert not torch.equal(kmeans(points, 40, seed=1), kmeans(points, 40, seed=2))
    assert kmeans(points[:1], 5).tolist() == [0]


def test_fifty_thousand_patches_in_bounded_memory():
    torch.manual_seed(0)
    model = create_method("scmil", in_dim=8).eval()
    bag = make_bag(50_000, in_dim=8)
    assert_eval_in_bounded_memory(model, bag)


def test_weights_saved_under_the_official_pooling_names_load():
    """The pooling is the shared GatedAttention; a state dict with the official ``Attn_Net_Gated`` names
    (``attention_a/b/c``) loads into the same parameters."""
    torch.manual_seed(0)
    model = SCMIL(in_dim=8)
    renamed = {k.replace("pool.tanh_branch.", "pool.attention_a.").replace("pool.sigmoid_branch.", "pool.attention_b.")
               .replace("pool.score.", "pool.attention_c."): v.clone() + 1 for k, v in model.state_dict().items()}
    assert any(k.startswith("pool.attention_a.") for k in renamed)
    other = SCMIL(in_dim=8)
    other.load_state_dict(renamed)
    assert torch.equal(other.pool.score.weight, model.pool.score.weight + 1)
