"""CrossFusion and its ablations: official parameter counts and initialisation, memory-bounded attention
(chunked == fused, no full matrix), dropout only in training, attention maps aligned with the bag rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmark.data.bag import Bag
from benchmark.api.registry import count_parameters, create_method, get_method_spec
from methods import _crossfusion_blocks as blocks
from tests.helpers import seeded_outputs

SMALL = dict(embed_dim=32, num_heads=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_bag(in_dim: int = 16, n5: int = 5, n10: int = 18, n20: int = 70, seed: int = 0) -> Bag:
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n, in_dim, generator=g) for m, n in ((5, n5), (10, n10), (20, n20))}
    return Bag(sample_id="s0", slide_ids=("slide0",), features=feats)


def small_model(name: str = "crossfusion", in_dim: int = 16, seed: int = 0, **options):
    torch.manual_seed(seed)
    return create_method(name, in_dim=in_dim, **{**SMALL, **options})


# ------------------------------------------------------------------------------------------- registry, shapes
@pytest.mark.parametrize(
    "name, in_dim, expected",
    [
        ("crossfusion", 2048, 24_536_584),
        ("crossfusion", 1536, 23_750_152),
        ("crossfusion", 1024, 22_963_720),
        ("crossfusion", 768, 22_570_504),
        ("crossfusion", 512, 21_386_248),
        ("crossfusion_wo_cp", 2048, 25_147_908),
        ("crossfusion_wo_fc", 2048, 9_730_564),
    ],
)
def test_parameter_counts_equal_the_official_implementation(name, in_dim, expected):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = create_method(name, in_dim=in_dim)
    assert count_parameters(model) == expected


def test_needs():
    assert get_method_spec("crossfusion").needs.magnifications == (5, 10, 20)
    assert get_method_spec("crossfusion_wo_cp").needs.magnifications == (5, 10, 20)
    assert get_method_spec("crossfusion_wo_fc").needs.magnifications == (20,)


def test_seeded_model_reproduces_the_official_code():
    """Golden logits of the official ``models/CrossFusion.py`` (run once on CPU with its attention dropout set
    to 0, eval mode) for ``torch.manual_seed(123)``, ``CrossFusion(embed_dim=64, num_heads=4, num_layers=1,
    backbone_dim=96)`` and the bag below: same module order, initialisation and forward pass."""
    torch.manual_seed(123)
    model = create_method("crossfusion", in_dim=96, embed_dim=64).eval()
    g = torch.Generator().manual_seed(1)
    f5, f10, f20 = (torch.randn(n, 96, generator=g) for n in (6, 21, 83))
    with torch.no_grad():
        out = model(Bag("x", ("a",), {5: f5, 10: f10, 20: f20}))
    official = torch.tensor([[0.029105136170983315, 0.2369794398546219, 0.10229567438364029, -0.12998634576797485]])
    torch.testing.assert_close(out.logits, official, atol=1e-5, rtol=1e-4)


def test_initialisation_follows_the_official_code():
    model = small_model(in_dim=48)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.all(module.bias == 0)
            if module.weight.numel() >= 1024:  # trunc_normal(std=0.02), not PyTorch's kaiming_uniform default
                assert 0.016 < module.weight.std() < 0.024, module
        elif isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            assert torch.all(module.bias == 0)
    assert model.cls_token.abs().max() < 1e-4  # normal(std=1e-6)
    assert 0.01 < model.fine_cross.cross_attn.scale_embeddings.std() < 0.03  # trunc_normal(std=0.02)
    dw7 = model.coarse_transformer.ppeg.proj.weight  # kaiming_normal fan_out: std sqrt(2 / (D * 49))
    assert 0.6 < dw7.std() / (2 / (32 * 49)) ** 0.5 < 1.4
    assert model.conv_processor.conv3d.weight.numel() == 3  # 1x1x1 Conv3d over the 3 scales (+1 bias)


@pytest.mark.parametrize("name", ["crossfusion", "crossfusion_wo_cp", "crossfusion_wo_fc"])
@pytest.mark.parametrize("n10", [1, 2, 3, 17])
def test_forward_backward_every_parameter_gets_a_gradient(name, n10):
    model = small_model(name).train()
    out = model(make_bag(n10=n10, n5=max(1, n10 // 4), n20=4 * n10))
    assert out.logits.shape == (1, 4) and out.risk.shape == (1,)
    torch.testing.assert_close(out.risk, -out.survival.sum(dim=1))
    out.logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_wo_fc_reads_only_20x():
    model = small_model("crossfusion_wo_fc").eval()
    bag = make_bag()
    only20 = Bag("s0", ("slide0",), {20: bag.features[20]})
    torch.testing.assert_close(model(bag).logits, model(only20).logits)


def test_bad_input_names_the_file_and_problem():
    model = small_model()
    bag = make_bag()
    del bag.features[5]
    with pytest.raises(ValueError, match=r"crossfusion\.py.*5x"):
        model(bag)
    with pytest.raises(ValueError, match=r"crossfusion\.py.*expected \(N >= 1, 16\)"):
        model(make_bag(in_dim=8))
    with pytest.raises(ValueError, match="attention_backend"):
        create_method("crossfusion", in_dim=16, attention_backend="flash", **SMALL)


@pytest.mark.parametrize("name", ["crossfusion", "crossfusion_wo_cp", "crossfusion_wo_fc"])
def test_the_three_variants_share_one_options_object(name):
    """One ``CrossFusionOptions`` carries every option of the three variants: validated once, unknown names
    refused with a suggestion, and the same names checked before any cell (``--method-option``)."""
    from benchmark.api.registry import check_method_options
    from methods.crossfusion import CrossFusionOptions

    model = small_model(name, num_layers=2, attn_dropout=0.1)
    assert model.options == CrossFusionOptions(embed_dim=32, num_heads=4, num_layers=2, attn_dropout=0.1)
    assert model.attention_settings.attn_dropout == 0.1
    assert len(model.final_transformer.pre_layers.layers) == 2
    with pytest.raises(KeyError, match="Did you mean 'embed_dim'"):
        create_method(name, in_dim=16, embd_dim=32)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        create_method(name, in_dim=16, embed_dim=30, num_heads=4)
    check_method_options(name, {"num_layers": 2, "dropout_impl": "torch"})
    with pytest.raises(ValueError, match=r"takes no option 'attn_dropot' \(did you mean 'attn_dropout'"):
        check_method_options(name, {"attn_dropot": 0.1})
    with pytest.raises(ValueError, match="takes no option 'fusion'"):
        check_method_options(name, {"fusion": "concat"})


# ------------------------------------------------------------------------------------------- dropout placement
def test_attention_dropout_only_in_training_unless_official_option():
    bag = make_bag()
    model = small_model(dropout=0.0).eval()  # only the attention dropout (0.2) can make outputs random
    torch.testing.assert_close(model(bag).logits, model(bag).logits, rtol=0, atol=0)
    model.official_eval_dropout = True
    a, b = seeded_outputs(model, bag, 1, 2)
    assert not torch.allclose(a, b)
    model.official_eval_dropout = False
    model.train()
    a, b = seeded_outputs(model, bag, 1, 2)
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------------------------------- bounded attention
def _qkv(n=37, m=53, heads=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, length, d, generator=g, requires_grad=True) for length in (n, m, m)]


def test_chunked_attention_equals_fused_sdpa_with_gradients():
    q, k, v = _qkv()
    grad_out = torch.randn(1, 4, 37, 8)
    ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    block = 4 * 5 * 53 * 4  # 5 query rows per chunk: 8 chunks, the last one short
    out = blocks.chunked_attention(q, k, v, dropout_p=0.0, block_bytes=block)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_checkpointed_chunks_replay_the_same_dropout_mask():
    q, k, v = _qkv()
    grad_out = torch.randn(1, 4, 37, 8)
    results = []
    for use_checkpoint in (True, False):
        torch.manual_seed(7)
        out = blocks.chunked_attention(q, k, v, dropout_p=0.3, block_bytes=4 * 6 * 53 * 4, use_checkpoint=use_checkpoint)
        results.append((out, torch.autograd.grad(out, (q, k, v), grad_out)))
    (out_ckpt, g_ckpt), (out_plain, g_plain) = results
    torch.testing.assert_close(out_ckpt, out_plain)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b)
    # dropout really acted: differs from the no-dropout result
    assert not torch.allclose(out_plain, F.scaled_dot_product_attention(q, k, v))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_training_with_dropout_on_cpu_never_materialises_a_full_attention_matrix():
    n, heads = 300, 4
    q, k, v = _qkv(n=n, m=n, heads=heads)
    block = heads * 16 * n * 4  # 16 query rows
    with _LargestTensor() as mode:
        out = blocks.attention(q, k, v, dropout_p=0.2, block_bytes=block)
        out.sum().backward()
    assert q.grad is not None and k.grad is not None
    assert mode.largest <= heads * 16 * n < heads * n * n
    with _LargestTensor() as mode:
        received = blocks.received_attention(q, k, block_bytes=block)
    assert mode.largest <= heads * 16 * n
    torch.testing.assert_close(received.sum(), torch.tensor(float(n)))


def _saved_activation_bytes(model, bag) -> int:
    """Bytes of distinct storages autograd keeps for the backward pass (checkpointed layers keep only inputs)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(bag)
    return sum(storages.values())


