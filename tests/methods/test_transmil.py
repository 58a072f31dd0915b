"""TransMIL: parameter counts, module structure, the Nystrom package's alignment fix, padding and the map."""
from __future__ import annotations

import math
from importlib.metadata import version

import pytest
import torch
from nystrom_attention import NystromAttention

from benchmark.api.registry import count_parameters, create_method
from tests.helpers import assert_dropout_only_in_training, features_bag

pytestmark = pytest.mark.usefixtures("one_torch_thread")


#: Behaviour tests run a narrow model (8 heads x 8, 32 landmarks) to stay fast; the official width is
#: checked by the parameter-count and structure tests.
SMALL = {"dim": 64}


@pytest.mark.parametrize("in_dim, expected", [(1024, 2_673_172), (1536, 2_935_316), (512, 2_411_028)])
def test_parameter_count(in_dim, expected):
    assert count_parameters(create_method("transmil", in_dim=in_dim, n_bins=4)) == expected


def test_module_structure_matches_official():
    model = create_method("transmil", in_dim=64)
    for layer in (model.layer1, model.layer2):
        attn = layer.attn
        assert isinstance(attn, NystromAttention)
        assert (attn.heads, attn.num_landmarks, attn.pinv_iterations) == (8, 256, 6)
        assert attn.to_qkv.weight.shape == (3 * 512, 512) and attn.to_qkv.bias is None
        assert attn.res_conv.kernel_size == (33, 1) and attn.res_conv.groups == 8 and attn.res_conv.bias is None
        assert isinstance(attn.to_out[1], torch.nn.Dropout) and attn.to_out[1].p == 0.1
        assert layer.norm.normalized_shape == (512,)
    assert [c.kernel_size for c in (model.pos_layer.proj, model.pos_layer.proj1, model.pos_layer.proj2)] == [
        (7, 7), (5, 5), (3, 3)]
    assert model.pos_layer.proj.groups == 512
    assert model.cls_token.shape == (1, 1, 512) and "cls_token" in dict(model.named_parameters())


def test_nystrom_package_returns_aligned_rows():
    """>= 0.0.10 keeps the last n rows after front padding; 0.0.9 kept the first n (shifted by the pad)."""
    major_minor_patch = tuple(int(p) for p in version("nystrom-attention").split(".")[:3])
    assert major_minor_patch >= (0, 0, 10)
    torch.manual_seed(0)
    attn = NystromAttention(dim=16, dim_head=8, heads=2, num_landmarks=64, residual=True).eval()
    with torch.no_grad():
        attn.to_qkv.weight[:32].zero_()  # q = k = 0: uniform attention, so only the residual conv is local
    x = torch.zeros(1, 100, 16)  # 100 % 64 != 0: 28 pad rows in front
    x[0, 0] = torch.randn(16)
    with torch.no_grad():
        out = attn(x)[0]
    assert not torch.allclose(out[0], out[60])  # token 0 sees its own value through the residual conv
    torch.testing.assert_close(out[30], out[60])  # beyond the conv's reach every row is the same


def test_square_padding_and_class_token():
    torch.manual_seed(0)
    model = create_method("transmil", in_dim=16, **SMALL).eval()
    seen = {}
    model.pos_layer.register_forward_hook(lambda m, args, out: seen.update(shape=args[0].shape, side=args[1]))
    for n, side in [(1, 1), (2, 2), (5, 3), (17, 5), (300, 18)]:
        out = model(features_bag(n, 16))
        assert seen["shape"] == (1, 1 + side * side, SMALL["dim"]) and seen["side"] == side
        assert out.logits.shape == (1, 4)
        assert out.attention["attention"].scores.shape == (n,)


def test_attention_map_is_class_token_row_of_last_layer():
    torch.manual_seed(1)
    model = create_method("transmil", in_dim=16, nystrom_impl="package", **SMALL).eval()  # patches attn.forward
    captured = {}
    layer_forward = model.layer2.attn.forward

    def full_attention(x, **kwargs):  # the dense n x n Nystrom matrix, only for this small bag
        captured["attn"] = layer_forward(x, return_attn=True)[1]
        return layer_forward(x, **kwargs)

    model.layer2.attn.forward = full_attention
    n = 300
    with torch.no_grad():
        out = model(features_bag(n, 16))
    n_tokens = 1 + math.ceil(math.sqrt(n)) ** 2
    m = model.layer2.attn.num_landmarks
    pad = (m - n_tokens % m) % m
    expected = captured["attn"][0, :, pad, pad + 1 : pad + 1 + n].mean(0)
    torch.testing.assert_close(out.attention["attention"].scores, expected, atol=1e-5, rtol=1e-4)


