"""Softmax attention with attention dropout on CPU, fast and memory-bounded: ``dropout_impl="fast"``.

The reference path (``dropout_impl="torch"``, in ``methods/_crossfusion_blocks.py``) runs
``F.dropout(softmax(q k^T / sqrt(d))) v`` over query chunks, each wrapped in ``torch.utils.checkpoint``. On
CPU about 40 % of a CrossFusion training step went to ``F.dropout`` there (``bernoulli_`` into a float mask,
``div_``, ``mul``: three passes over every attention matrix, all repeated by the checkpoint's recomputation)
and much of the rest to page faults of freshly allocated attention matrices. This module computes the same
function with:

- **one autograd Function** over query chunks (at most ``block_bytes`` of attention matrix per chunk) with a
  hand-written backward: no checkpointed recomputation of the forward. On large bags it keeps only ``q, k,
  v`` and the output and recomputes each chunk's probabilities from ``q, k`` (the flash-attention backward:
  one extra ``q k^T`` matmul), so memory stays linear in the bag;
- **reused buffers**: each chunk's scores are written into one preallocated block with ``out=``, softmax runs
  in place, so no attention-sized tensor is allocated (and page-faulted) per chunk;
- **a cheaper dropout mask with the same distribution** (:func:`drop_mask`): 64 random bits per draw of the
  generator, cut into four 16-bit fields, each compared with a threshold; dropped entries are zeroed in place
  and the ``1 / (1 - p)`` rescale is applied to the small ``(N, d)`` output instead of the ``(N, M)`` matrix;
- the probabilities and masks kept for the backward pass when they are small (at most :data:`STORE_BYTES` per
  call), otherwise recomputed there (probabilities from ``q, k``; masks from the same seed).

Deliberate deviations from the reference path, all within the stated tolerances (tested in
``tests/test_fast_attention.py``): the drop probability is ``round(p * 2**16) / 2**16`` for three of every four
entries and ``round(p * 2**15) / 2**15`` for the fourth (within ``2**-16`` of ``p``); the masks come from a
private generator seeded by one draw of the default generator, so a seeded run is bit-reproducible but draws
other masks than ``F.dropout``; the rescale by ``1 / (1 - p)`` and the ``1 / sqrt(d)`` scale are applied to
the ``(N, d)`` operands rather than to the attention matrix (the same maths, rounding differs by about one
ulp).
"""
from __future__ import annotations

import torch
from torch import Tensor

#: Bound on what one call keeps for its backward pass: the probabilities and masks (5 bytes per attention
#: entry over all chunks) when they fit (the paper's average slide: 243 MB per self-attention layer), else the
#: masks alone (1 byte per entry) when they fit, else nothing (the largest slides): the rest is recomputed.
STORE_BYTES = 256 * 2**20

#: Seeds of the private mask generator are drawn from the default generator in [0, 2**62).
_SEED_RANGE = 2**62


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
    fields = torch.empty(n_words, dtype=torch.int64).random_(generator=generator).view(torch.int16).view(n_words, 4)
    mask = torch.empty(n_words * 4, dtype=torch.bool) if out is None or out.numel() < 4 * n_words else out
    mask4 = mask[: 4 * n_words].view(n_words, 4)
    low, high = drop_thresholds(p)
    torch.lt(fields[:, :3], low, out=mask4[:, :3])
    torch.lt(fields[:, 3], high, out=mask4[:, 3])
    return mask[:n].view(n_rows, n_cols)


