"""Softmax attention with attention dropout on CPU, fast and memory-bounded: ``dropout_impl="fast"``.

The reference path (``dropout_impl="torch"``, in ``methods/_crossfusion_blocks.py``) runs
``F.dropout(softmax(q k^T / sqrt(d))) v`` over query chunks, each wrapped in ``torch.utils.checkpoint``. On
CPU about 40 % of a CrossFusion training step went to ``F.dropout`` there (``bernoulli_`` into a float mask,
``div_``, ``mul``: three passes over every attention matrix, all repeated by the checkpoint's recomputation)
and much of the rest to page faults of freshly allocated attention matrices. This module computes the same
function with:

- **one autograd Function** over query chunks (at most ``block_bytes`` of attention matrix per chunk); the
  forward keeps only ``q, k, v`` and the output, and the backward recomputes each chunk's probabilities from
  ``q, k`` (the flash-attention backward: one extra ``q k^T`` matmul instead of the checkpoint's full
  recomputed forward), so memory stays linear in the bag;
- **reused buffers**: each chunk's scores are written into one preallocated block with ``out=``, softmax runs
  in place, so no attention-sized tensor is allocated (and page-faulted) per chunk;
- **a cheaper dropout mask with the same distribution** (:func:`drop_mask`): 64 random bits per draw of the
  generator, cut into four 16-bit fields, each compared with a threshold; dropped entries are zeroed in place
  and the ``1 / (1 - p)`` rescale is applied to the small ``(N, d)`` output instead of the ``(N, M)`` matrix;
- masks kept for the backward pass when they are small (at most :data:`MASK_STORE_BYTES` per call, one byte
  per entry), otherwise regenerated there from the same seed.

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

#: Masks up to this many bytes (one per attention entry, over all chunks of one call) are stored for the
#: backward pass; larger ones (whole slides above about 8k tokens) are regenerated from the seed there.
MASK_STORE_BYTES = 256 * 2**20

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
    """Query-chunk geometry and reusable buffers for one call: ``q (G, N, d)``, ``k (G, M, d)``."""

    def __init__(self, g: int, n: int, m: int, block_bytes: int, dtype: torch.dtype) -> None:
        self.rows = max(1, min(n, int(block_bytes // max(1, g * m * 4))))
        self.g, self.m = g, m
        self.starts = list(range(0, n, self.rows))
        self.scores = torch.empty(g * self.rows * m, dtype=dtype)  # reused by every chunk
        self.grads = None  # backward only

    def view(self, buf: Tensor, c: int) -> Tensor:
        return buf[: self.g * c * self.m].view(self.g, c, self.m)

    def probs(self, qs: Tensor, k_t: Tensor, start: int) -> Tensor:
        """``softmax(qs[:, start:start+c] k^T)`` in the scores buffer, ``(G, c, M)``; ``qs`` already scaled."""
        q_c = qs[:, start : start + self.rows]
        s = self.view(self.scores, q_c.shape[1])
        torch.bmm(q_c, k_t, out=s)
        return torch._softmax(s, -1, False, out=s)


def _drop(probs: Tensor, p: float, gen: torch.Generator, stored: list[Tensor] | None, i: int,
          keep_masks: bool) -> Tensor:
    """The drop mask of chunk ``i`` (stored, or drawn from ``gen`` in chunk order), ``probs``'s shape."""
    if stored is not None and i < len(stored):
        return stored[i]
    mask = drop_mask(probs.shape[0] * probs.shape[1], probs.shape[2], p, gen).view(probs.shape)
    if keep_masks:
        stored.append(mask)
    return mask


