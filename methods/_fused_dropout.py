"""Fused dropout kernels for CrossFusion's fast CPU path: a counter-based mask drawn and applied in one pass.

Why: on the paper's average slide the fast path's dropout masks (``random_`` on a serial generator, a compare
into a bool mask, then ``torch.where``, whose CPU kernel is not vectorised) took about a quarter of the forward
pass, and the backward pass applied the stored masks again with ``where``. Here the mask is not drawn from a
generator's stream but computed from each entry's position: ``keep = hash(index ^ k0 ... k1) >= threshold``,
so it costs a few vectorised integer operations inside the same loop that reads the probabilities and writes
the dropped ones, needs no storage (the backward pass recomputes it from the same keys), and any chunk can be
recomputed in any order.

Mask: ``h = T((i ^ k0) * (k1 | 1))`` (32-bit arithmetic) with ``T`` the ``triple32`` integer hash (C. Wellons'
bijective 32-bit hash: three multiply / xor-shift rounds), ``i`` the entry's row-major index within its chunk
and ``(k0, k1)`` a 64-bit key per chunk (:func:`params`: splitmix64 of the call's seed and the chunk's number).
The keyed step (xor, then multiply by an odd number) is a bijection that also scrambles which entries of two
chunks share a hash input. An entry is dropped when the top 24 bits of ``h`` are below ``round(p * 2**24)``:
since both steps are bijections, ``h`` is exactly uniform over ``2**32`` for a uniform ``k0``, so the drop
probability is ``round(p 2^24) / 2^24`` (within ``2**-25`` of ``p``); distinct entries of a chunk get distinct
hash inputs, so their decisions are as independent as the hash's outputs (tested: keep rate, neighbour
correlations, other chunks and calls). A second ``T`` round would cost twice the kernel time (measured
13.2 ms against 6.1 ms per 16.8 M entries) for no difference the tests can see.

Kernels: the functions below are plain PyTorch (the eager reference, bit-identical masks) and are compiled
with ``torch.compile`` (inductor's C++ backend, ``dynamic=True``: one kernel for every shape) on first use in
a process. :func:`kernels` returns them, or None when compiling is switched off
(``MIL_BENCHMARK_COMPILE=0``), the call is too small to repay it (:data:`MIN_ENTRIES`; every test bag), or
compiling failed once (a one-time warning; the caller then uses ``drop_mask``'s path, another generator).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

#: Calls with fewer attention / activation entries than this use the uncompiled path (no compile cost).
MIN_ENTRIES = 2**20

#: Mask resolution: an entry is dropped when the top ``KEEP_BITS`` bits of its hash are below the threshold.
KEEP_BITS = 24

_M32, _M64 = 2**32 - 1, 2**64 - 1
_STATE: dict = {"kernels": None, "failed": False}


# ------------------------------------------------------------------------------------------------ the mask
def threshold(p: float) -> int:
    """Drop when ``hash >> 8 < threshold(p)``: drop probability ``round(p 2^24) / 2^24``."""
    return round(p * 2**KEEP_BITS)


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _signed32(x: int) -> int:
    return x - 2**32 if x >= 2**31 else x


def params(seed: int, chunk: int, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """The int32 parameters ``(k0, k1, threshold)`` of chunk number ``chunk`` of the call seeded ``seed``, as
    0-dim tensors (new keys never make ``torch.compile`` specialise or recompile; no sizes to guard)."""
    z = _splitmix64(_splitmix64(seed & _M64) ^ chunk)
    values = (_signed32(z & _M32), _signed32(z >> 32), threshold(p))
    return tuple(torch.tensor(v, dtype=torch.int32) for v in values)


def _lsr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int32 (``>>`` is arithmetic on signed integers)."""
    return (x >> s) & ((1 << (32 - s)) - 1)


def _triple32(x: Tensor) -> Tensor:
    """Wellons' ``triple32`` on int32 (multiplies wrap modulo 2**32 as on uint32)."""
    x = x ^ _lsr(x, 17)
    x = x * -0x12A52B45  # 0xED5AD4BB
    x = x ^ _lsr(x, 11)
    x = x * -0x53B3E4AF  # 0xAC4C1B51
    x = x ^ _lsr(x, 15)
    x = x * 0x31848BAB
    return x ^ _lsr(x, 14)