def test_dropout_only_in_training():
    torch.manual_seed(2)
    model = create_method("transmil", in_dim=16, **SMALL)
    assert_dropout_only_in_training(model, features_bag(40, 16))


def test_class_token_follows_module_dtype_and_device():
    model = create_method("transmil", in_dim=16, **SMALL).double().eval()
    out = model(features_bag(10, 16, dtype=torch.float64))
    assert out.logits.dtype == torch.float64


def test_bad_input_is_named():
    model = create_method("transmil", in_dim=16, **SMALL)
    with pytest.raises(ValueError, match="transmil.py.*shape"):
        model(features_bag(5, 8))
    with pytest.raises(ValueError, match="transmil.py.*shape"):
        model(features_bag(0, 16))


def _train_step(n: int, impl: str, dim: int, seed: int = 3, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    model = create_method("transmil", in_dim=16, dim=dim, nystrom_impl=impl).to(dtype).train()
    torch.manual_seed(seed)  # the same dropout draws in both implementations
    out = model(features_bag(n, 16, dtype=dtype))
    out.logits.sum().backward()
    return out.logits.detach(), out.attention["attention"].scores, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("n, dim", [(5, 64), (52, 64), (300, 64), (52, 512)])  # 1, 3 and 11 tokens per landmark
def test_fast_nystrom_equals_the_package(n, dim):
    """Same logits, map and gradients as ``NystromAttention.forward``, in training mode with the same dropout
    draws (n = 52 at dim 512: a demo bag, 65 tokens padded to the 256 landmarks). In float64, so that the
    comparison is of the maths, not of float32 rounding (see the next test)."""
    fast, package = _train_step(n, "fast", dim), _train_step(n, "package", dim)
    for a, b in zip(fast[:2], package[:2]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for a, b in zip(fast[2], package[2]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_fast_nystrom_float32_is_within_1e_5_of_the_exact_step():
    """In float32 the package's 256 x 256 pseudo-inverse iteration loses digits (its value-convolution weight
    gradient is off by about 4e-3 of its scale on a demo bag); the fast path's float32 logits and gradients are
    within 1e-5 of the float64 step, relative to each tensor's largest entry."""
    exact = _train_step(52, "package", 512)
    fast = _train_step(52, "fast", 512, dtype=torch.float32)
    for a, b in zip([fast[0], *fast[2]], [exact[0], *exact[2]]):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_bad_nystrom_impl_is_named():
    with pytest.raises(ValueError, match="nystrom_impl"):
        create_method("transmil", in_dim=16, nystrom_impl="dense", **SMALL)


@pytest.mark.parametrize("n", [1, 7, 20, 32])  # 32 = the landmarks: no padding
def test_fast_nystrom_layer_equals_the_package_in_float64(n):
    """The padded-block pseudo-inverse is the package's iteration, not an approximation of it: outputs, the
    returned factors and every gradient agree to float64 rounding, with the same dropout draws."""
    from methods.transmil import nystrom_forward

    torch.manual_seed(0)
    attn = NystromAttention(dim=64, dim_head=8, heads=8, num_landmarks=32, dropout=0.1).double().train()
    x = torch.randn(1, n, 64, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(-1, 1, n * 64, dtype=torch.float64).reshape(1, n, 64)
    results = []
    for forward in (lambda: nystrom_forward(attn, x, return_attn_matrices=True),
                    lambda: attn(x, return_attn_matrices=True)):
        attn.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        out, factors = forward()
        (out * weights).sum().backward()
        results.append([out, *factors, x.grad, *(p.grad for p in attn.parameters())])
    for fast, package in zip(*results):
        torch.testing.assert_close(fast.detach(), package.detach(), atol=1e-12, rtol=1e-10)
