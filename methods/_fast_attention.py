"""Fast CPU dropout for CrossFusion (``dropout_impl="fast"``): attention with dropout, and element-wise dropout.

The reference path (``dropout_impl="torch"``, in ``methods/_crossfusion_blocks.py``) runs
``F.dropout(softmax(q k^T / sqrt(d))) v`` over query chunks, each wrapped in ``torch.utils.checkpoint``.
``F.dropout`` on CPU makes three passes over every attention matrix (``bernoulli_`` into a float mask, ``div_``,
``mul``), the checkpoint repeats them in the backward pass, and every fresh attention-sized tensor is
page-faulted by the kernel. :func:`dropout_attention` computes the same function with:

- **one autograd Function** over query chunks (at most ``block_bytes`` of attention matrix per chunk) with a
  hand-written backward, so the forward is not recomputed. What it keeps for the backward pass is bounded by
  :data:`STORE_BYTES`: the probabilities and masks when they fit, else the masks, else nothing (then each
  chunk's probabilities are recomputed from ``q, k``, the flash-attention backward, and its mask from the
  seed), so memory stays linear in the bag;
- **pooled buffers** (:class:`BufferPool`): scores are written with ``out=`` into buffers reused across
  chunks, layers and steps, and softmax runs in place;
- **a cheaper mask with the same distribution** (:func:`drop_mask`): 63 random bits per draw of the generator,
  cut into four 16-bit fields, each compared with a threshold; dropped entries are zeroed in one pass and the
  ``1 / (1 - p)`` rescale is applied to the ``(N, d)`` output instead of the ``(N, M)`` matrix;
- **fused kernels** (:mod:`methods._fused_dropout`) for calls of at least ``MIN_ENTRIES`` (2**20) entries when
  ``torch.compile`` works: a counter-based mask computed from each entry's position inside the one pass that
  applies it (forward), and inside the one pass that forms ``dS`` and the dropped probabilities (backward), so
  no mask is drawn serially, stored or applied with ``torch.where``. Otherwise :func:`drop_mask` as above.

:func:`fast_dropout` is the element-wise dropout of the FFNs with the same mask generator and a one-byte saved
mask.

Deliberate deviations from the reference path, all within the stated tolerances (tested in
``tests/methods/test_fast_attention.py``): the drop probability is ``round(p * 2**16) / 2**16`` for three of every four
entries and ``round(p * 2**15) / 2**15`` for the fourth (within ``2**-16`` of ``p``; the fused kernels:
``round(p * 2**24) / 2**24`` for every entry); the masks come from a
private generator seeded by one draw of the default generator, so a seeded run is bit-reproducible but draws
other masks than ``F.dropout``; the rescale by ``1 / (1 - p)`` and the ``1 / sqrt(d)`` scale are applied to
the ``(N, d)`` operands rather than to the attention matrix (the same maths, rounding differs by about one
ulp); the backward pass runs once per forward (``retain_graph`` raises).
"""
from __future__ import annotations

import torch
from torch import Tensor

from methods import _fused_dropout as _fused

#: Bound on what one call keeps for its backward pass: the probabilities and masks (5 bytes per attention
#: entry over all chunks) when they fit (the paper's average slide: 243 MB per self-attention layer), else the
#: masks alone (1 byte per entry) when they fit, else nothing (the largest slides): the rest is recomputed.
STORE_BYTES = 256 * 2**20

#: Seeds of the private mask generator are drawn from the default generator in [0, 2**62).
_SEED_RANGE = 2**62