def keep_mask(shape: tuple[int, ...] | torch.Size, prm: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Bool keep mask of a chunk of ``shape`` (row-major entry index) under ``prm`` (:func:`params`)."""
    n = 1
    for size in shape:
        n *= size
    i = torch.arange(n, dtype=torch.int32).view(shape)
    h = _triple32((i ^ prm[0]) * (prm[1] | 1))  # x -> (x ^ k0) * odd k1: a keyed bijection, then the hash
    return _lsr(h, 32 - KEEP_BITS) >= prm[2]


# ------------------------------------------------------------------------------------------------ kernels
# Called on plain contiguous tensors (see :func:`run`): flat ``(n,)`` or ``(rows, cols)`` with ``(rows, 1)``.
def drop_into(x: Tensor, out: Tensor, k0: Tensor, k1: Tensor, thr: Tensor) -> None:
    """``out = x`` with the dropped entries zeroed (no rescale); ``out`` and ``x`` do not overlap."""
    out.copy_(torch.where(keep_mask(x.shape, (k0, k1, thr)), x, 0.0))


def drop_(x: Tensor, k0: Tensor, k1: Tensor, thr: Tensor) -> None:
    """:func:`drop_into` in place."""
    x.copy_(torch.where(keep_mask(x.shape, (k0, k1, thr)), x, 0.0))


def attention_grad(probs: Tensor, dpd: Tensor, row_dot: Tensor, dropped: Tensor, k0: Tensor, k1: Tensor,
                   thr: Tensor) -> None:
    """Backward of a dropped attention chunk ``(rows, cols)``, in place: ``dropped = keep * probs`` and
    ``dpd = dropped * dpd - probs * row_dot`` (``row_dot (rows, 1)``)."""
    kept = torch.where(keep_mask(probs.shape, (k0, k1, thr)), probs, 0.0)
    dpd.copy_(kept * dpd - probs * row_dot)
    dropped.copy_(kept)


def scaled_dropout(x: Tensor, scale: Tensor, k0: Tensor, k1: Tensor, thr: Tensor) -> Tensor:
    """Element-wise dropout of a flat ``x``: ``where(keep, x * scale, 0)`` (also its own backward)."""
    return torch.where(keep_mask(x.shape, (k0, k1, thr)), x * scale, 0.0)


EAGER = {"drop_into": drop_into, "drop_": drop_, "attention_grad": attention_grad, "scaled_dropout": scaled_dropout}


def _compile_all() -> dict:
    compiled = {name: torch.compile(fn, dynamic=True) for name, fn in EAGER.items()}
    prm = params(0, 0, 0.5)
    # distinct sizes >= 2 (no 0/1 or duck-size specialisation), plain tensors as in the real calls
    flat, out, row = torch.rand(102), torch.empty(102), torch.rand(6, 1)
    with torch.no_grad():  # the kernels run inside autograd Functions, so always without grad
        compiled["drop_into"](flat, out, *prm)  # compiles now (errors surface here, not inside a step)
        compiled["drop_"](out, *prm)
        compiled["attention_grad"](plain(flat.view(6, 17)), torch.rand(6, 17), row, plain(out.view(6, 17)), *prm)
        compiled["scaled_dropout"](flat, torch.tensor(2.0), *prm)
    return compiled


def kernels(n_entries: int) -> dict | None:
    """The compiled kernels, or None: switched off, fewer than :data:`MIN_ENTRIES` entries, or compiling
    failed (noted once). The first call in a process compiles (seconds; cached on disk by inductor)."""
    if _STATE["failed"] or n_entries < MIN_ENTRIES or os.environ.get("MIL_BENCHMARK_COMPILE", "1") == "0":
        return None
    if _STATE["kernels"] is None:
        try:
            _STATE["kernels"] = _compile_all()
        except Exception as error:  # no compiler, inductor bug, ...: the uncompiled path is correct too
            disable(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            return None
    return _STATE["kernels"]


def disable(reason: str) -> None:
    """Stop using the compiled kernels in this process (one warning)."""
    _STATE["failed"], _STATE["kernels"] = True, None
    warnings.warn(f"methods/_fused_dropout.py: torch.compile of the fused dropout kernels failed ({reason}); "
                  "using the uncompiled fast dropout (other masks, same distribution)", RuntimeWarning,
                  stacklevel=3)


def plain(t: Tensor) -> Tensor:
    """A non-view tensor on ``t``'s memory (same sizes and strides): the compiled kernels then guard on sizes
    and strides only, not on the pool buffers that ``t`` is a view of (which would recompile)."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def run(kern: dict, name: str, *args):
    """``kern[name](*args)`` without grad; if a compiled kernel fails (e.g. a recompile for a new dtype),
    switch to the eager kernels for the rest of this call (same masks) and stop compiling in this process."""
    try:
        with torch.no_grad():
            return kern[name](*args)
    except Exception as error:  # noqa: BLE001 - any compile failure: the eager kernel computes the same thing
        if kern[name] is EAGER[name]:
            raise
        disable(f"{type(error).__name__}")
        kern.update(EAGER)
        with torch.no_grad():
            return EAGER[name](*args)