@pytest.mark.parametrize("name", ["crossfusion", "crossfusion_wo_cp", "crossfusion_wo_fc"])
def test_activation_checkpointing_gives_identical_numbers_with_less_stored(name):
    bag = make_bag(n5=12, n10=48, n20=190)
    results, saved = {}, {}
    for ckpt in (False, True):
        model = small_model(name, activation_checkpointing=ckpt).train()
        torch.manual_seed(3)  # same dropout masks (attention 0.2, FFN 0.3) in both runs
        out = model(bag)
        out.risk.sum().backward()
        results[ckpt] = (out.logits.detach(), [p.grad.clone() for p in model.parameters()])
        saved[ckpt] = _saved_activation_bytes(small_model(name, activation_checkpointing=ckpt).train(), bag)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert saved[True] < 0.5 * saved[False]


def test_activation_checkpointing_auto_only_above_the_threshold_and_only_in_training():
    settings = small_model(checkpoint_min_tokens=100).attention_settings
    assert settings.checkpoint_layer(101, training=True)
    assert not settings.checkpoint_layer(100, training=True)
    assert not settings.checkpoint_layer(10**6, training=False)
    with torch.no_grad():
        assert not settings.checkpoint_layer(10**6, training=True)
    assert not small_model(activation_checkpointing=False).attention_settings.checkpoint_layer(10**6, True)
    assert small_model(activation_checkpointing=True).attention_settings.checkpoint_layer(1, True)
    with pytest.raises(ValueError, match="checkpoint_min_tokens"):
        small_model(checkpoint_min_tokens=-1)