class BufferPool:
    """Attention-sized CPU buffers kept for reuse across chunks, layers and steps.

    Why: tensors above 32 MiB come from ``mmap`` and go back to the kernel when freed, so every fresh one is
    page-faulted and zeroed again: that took about as long as the ``q k^T`` matmul writing into it. Buffers
    given back here are handed out again (smallest one large enough, as a flat view); at most ``max_bytes`` are
    kept idle. Buffers under ``min_bytes`` bypass the pool: ``malloc`` reuses those cheaply, and on small bags
    (thousands of tiny calls per epoch) the bookkeeping cost more than it saved. :meth:`clear` drops them.
    """

    def __init__(self, max_bytes: int, min_bytes: int = 2**20) -> None:
        self.max_bytes, self.min_bytes = max_bytes, min_bytes
        self._free: list[Tensor] = []
        self._idle_bytes = 0

    def take(self, numel: int, dtype: torch.dtype) -> Tensor:
        """A flat tensor of ``numel`` elements (a view of a pooled buffer, or new); contents undefined."""
        best = None
        if numel * dtype.itemsize >= self.min_bytes:
            fits = [i for i, b in enumerate(self._free) if b.dtype == dtype and b.numel() >= numel]
            best = min(fits, key=lambda i: self._free[i].numel(), default=None)
        if best is None:
            return torch.empty(numel, dtype=dtype)
        buffer = self._free.pop(best)
        self._idle_bytes -= buffer.numel() * buffer.element_size()
        return buffer[:numel]

    def give(self, *tensors: Tensor | None) -> None:
        """Return tensors obtained from :meth:`take` (views of them are fine); they must not be used afterwards."""
        for t in tensors:
            if t is None:
                continue
            base = t if t._base is None else t._base  # the flat buffer of take() (no new view op)
            size = base.numel() * base.element_size()
            if self.min_bytes <= size and self._idle_bytes + size <= self.max_bytes:
                self._free.append(base)
                self._idle_bytes += size

    def clear(self) -> None:
        self._free.clear()
        self._idle_bytes = 0


#: The pool of this module (2 GiB idle at most: one average-slide step's stored probabilities and masks).
POOL = BufferPool(2 * 2**30)


def drop_thresholds(p: float) -> tuple[int, int]:
    """Integer thresholds of :func:`drop_mask`: a signed 16-bit field drops when below the first, the 15-bit
    field when below the second. Drop probabilities ``round(p 2^16) / 2^16`` and ``round(p 2^15) / 2^15``."""
    return round(p * 2**16) - 2**15, round(p * 2**15)


def drop_mask(n_rows: int, n_cols: int, p: float, generator: torch.Generator, out: Tensor | None = None) -> Tensor:
    """Bernoulli(p) drop mask, ``(n_rows, n_cols)`` bool (True = dropped), independent entries.

    ``random_`` on int64 yields 63 uniform bits per draw (``value % 2**63``); viewed as four int16 fields, the
    three low fields are uniform over all 2**16 signed values and the top one over [0, 2**15). Each field is
    compared with its threshold (:func:`drop_thresholds`), so one draw decides four entries with probability
    within ``2**-16`` of ``p``. ``out``: optional bool buffer of at least ``n_rows * n_cols`` entries.
    """
    n = n_rows * n_cols
    n_words = (n + 3) // 4
    words = POOL.take(n_words, torch.int64)
    fields = words.random_(generator=generator).view(torch.int16).view(n_words, 4)
    mask = torch.empty(n_words * 4, dtype=torch.bool) if out is None or out.numel() < 4 * n_words else out
    mask4 = mask[: 4 * n_words].view(n_words, 4)
    low, high = drop_thresholds(p)
    torch.lt(fields.view(-1), low, out=mask[: 4 * n_words])  # contiguous: much faster than the strided 3 of 4
    torch.lt(fields[:, 3], high, out=mask4[:, 3])  # then the 15-bit field again with its own threshold
    POOL.give(words)
    return mask[:n].view(n_rows, n_cols)