class DropoutAttention(torch.autograd.Function):
    """``dropout_p(softmax(q k^T / sqrt(d))) v`` over query chunks with a flash-style backward (see module)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, p: float, block_bytes: int, seed: int) -> Tensor:
        g, n, d = q.shape
        qs = q * d**-0.5  # the score scale on the (N, d) operand, not on the (N, M) matrix
        chunks = _Chunks(g, n, k.shape[1], block_bytes, q.dtype)
        keep_masks = g * n * k.shape[1] <= MASK_STORE_BYTES
        masks: list[Tensor] = []
        gen = torch.Generator().manual_seed(seed)
        out = torch.empty(g, n, v.shape[-1], dtype=q.dtype)
        k_t = k.transpose(1, 2)
        zero = torch.zeros((), dtype=q.dtype)
        for i, start in enumerate(chunks.starts):
            probs = chunks.probs(qs, k_t, start)
            mask = _drop(probs, p, gen, masks, i, keep_masks) if p > 0 else None
            if mask is not None:
                torch.where(mask, zero, probs, out=probs)
            torch.bmm(probs, v, out=out[:, start : start + probs.shape[1]])
        if p > 0:
            out.mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(q, k, v, out, *masks)
        ctx.p, ctx.block_bytes, ctx.seed = p, block_bytes, seed
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, *masks = ctx.saved_tensors
        g, n, d = q.shape
        p, rescale = ctx.p, 1.0 / (1.0 - ctx.p)
        qs = q * d**-0.5
        grad_out = grad_out.contiguous()
        # D_i = sum_j dP_ij P_ij = grad_out_i . out_i (flash attention), divided by the rescale (see below).
        row_dot = (grad_out * out).sum(-1, keepdim=True).div_(rescale)  # (G, N, 1)
        chunks = _Chunks(g, n, k.shape[1], ctx.block_bytes, q.dtype)
        chunks.grads = torch.empty_like(chunks.scores)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        gen = torch.Generator().manual_seed(ctx.seed)
        k_t, v_t, zero = k.transpose(1, 2), v.transpose(1, 2), torch.zeros((), dtype=q.dtype)
        for i, start in enumerate(chunks.starts):
            probs = chunks.probs(qs, k_t, start)  # P, (G, c, M)
            c = probs.shape[1]
            mask = _drop(probs, p, gen, masks, i, False) if p > 0 else None
            rows = slice(start, start + c)
            dpd = torch.bmm(grad_out[:, rows], v_t, out=chunks.view(chunks.grads, c))  # d(dropped P) / rescale
            # dS = P * (rescale * keep * dPd - D) = rescale * P * (keep * dPd - D / rescale)
            if mask is not None:
                torch.where(mask, zero, dpd, out=dpd)
            dpd.sub_(row_dot[:, rows]).mul_(probs)  # dS / rescale
            torch.bmm(dpd, k, out=dq[:, rows])
            dk.baddbmm_(dpd.transpose(1, 2), qs[:, rows], alpha=rescale)
            if mask is not None:
                torch.where(mask, zero, probs, out=probs)
            dv.baddbmm_(probs.transpose(1, 2), grad_out[:, rows], alpha=rescale)
        dq.mul_(rescale * d**-0.5)
        return dq, dk, dv, None, None, None


def dropout_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, block_bytes: int) -> Tensor:
    """``dropout(softmax(q k^T / sqrt(d))) v`` with the fast path: ``q (B, H, N, d)``, ``k (B, H, M, d)``,
    ``v (B, H, M, d_v)`` -> ``(B, H, N, d_v)``.

    One seed is drawn from the default generator per call (so ``torch.manual_seed`` makes a run reproducible
    and ``torch.utils.checkpoint``'s RNG replay redraws the same masks). CPU, float32 / float64.
    """
    b, h, n, d = q.shape
    m, d_v = k.shape[-2], v.shape[-1]
    seed = int(torch.randint(_SEED_RANGE, (1,)).item()) if dropout_p > 0 else 0
    out = DropoutAttention.apply(q.reshape(b * h, n, d).contiguous(), k.reshape(b * h, m, d).contiguous(),
                                 v.reshape(b * h, m, d_v).contiguous(), float(dropout_p), int(block_bytes), seed)
    return out.view(b, h, n, d_v)


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