# ------------------------------------------------------------------------------------------- attention maps
def _naive_received(q, k):
    probs = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)  # (1, H, N, M)
    return probs.mean(dim=1)[0].sum(dim=0)


def test_received_attention_matches_the_full_matrix():
    q, k, _ = _qkv()
    torch.testing.assert_close(blocks.received_attention(q, k, block_bytes=4 * 3 * 53 * 4), _naive_received(q, k))


def test_fold_padding_attributes_copies_to_their_source():
    padded = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0])  # 5 real + copies of 0..3
    torch.testing.assert_close(blocks.fold_padding(padded, 5), torch.tensor([11.0, 22.0, 33.0, 44.0, 5.0]))
    x = torch.arange(5.0).view(1, 5, 1)
    padded_x, side = blocks.square_pad(x)
    assert side == 3 and padded_x[0, :, 0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]


def test_attention_maps_aligned_with_rows_and_exact():
    n5, n10, n20 = 5, 18, 70
    model = small_model().eval()
    bag = make_bag(n5=n5, n10=n10, n20=n20)
    captured = {}
    hook = model.fine_cross.cross_attn.register_forward_hook(lambda m, i, o: captured.update(x=i[0], c=i[1]))
    out = model(bag)
    hook.remove()
    maps = out.attention
    assert {k: (v.magnification, tuple(v.scores.shape)) for k, v in maps.items()} == {
        "coarse_cross": (5, (n5,)), "fine_cross": (20, (n20,)), "source_transformer": (10, (n10,)),
        "final_transformer": (10, (n10,)), "final_cls": (10, (n10,)),
    }
    side2 = 25  # ceil(sqrt(18))**2
    torch.testing.assert_close(maps["coarse_cross"].scores.sum(), torch.tensor(float(n10)))
    torch.testing.assert_close(maps["fine_cross"].scores.sum(), torch.tensor(float(n10)))
    torch.testing.assert_close(maps["source_transformer"].scores.sum(), torch.tensor(float(side2)))
    torch.testing.assert_close(maps["final_cls"].scores.sum(), torch.tensor(1.0) - 0 * 1, atol=0.05, rtol=0)
    assert (maps["final_cls"].scores >= 0).all()
    # fine cross map == naive full-matrix computation from the same q, k
    ca = model.fine_cross.cross_attn
    q = ca._split(ca.q_proj(captured["x"] + ca.scale_embeddings))
    k = ca._split(ca.k_proj(captured["c"] + ca.scale_embeddings))
    torch.testing.assert_close(maps["fine_cross"].scores, _naive_received(q, k).detach(), atol=1e-5, rtol=1e-5)