class _Chunks:
    """Query-chunk geometry, reusable buffers and stored tensors of one call: ``q (G, N, d)``, ``k (G, M, d)``.

    Per chunk, the probabilities (4 bytes per entry) and drop masks (1 byte) are kept for the backward pass
    while the whole call's worth fits :data:`STORE_BYTES`; otherwise the masks alone if they fit, and the rest
    is recomputed in the backward pass (probabilities from ``q, k``; masks from the seed, in chunk order).
    """

    def __init__(self, g: int, n: int, m: int, block_bytes: int, dtype: torch.dtype, p: float, seed: int) -> None:
        self.rows = max(1, min(n, int(block_bytes // max(1, g * m * 4))))
        self.g, self.m, self.p = g, m, p
        self.starts = list(range(0, n, self.rows))
        self.scores = torch.empty(g * self.rows * m, dtype=dtype)  # reused by every chunk
        self.store_probs = g * n * m * 5 <= STORE_BYTES
        self.store_masks = p > 0 and g * n * m <= STORE_BYTES
        self.gen = torch.Generator().manual_seed(seed)

    def view(self, buf: Tensor, c: int) -> Tensor:
        return buf[: self.g * c * self.m].view(self.g, c, self.m)

    def probs(self, qs: Tensor, k_t: Tensor, start: int, fresh: bool) -> Tensor:
        """``softmax(qs[:, start:start+c] k^T)``, ``(G, c, M)``, in the reused scores buffer unless ``fresh``
        (a new tensor, to be stored); ``qs`` already scaled."""
        q_c = qs[:, start : start + self.rows]
        s = torch.bmm(q_c, k_t) if fresh else torch.bmm(q_c, k_t, out=self.view(self.scores, q_c.shape[1]))
        return torch._softmax(s, -1, False, out=s)

    def mask(self, shape: torch.Size) -> Tensor | None:
        """The next chunk's drop mask from the seeded generator (None without dropout)."""
        if self.p == 0:
            return None
        return drop_mask(shape[0] * shape[1], shape[2], self.p, self.gen).view(shape)


class DropoutAttention(torch.autograd.Function):
    """``dropout_p(softmax(q k^T / sqrt(d))) v`` over query chunks with a flash-style backward (see module).

    ``q (G, N, d)``, ``k (G, M, d)``, ``v (G, M, d_v)`` -> ``(G, N, d_v)``; ``out``: optional preallocated
    output (any strides, e.g. token-major so that merging the heads afterwards is a view).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, p: float, block_bytes: int, seed: int,
                out: Tensor | None = None) -> Tensor:
        g, n, d = q.shape
        qs = q * d**-0.5  # the score scale on the (N, d) operand, not on the (N, M) matrix
        chunks = _Chunks(g, n, k.shape[1], block_bytes, q.dtype, p, seed)
        out = torch.empty(g, n, v.shape[-1], dtype=q.dtype) if out is None else out
        k_t, zero = k.transpose(1, 2), torch.zeros((), dtype=q.dtype)
        stored: list[Tensor] = []
        for start in chunks.starts:
            probs = chunks.probs(qs, k_t, start, fresh=chunks.store_probs)
            mask, dropped = chunks.mask(probs.shape), probs
            stored += [probs] if chunks.store_probs else []
            if mask is not None:  # into the reused buffer when the probabilities are stored, else in place
                stored += [mask] if chunks.store_masks else []
                dropped = chunks.view(chunks.scores, probs.shape[1]) if chunks.store_probs else probs
                torch.where(mask, zero, probs, out=dropped)
            torch.bmm(dropped, v, out=out[:, start : start + probs.shape[1]])
        if p > 0:
            out.mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(q, k, v, out, *stored)
        ctx.p, ctx.block_bytes, ctx.seed = p, block_bytes, seed
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, *stored = ctx.saved_tensors
        g, n, d = q.shape
        rescale = 1.0 / (1.0 - ctx.p)
        chunks = _Chunks(g, n, k.shape[1], ctx.block_bytes, q.dtype, ctx.p, ctx.seed)
        grads = torch.empty_like(chunks.scores)
        qs = q * d**-0.5
        # D_i = sum_j dP_ij P_ij = grad_out_i . out_i (flash attention), divided by the rescale (see below).
        row_dot = (grad_out * out).sum(-1, keepdim=True).div_(rescale)  # (G, N, 1)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        k_t, v_t, zero = k.transpose(1, 2), v.transpose(1, 2), torch.zeros((), dtype=q.dtype)
        for start in chunks.starts:
            probs = stored.pop(0) if chunks.store_probs else chunks.probs(qs, k_t, start, fresh=False)
            c = probs.shape[1]
            mask = stored.pop(0) if chunks.store_masks else chunks.mask(probs.shape)
            rows = slice(start, start + c)
            dpd = torch.bmm(grad_out[:, rows], v_t, out=chunks.view(grads, c))  # d(dropped P) / rescale
            # dS = P * (rescale * keep * dPd - D) = rescale * P * (keep * dPd - D / rescale)
            if mask is not None:
                torch.where(mask, zero, dpd, out=dpd)
            dpd.sub_(row_dot[:, rows]).mul_(probs)  # dS / rescale
            torch.bmm(dpd, k, out=dq[:, rows])
            dk.baddbmm_(dpd.transpose(1, 2), qs[:, rows], alpha=rescale)
            if mask is not None:  # dropped P, in the reused buffer (stored probabilities stay intact)
                probs = torch.where(mask, zero, probs, out=chunks.view(chunks.scores, c))
            dv.baddbmm_(probs.transpose(1, 2), grad_out[:, rows], alpha=rescale)
        dq.mul_(rescale * d**-0.5)
        return dq, dk, dv, None, None, None, None


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
    out = DropoutAttention.apply(q.reshape(b * h, n, d), k.reshape(b * h, m, d), v.reshape(b * h, m, d_v),
                                 float(dropout_p), int(block_bytes), seed, out)
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


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Element-wise dropout with :func:`drop_mask` (default generator): same distribution as ``F.dropout``
    within ``2**-16`` of ``p``, one fused pass instead of ``bernoulli_``, ``div_`` and ``mul``, and a one-byte
    mask saved instead of a float one. ``x`` any shape, returned with that shape."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    cols = x.shape[-1] if x.dim() else 1
    drop = drop_mask(x.numel() // max(1, cols), cols, p, torch.default_generator).view(x.shape)
    return _MaskedScale.apply(x, drop, 1.0 / (1.0 - p))