class _Chunks:
    """Query-chunk geometry, reusable buffers and stored tensors of one call: ``q (G, N, d)``, ``k (G, M, d)``.

    Per chunk, the probabilities (4 bytes per entry) and drop masks (1 byte) are kept for the backward pass
    while the whole call's worth fits :data:`STORE_BYTES`; otherwise the masks alone if they fit, and the rest
    is recomputed in the backward pass (probabilities from ``q, k``; masks from the seed, in chunk order).
    """

    def __init__(self, g: int, n: int, m: int, block_bytes: int, dtype: torch.dtype, p: float, seed: int,
                 store: bool = True) -> None:
        self.rows = max(1, min(n, int(block_bytes // max(1, g * m * 4))))
        self.g, self.m, self.p, self.dtype = g, m, p, dtype
        self.starts = list(range(0, n, self.rows))
        self.scores = POOL.take(g * self.rows * m, dtype)  # reused by every chunk; POOL.give when done
        # fused: the mask is computed inside the kernels from (seed, chunk, entry) and never stored
        self.fused = _fused.kernels(g * n * m) if p > 0 and dtype in (torch.float32, torch.float64) else None
        self.store_probs = store and g * n * m * (4 if self.fused else 5) <= STORE_BYTES
        self.store_masks = store and p > 0 and not self.fused and g * n * m <= STORE_BYTES
        self.gen = torch.Generator().manual_seed(seed)
        self.seed = seed

    def view(self, buf: Tensor, c: int) -> Tensor:
        return buf[: self.g * c * self.m].view(self.g, c, self.m)

    def probs(self, qs: Tensor, k_t: Tensor, start: int, fresh: bool) -> Tensor:
        """``softmax(qs[:, start:start+c] k^T)``, ``(G, c, M)``, in the reused scores buffer unless ``fresh``
        (a new tensor, to be stored); ``qs`` already scaled."""
        q_c = qs[:, start : start + self.rows]
        c = q_c.shape[1]
        s = self.view(POOL.take(self.g * c * self.m, self.dtype) if fresh else self.scores, c)
        torch.bmm(q_c, k_t, out=s)
        return torch._softmax(s, -1, False, out=s)

    def mask(self, shape: torch.Size, fresh: bool) -> Tensor | None:
        """The next chunk's drop mask from the seeded generator (None without dropout); ``fresh``: in a pooled
        buffer that the caller keeps (else in one reused by every chunk)."""
        if self.p == 0:
            return None
        if fresh or not hasattr(self, "_mask_buf"):
            buf = POOL.take(4 * ((shape.numel() + 3) // 4), torch.bool)
            if not fresh:
                self._mask_buf = buf
        buf = buf if fresh else self._mask_buf
        return drop_mask(shape[0] * shape[1], shape[2], self.p, self.gen, out=buf).view(shape)

    def dropped(self, probs: Tensor, chunk: int, stored: list[Tensor]) -> Tensor:
        """Chunk ``chunk``'s probabilities with dropout applied (no rescale): in the reused scores buffer when
        ``probs`` is stored, else in place. A drawn mask is appended to ``stored`` when masks are stored."""
        if self.p == 0:
            return probs
        target = self.view(self.scores, probs.shape[1]) if self.store_probs else probs
        if self.fused:
            prm = _fused.params(self.seed, chunk, self.p)
            flat = _fused.plain(probs.view(-1))
            if target is probs:
                _fused.run(self.fused, "drop_", flat, *prm)
            else:
                _fused.run(self.fused, "drop_into", flat, _fused.plain(target.view(-1)), *prm)
            return target
        mask = self.mask(probs.shape, fresh=self.store_masks)
        stored += [mask] if self.store_masks else []
        return torch.where(mask, torch.zeros((), dtype=probs.dtype), probs, out=target)

    def grad(self, probs: Tensor, dpd: Tensor, row_dot: Tensor, chunk: int, drop_buf: Tensor | None,
             mask: Tensor | None) -> Tensor:
        """Backward of one chunk in place: ``dpd`` (``d(dropped P) / rescale``) becomes ``dS / rescale``
        (``dS = P * (rescale * keep * dPd - D)``); returns the dropped probabilities (for ``dv``)."""
        if self.p == 0:
            dpd.sub_(row_dot).mul_(probs)
            return probs
        dropped = self.view(drop_buf, probs.shape[1])
        if self.fused:
            rows, cols = probs.shape[0] * probs.shape[1], probs.shape[2]
            two_d = [_fused.plain(t.view(rows, cols)) for t in (probs, dpd)]
            _fused.run(self.fused, "attention_grad", *two_d, row_dot.reshape(rows, 1).contiguous(),
                       _fused.plain(dropped.view(rows, cols)), *_fused.params(self.seed, chunk, self.p))
            return dropped
        mask = mask if mask is not None else self.mask(probs.shape, fresh=False)
        torch.where(mask, torch.zeros((), dtype=probs.dtype), probs, out=dropped)
        dpd.mul_(dropped).addcmul_(probs, row_dot, value=-1)  # three passes
        return dropped

    def release(self) -> None:
        POOL.give(self.scores, getattr(self, "_mask_buf", None))


class DropoutAttention(torch.autograd.Function):
    """``dropout_p(softmax(q k^T / sqrt(d))) v`` over query chunks with a flash-style backward (see module).

    ``q (G, N, d)``, ``k (G, M, d)``, ``v (G, M, d_v)`` -> ``(G, N, d_v)``; ``out``: optional preallocated
    output (any strides, e.g. token-major so that merging the heads afterwards is a view); ``store``: keep
    probabilities / masks for the backward pass when they fit (False when no backward pass will follow).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, p: float, block_bytes: int, seed: int,
                out: Tensor | None = None, store: bool = True) -> Tensor:
        g, n, d = q.shape
        qs = q * d**-0.5  # the score scale on the (N, d) operand, not on the (N, M) matrix
        chunks = _Chunks(g, n, k.shape[1], block_bytes, q.dtype, p, seed, store=store)
        out = torch.empty(g, n, v.shape[-1], dtype=q.dtype) if out is None else out
        k_t = k.transpose(1, 2)
        stored: list[Tensor] = []  # per chunk, in order: its probabilities and / or its mask when stored
        for chunk, start in enumerate(chunks.starts):
            probs = chunks.probs(qs, k_t, start, fresh=chunks.store_probs)
            stored += [probs] if chunks.store_probs else []
            dropped = chunks.dropped(probs, chunk, stored)
            torch.bmm(dropped, v, out=out[:, start : start + probs.shape[1]])
        chunks.release()
        if p > 0:
            out.mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(q, k, v, out, *stored)
        ctx.p, ctx.block_bytes, ctx.seed, ctx.spent = p, block_bytes, seed, False
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.spent:  # the stored buffers went back to the pool after the first backward
            raise RuntimeError("methods/_fast_attention.py: DropoutAttention's backward runs once (retain_graph is "
                               "not supported); use dropout_impl='torch'")
        ctx.spent = True
        q, k, v, out, *stored = ctx.saved_tensors
        g, n, d = q.shape
        rescale = 1.0 / (1.0 - ctx.p)
        chunks = _Chunks(g, n, k.shape[1], ctx.block_bytes, q.dtype, ctx.p, ctx.seed)
        grads = POOL.take(chunks.scores.numel(), q.dtype)
        drop_buf = POOL.take(chunks.scores.numel(), q.dtype) if ctx.p > 0 else None
        qs = q * d**-0.5
        # D_i = sum_j dP_ij P_ij = grad_out_i . out_i (flash attention), divided by the rescale (see below).
        row_dot = (grad_out * out).sum(-1, keepdim=True).div_(rescale)  # (G, N, 1)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)
        for chunk, start in enumerate(chunks.starts):
            probs = stored.pop(0) if chunks.store_probs else chunks.probs(qs, k_t, start, fresh=False)
            c = probs.shape[1]
            mask = stored.pop(0) if chunks.store_masks else None
            rows = slice(start, start + c)
            dpd = torch.bmm(grad_out[:, rows], v_t, out=chunks.view(grads, c))  # d(dropped P) / rescale
            dropped = chunks.grad(probs, dpd, row_dot[:, rows], chunk, drop_buf, mask)
            torch.bmm(dpd, k, out=dq[:, rows])  # dpd holds dS / rescale
            dk.baddbmm_(dpd.transpose(1, 2), qs[:, rows], alpha=rescale)
            dv.baddbmm_(dropped.transpose(1, 2), grad_out[:, rows], alpha=rescale)
            POOL.give(*((probs,) if chunks.store_probs else ()), *((mask,) if chunks.store_masks else ()))
        chunks.release()
        POOL.give(grads, drop_buf)
        dq.mul_(rescale * d**-0.5)
        return dq, dk, dv, None, None, None, None, None


def dropout_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, block_bytes: int) -> Tensor:
    """``dropout(softmax(q k^T / sqrt(d))) v`` with the fast path: ``q (B, H, N, d)``, ``k (B, H, M, d)``,
    ``v (B, H, M, d_v)`` -> ``(B, H, N, d_v)``.

    One seed is drawn from the default generator per call (so ``torch.manual_seed`` makes a run reproducible
    and ``torch.utils.checkpoint``'s RNG replay redraws the same masks). CPU, float32 / float64. The heads are
    read in place (no contiguous copies); with ``B == 1`` the output is written token-major, so the caller's
    ``out.transpose(1, 2).reshape(B, N, H * d_v)`` is a view.
    """
    b, h, n, d = q.shape
    m, d_v = k.shape[-2], v.shape[-1]
    seed = int(torch.randint(_SEED_RANGE, (1,)).item()) if dropout_p > 0 else 0
    out = torch.empty(n, h, d_v, dtype=q.dtype).transpose(0, 1) if b == 1 else None
    # Keep probabilities and masks only when a backward pass can follow (Function.forward runs without grad).
    store = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out = DropoutAttention.apply(q.reshape(b * h, n, d), k.reshape(b * h, m, d), v.reshape(b * h, m, d_v),
                                 float(dropout_p), int(block_bytes), seed, out, store)
    return out.reshape(b, h, n, d_v)


class _MaskedScale(torch.autograd.Function):
    """``where(drop, 0, x) * scale`` with the bool mask saved (one byte per entry) for the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, drop: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return torch.where(drop, torch.zeros((), dtype=x.dtype), x).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (drop,) = ctx.saved_tensors
        return torch.where(drop, torch.zeros((), dtype=grad.dtype), grad).mul_(ctx.scale), None, None


class _FusedScale(torch.autograd.Function):
    """``where(keep, x * scale, 0)`` with the counter-based mask of ``prm`` (:mod:`methods._fused_dropout`);
    the backward pass applies the same kernel to the gradient (the mask is recomputed, not saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, prm: tuple, scale: float, kern: dict) -> Tensor:
        ctx.prm, ctx.scale, ctx.kern = prm, scale, kern
        return _fused.run(kern, "scaled_dropout", _fused.plain(x.contiguous().view(-1)),
                          torch.tensor(scale, dtype=x.dtype), *prm).view(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scale = torch.tensor(ctx.scale, dtype=grad.dtype)
        out = _fused.run(ctx.kern, "scaled_dropout", _fused.plain(grad.contiguous().view(-1)), scale, *ctx.prm)
        return out.view(grad.shape), None, None, None


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Element-wise dropout with :func:`drop_mask` (default generator): same distribution as ``F.dropout``
    within ``2**-16`` of ``p``, one fused pass instead of ``bernoulli_``, ``div_`` and ``mul``, and a one-byte
    mask saved instead of a float one. ``x`` any shape, returned with that shape."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    kern = _fused.kernels(x.numel()) if x.dtype in (torch.float32, torch.float64) else None
    if kern is not None:  # counter-based mask computed in the kernel, nothing saved but one seed
        seed = int(torch.randint(_SEED_RANGE, (1,)).item())
        return _FusedScale.apply(x, _fused.params(seed, 0, p), 1.0 / (1.0 - p), kern)
    cols = x.shape[-1] if x.dim() else 1
    drop = drop_mask(x.numel() // max(1, cols), cols, p, torch.default_generator).view(x.shape)
    return _MaskedScale.apply(x, drop, 1.0 / (1.0 - p))