def test_attention_maps_policy():
    bag = make_bag()
    model = small_model()
    assert model.train()(bag).attention == {}  # default: not in training
    model.return_attention = True
    assert "fine_cross" in model.train()(bag).attention
    model.return_attention = None
    model.attention_map_max_pairs = 10  # size guard
    assert model.eval()(bag).attention == {}
    wo_fc = small_model("crossfusion_wo_fc").eval()
    maps = wo_fc(bag).attention
    assert set(maps) == {"source_transformer", "final_transformer", "final_cls"}
    assert all(m.magnification == 20 and m.scores.shape == (70,) for m in maps.values())


def test_predictions_skip_automatic_maps_and_keep_the_outputs():
    from benchmark.fitting.trainer import without_automatic_maps

    bag = make_bag()
    model = small_model().eval()
    with torch.no_grad():
        with_maps = model(bag)
        with without_automatic_maps(model):
            without = model(bag)
    assert "fine_cross" in with_maps.attention and without.attention == {}
    assert torch.equal(with_maps.logits, without.logits)  # maps are computed apart from the output
    assert model.return_attention is None  # the automatic choice is restored
    model.return_attention = True  # an explicit request is kept
    with without_automatic_maps(model):
        assert "fine_cross" in model(bag).attention


# ------------------------------------------------------------------------------------------- benchmark command
def test_reference_options_are_options_of_their_methods():
    from benchmark.api.registry import get_method_spec, method_names

    with_reference = {m for m in method_names() if get_method_spec(m).reference_options}
    assert with_reference >= {"crossfusion", "crossfusion_wo_cp", "crossfusion_wo_fc", "transmil", "protosurv"}
    for method in with_reference:
        options = get_method_spec(method).reference_options
        create_method(method, in_dim=8, n_bins=4, **options)  # an unknown option or value raises
        with pytest.raises((TypeError, ValueError)):
            create_method(method, in_dim=8, n_bins=4, **{name: "no-such-value" for name in options})


def test_bench_bag_follows_needs_and_sizes():
    from benchmark.data.bag import Needs
    from benchmark.perf.bench import bag_sizes, make_bag
    from benchmark.commands.bench import _parse_options

    assert bag_sizes(137_990) == (137_990, 34_498, 8_624)
    assert bag_sizes(100, n10=30, n5=7) == (100, 30, 7)
    bag = make_bag(Needs(magnifications=(5, 10, 20)), {20: 64, 10: 16, 5: 4}, in_dim=8)
    assert {m: tuple(f.shape) for m, f in bag.features.items()} == {5: (4, 8), 10: (16, 8), 20: (64, 8)}
    assert bag.edge_index == {} and bag.tissue_type is None
    graph_bag = make_bag(Needs(graph=("spatial", "latent"), graph_k=4, tissue_types=True), {20: 50}, in_dim=8)
    for kind in ("spatial", "latent"):
        edges = graph_bag.edge_index[kind]
        assert edges.shape == (2, 50 * 4) and bool((edges[0] != edges[1]).all())
    assert graph_bag.coords[20].shape == (50, 2) and graph_bag.tissue_type.shape == (50,)
    assert _parse_options("attn_dropout=0,official_eval_dropout=true,attention_backend=sdpa") == {
        "attn_dropout": 0, "official_eval_dropout": True, "attention_backend": "sdpa"}
    assert _parse_options("checkpoint_min_tokens=8192, activation_checkpointing=None,") == {
        "checkpoint_min_tokens": 8192, "activation_checkpointing": None}
    with pytest.raises(ValueError, match="--options expects key=value"):
        _parse_options("attn_dropout")


def test_wo_cp_registers_modules_in_the_official_order():
    """CrossFusionConcat registers ``pre_final_linear`` before ``final_transformer``: a seeded construction then
    draws the same weights as the official class."""
    from benchmark.api.registry import create_method

    names = [n.split(".")[0] for n, _ in create_method("crossfusion_wo_cp", in_dim=64).named_parameters()]
    order = list(dict.fromkeys(names))
    assert order.index("pre_final_linear") < order.index("final_transformer") < order.index("mlp_head")
    conv = list(dict.fromkeys(n.split(".")[0] for n, _ in create_method("crossfusion", in_dim=64).named_parameters()))
    assert conv.index("final_transformer") < conv.index("conv_processor") < conv.index("mlp_head")
