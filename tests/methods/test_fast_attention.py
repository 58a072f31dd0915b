"""The fast CPU paths of CrossFusion (``dropout_impl="fast"``, ``channels_last=True``) against the plain PyTorch
reference: equal to 1e-5 in outputs and gradients with dropout off (and with dropout on, given the same mask);
the fast dropout keeps dropout's distribution (keep rate, exact rescale, independent entries); seeded runs are
bit-reproducible. Also the efficiency counters of ``benchmark/perf/bench.py``."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.data.bag import Bag
from benchmark.api.registry import create_method
from methods import _fast_attention as fa
from methods import _fused_dropout as fu

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(embed_dim=32, num_heads=4)
REFERENCE = dict(attention_backend="sdpa", dropout_impl="torch", channels_last=False)


def _qkv(g=4, n=37, m=53, d=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(g, length, d, generator=gen, dtype=dtype, requires_grad=True) for length in (n, m, m)]


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------- attention function
@pytest.mark.parametrize("block_rows", [5, 37])  # several chunks (the last one short), one chunk
def test_fast_attention_without_dropout_equals_sdpa(block_rows):
    q, k, v = _qkv()
    grad_out = torch.randn(4, 37, 8)
    ref = F.scaled_dot_product_attention(q, k, v)
    out = fa.DropoutAttention.apply(q, k, v, 0.0, 4 * block_rows * 53 * 4, 0)
    _assert_close(out, ref)
    for a, b in zip(_grads(out, (q, k, v), grad_out), _grads(ref, (q, k, v), grad_out)):
        _assert_close(a, b)


def _chunk_masks(g, n, m, p, block_bytes, seed):
    """The masks the function draws: one per query chunk, in chunk order, from the seeded private generator."""
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, min(n, block_bytes // (g * m * 4)))
    return torch.cat([fa.drop_mask(g * min(rows, n - s), m, p, gen).view(g, -1, m) for s in range(0, n, rows)], 1)


@pytest.mark.parametrize("store_bytes", [2**30, 4 * 37 * 53 * 2, 0])  # everything, masks only, nothing
def test_fast_attention_with_dropout_equals_the_masked_math(store_bytes, monkeypatch):
    """Given its mask, the function is ``(softmax(q k^T / sqrt d) * keep / (1 - p)) v``, forward and backward,
    whether probabilities and masks are stored for the backward pass or recomputed there (masks from the seed)."""
    monkeypatch.setattr(fa, "STORE_BYTES", store_bytes)
    p, seed, block = 0.3, 123, 4 * 6 * 53 * 4
    q, k, v = _qkv()
    grad_out = torch.randn(4, 37, 8)
    out = fa.DropoutAttention.apply(q, k, v, p, block, seed)
    drop = _chunk_masks(4, 37, 53, p, block, seed)
    probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1)
    ref = (probs.masked_fill(drop, 0.0) / (1 - p)) @ v
    _assert_close(out, ref)
    for a, b in zip(_grads(out, (q, k, v), grad_out), _grads(ref, (q, k, v), grad_out)):
        _assert_close(a, b)


def test_fast_attention_keeps_uniform_probabilities_with_exact_rescale():
    """q = k = 0 makes every probability 1 / M; with v = identity the output is the dropped matrix itself:
    each entry is 0 or exactly fl(1/M) / (1 - p) scaled once, and about 1 - p of them are kept."""
    g, n, m, p = 2, 300, 256, 0.2
    q, k = torch.zeros(g, n, 4), torch.zeros(g, m, 4)
    v = torch.eye(m).expand(g, m, m).contiguous()
    torch.manual_seed(0)
    out = fa.dropout_attention(q.view(1, g, n, 4), k.view(1, g, m, 4), v.view(1, g, m, m), p, 2**20)
    kept_value = torch.tensor(1.0 / m) * (1.0 / (1.0 - p))
    kept = out != 0
    assert torch.equal(out[kept], kept_value.expand(int(kept.sum())))
    _assert_keep_rate(kept.flatten(), 1 - p)


# ------------------------------------------------------------------------------------------- mask distribution
def _assert_keep_rate(kept: torch.Tensor, rate: float, sigmas: float = 5.0):
    n = kept.numel()
    tol = sigmas * math.sqrt(rate * (1 - rate) / n)
    assert abs(kept.double().mean().item() - rate) < tol


@pytest.mark.parametrize("p", [0.2, 0.3, 0.5, 0.05])
def test_drop_mask_is_bernoulli_p_in_every_field(p):
    n_rows, n_cols = 1000, 4000  # 4e6 entries: 5 sigma is about 1e-3 of the rate
    drop = fa.drop_mask(n_rows, n_cols, p, torch.Generator().manual_seed(1))
    assert drop.shape == (n_rows, n_cols) and drop.dtype == torch.bool
    low, high = fa.drop_thresholds(p)
    assert abs((low + 2**15) / 2**16 - p) <= 2**-17 and abs(high / 2**15 - p) <= 2**-16
    for field in range(4):  # the four 16-bit fields of every 64-bit draw (the fourth has 15 bits)
        _assert_keep_rate(~drop.flatten()[field::4], 1 - p)


def test_drop_mask_entries_are_uncorrelated():
    """Neighbouring entries (same draw or adjacent draws, along rows and across rows) are uncorrelated."""
    n, p = 2000, 0.3
    x = fa.drop_mask(n, n, p, torch.Generator().manual_seed(2)).double()
    bound = 5.0 / n  # 5 sigma of a correlation estimated from n * n pairs
    for a, b in ((x[:, :-1], x[:, 1:]), (x[:, :-4], x[:, 4:]), (x[:-1], x[1:])):
        corr = torch.corrcoef(torch.stack((a.flatten(), b.flatten())))[0, 1].item()
        assert abs(corr) < bound, corr
    # and the masks of successive calls differ (the generator advances)
    gen = torch.Generator().manual_seed(3)
    assert not torch.equal(fa.drop_mask(64, 64, p, gen), fa.drop_mask(64, 64, p, gen))


@pytest.mark.parametrize("kernels", ["drop_mask", "fused"])
def test_fast_dropout_keeps_values_scaled_exactly_and_gradients_follow_the_mask(kernels, monkeypatch):
    """Both mask sources of the fast path: ``drop_mask`` (small calls) and the fused kernels (eager versions)."""
    if kernels == "fused":
        _eager_kernels(monkeypatch)
    p = 0.3
    x = torch.randn(500, 1000, requires_grad=True)
    torch.manual_seed(0)
    out = fa.fast_dropout(x, p, training=True)
    kept = out != 0
    assert torch.equal(out[kept], x[kept] * (1.0 / (1.0 - p)))
    _assert_keep_rate(kept.flatten(), 1 - p)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(grad, kept.float() * (1.0 / (1.0 - p)))
    assert fa.fast_dropout(x, p, training=False) is x


# ------------------------------------------------------------------------------------------- whole models
def _bag(in_dim=16, n5=6, n10=30, n20=110, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Bag("s0", ("slide0",), {m: torch.randn(n, in_dim, generator=g) for m, n in ((5, n5), (10, n10), (20, n20))})


def _step(name, bag, seed=0, **options):
    torch.manual_seed(0)
    model = create_method(name, in_dim=16, **{**SMALL, **options}).train()
    torch.manual_seed(seed)
    out = model(bag)
    out.risk.sum().backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["crossfusion", "crossfusion_wo_cp", "crossfusion_wo_fc"])
def test_fast_paths_equal_the_reference_with_dropout_off(name):
    bag = _bag()
    fast = _step(name, bag, dropout=0.0, attn_dropout=0.0)
    ref = _step(name, bag, dropout=0.0, attn_dropout=0.0, **REFERENCE)
    _assert_close(fast[0], ref[0])
    for a, b in zip(fast[1], ref[1]):
        _assert_close(a, b)


@pytest.mark.parametrize("name", ["crossfusion", "crossfusion_wo_fc"])
def test_seeded_training_steps_are_bit_reproducible(name):
    bag = _bag()
    first, second, other = _step(name, bag, seed=5), _step(name, bag, seed=5), _step(name, bag, seed=6)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert not torch.equal(first[0], other[0])  # dropout acts


def test_bad_dropout_impl_is_named():
    with pytest.raises(ValueError, match="dropout_impl"):
        create_method("crossfusion", in_dim=16, dropout_impl="cuda", **SMALL)


# ------------------------------------------------------------------------------------------- bench counters
def test_flop_count_of_attention_and_depthwise_convolutions():
    from benchmark.perf.bench import _conv_backward_flops, _flash_cpu_flops, count_flops, make_bag, sgemm_rate
    from benchmark.api.registry import get_method_spec

    assert _flash_cpu_flops((1, 4, 10, 8), (1, 4, 20, 8), (1, 4, 20, 8)) == 2 * 2 * 4 * 10 * 20 * 8
    # depthwise 3x3 on 512 channels: backward = input grad + weight grad = 2 x forward (groups respected)
    fwd = 2 * 512 * 9 * 16 * 16
    assert _conv_backward_flops((1, 512, 16, 16), (1, 512, 16, 16), (512, 1, 3, 3), None, 1, 1, 1, False, 0, 512,
                                (True, True, False)) == 2 * fwd
    bag = make_bag(get_method_spec("crossfusion_wo_fc").needs, {20: 64}, in_dim=16)
    flops = count_flops("crossfusion_wo_fc", SMALL, bag, "train")
    assert flops["counted_on"] == "meta" and 1.5 < flops["backward"] / flops["forward"] < 2.5
    assert sgemm_rate(64, repeats=1) > 0


def test_fast_paths_equal_the_reference_in_float64():
    """The reformulations (chunked attention, merged convolutions, the Conv3d as a weighted sum) are the same
    maths: in float64 the fast and reference paths agree far below float32's rounding, which in float32 puts
    some gradient entries of these tiny models near the 1e-5 tolerance for some bags."""
    bag = _bag(seed=4)
    bag = Bag(bag.sample_id, bag.slide_ids, {m: f.double() for m, f in bag.features.items()})
    for name in ("crossfusion", "crossfusion_wo_cp", "crossfusion_wo_fc"):
        runs = []
        for options in ({}, REFERENCE):
            torch.manual_seed(0)
            model = create_method(name, in_dim=16, dropout=0.0, attn_dropout=0.0, **SMALL, **options).double()
            out = model.train()(bag)
            out.risk.sum().backward()
            runs.append((out.logits.detach(), [p.grad for p in model.parameters()]))
        _assert_close(runs[0][0], runs[1][0], tol=1e-10)
        for a, b in zip(runs[0][1], runs[1][1]):
            _assert_close(a, b, tol=1e-10)


# ------------------------------------------------------------------------------------------- fused dropout
def _eager_kernels(monkeypatch):
    """Route the fast path through the fused kernels' eager (uncompiled) versions: the same masks and
    arithmetic as the compiled kernels, without compiling (the compiled ones are tested once, below)."""
    monkeypatch.setattr(fu, "MIN_ENTRIES", 0)
    monkeypatch.setitem(fu._STATE, "kernels", dict(fu.EAGER))
    monkeypatch.setitem(fu._STATE, "failed", False)
    monkeypatch.setenv("MIL_BENCHMARK_COMPILE", "1")


def _fused_keep(g, n, m, p, block_bytes, seed):
    rows = max(1, min(n, block_bytes // (g * m * 4)))
    return torch.cat([fu.keep_mask((g, min(rows, n - s), m), fu.params(seed, i, p))
                      for i, s in enumerate(range(0, n, rows))], 1)


@pytest.mark.parametrize("store_bytes", [2**30, 0])  # probabilities stored, nothing stored
def test_fused_attention_with_dropout_equals_the_masked_math(store_bytes, monkeypatch):
    _eager_kernels(monkeypatch)
    monkeypatch.setattr(fa, "STORE_BYTES", store_bytes)
    p, seed, block = 0.3, 123, 4 * 6 * 53 * 4
    q, k, v = _qkv()
    grad_out = torch.randn(4, 37, 8)
    out = fa.DropoutAttention.apply(q, k, v, p, block, seed)
    keep = _fused_keep(4, 37, 53, p, block, seed)
    ref = (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1) * keep / (1 - p)) @ v
    _assert_close(out, ref)
    for a, b in zip(_grads(out, (q, k, v), grad_out), _grads(ref, (q, k, v), grad_out)):
        _assert_close(a, b)


@pytest.mark.parametrize("p", [0.2, 0.3, 0.5, 0.05])
def test_fused_mask_is_bernoulli_p(p):
    """Keep rate 1 - p (the threshold is within 2**-25 of p) overall and in every residue class of the entry
    index modulo 4 and 16, for two chunks of one call and two calls."""
    assert abs(fu.threshold(p) / 2**fu.KEEP_BITS - p) <= 2**-25
    for seed, chunk in ((1, 0), (1, 1), (2, 0)):
        keep = fu.keep_mask((1000, 4000), fu.params(seed, chunk, p)).flatten()
        _assert_keep_rate(keep, 1 - p)
        for period in (4, 16):
            _assert_keep_rate(keep[seed % period :: period], 1 - p)


def test_fused_mask_entries_and_chunks_are_uncorrelated():
    n, p = 2000, 0.3
    x = fu.keep_mask((n, n), fu.params(2, 0, p)).double()
    bound = 5.0 / n  # 5 sigma of a correlation estimated from n * n pairs
    other_chunk = fu.keep_mask((n, n), fu.params(2, 1, p)).double()
    other_call = fu.keep_mask((n, n), fu.params(3, 0, p)).double()
    pairs = ((x[:, :-1], x[:, 1:]), (x[:, :-4], x[:, 4:]), (x[:-1], x[1:]), (x, other_chunk), (x, other_call))
    for a, b in pairs:
        corr = torch.corrcoef(torch.stack((a.flatten(), b.flatten())))[0, 1].item()
        assert abs(corr) < bound, corr


@pytest.mark.parametrize("name", ["crossfusion", "crossfusion_wo_fc"])
def test_fused_seeded_training_steps_are_bit_reproducible(name, monkeypatch):
    _eager_kernels(monkeypatch)
    bag = _bag()
    first, second, other = _step(name, bag, seed=5), _step(name, bag, seed=5), _step(name, bag, seed=6)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert not torch.equal(first[0], other[0])


def test_failed_compile_falls_back_to_the_uncompiled_path_with_one_warning(monkeypatch):
    monkeypatch.setattr(fu, "MIN_ENTRIES", 0)
    monkeypatch.setitem(fu._STATE, "kernels", None)
    monkeypatch.setitem(fu._STATE, "failed", False)
    monkeypatch.setenv("MIL_BENCHMARK_COMPILE", "1")

    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fu, "_compile_all", broken)
    x = torch.randn(50, 60)
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        assert fu.kernels(10**6) is None
    assert fu.kernels(10**6) is None  # no second attempt, no second warning
    torch.manual_seed(0)
    out = fa.fast_dropout(x, 0.3, training=True)  # the drop_mask path
    torch.manual_seed(0)
    drop = fa.drop_mask(50, 60, 0.3, torch.default_generator)
    assert torch.equal(out, torch.where(drop, 0.0, x) * (1.0 / 0.7))


def test_compiled_kernels_equal_the_eager_ones(monkeypatch):
    """The one test that compiles (seconds; inductor caches on disk): masks bit-equal to the eager
    kernels, values equal (the backward's products may be contracted into FMAs: 1e-6), no recompilation for
    other shapes and keys."""
    monkeypatch.setattr(fu, "MIN_ENTRIES", 0)
    monkeypatch.setitem(fu._STATE, "kernels", None)
    monkeypatch.setitem(fu._STATE, "failed", False)
    monkeypatch.setenv("MIL_BENCHMARK_COMPILE", "1")
    kern = fu.kernels(1)
    if kern is None:
        pytest.skip("torch.compile is not available here (the fallback is tested above)")
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for rows, cols, seed in ((12, 257, 1), (303, 61, 2)):
        prm = fu.params(seed, 3, 0.2)
        x, grad, row_dot = torch.rand(rows, cols), torch.randn(rows, cols), torch.randn(rows, 1)
        outs = [torch.empty(rows, cols) for _ in range(4)]
        fu.run(kern, "drop_into", fu.plain(x.view(-1)), fu.plain(outs[0].view(-1)), *prm)
        fu.EAGER["drop_into"](x.view(-1), outs[1].view(-1), *prm)
        assert torch.equal(outs[0], outs[1])
        grads = [grad.clone(), grad.clone()]
        fu.run(kern, "attention_grad", fu.plain(x), fu.plain(grads[0]), row_dot, fu.plain(outs[2]), *prm)
        fu.EAGER["attention_grad"](x, grads[1], row_dot, outs[3], *prm)
        assert torch.equal(outs[2], outs[3]) and torch.equal(outs[2], outs[0])
        _assert_close(grads[0], grads[1], tol=1e-6)
        scale = torch.tensor(1.25)
        assert torch.equal(fu.run(kern, "scaled_dropout", fu.plain(x.view(-1)), scale, *prm),
                           fu.EAGER["scaled_dropout"](x.view(-1), scale, *prm))
    assert counters["stats"]["unique_graphs"] == graphs  # compiled once, in kernels()


def test_buffer_pool_reuses_large_buffers_and_bounds_what_it_keeps():
    pool = fa.BufferPool(max_bytes=3 * 2**20, min_bytes=2**20)
    big = pool.take(2**19, torch.float32)  # 2 MiB
    pool.give(big[:10])  # a view returns its whole buffer
    again = pool.take(2**18, torch.float32)  # 1 MiB: served from the 2 MiB buffer
    assert again.data_ptr() == big.data_ptr() and again.numel() == 2**18
    pool.give(again, pool.take(2**19, torch.float32))
    assert pool._idle_bytes == 2 * 2**20  # the second 2 MiB buffer did not fit the 3 MiB bound
    small = pool.take(16, torch.float32)  # under min_bytes: never pooled
    pool.give(small)
    assert all(b.numel() >= 2**18 for b in pool._free) and pool._idle_bytes == 2 * 2**20
    assert pool.take(2**19, torch.int64).dtype == torch.int64  # other dtype: a new buffer
    pool.clear()
    assert pool._idle_bytes == 0 and not pool._free
