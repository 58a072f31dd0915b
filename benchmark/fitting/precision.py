"""Device and numeric precision of training: ``--device`` and ``--precision fp32|bf16|fp16``.

- ``fp32``: no autocast (the reference; CPU runs are bit-reproducible).
- ``bf16``: ``torch.autocast(device_type, dtype=torch.bfloat16)`` around each training forward pass, on CUDA or CPU.
- ``fp16``: autocast to float16 with a ``torch.amp.GradScaler`` (the official CrossFusion code trained this way);
  CUDA only, since float16 gradients need the scaler's overflow checks and CPU kernels gain nothing from it.

Autocast covers the training forward passes; the loss is computed in float32 from the outputs and evaluation
(the reported risks) runs in float32, so a bf16 risk never turns distinct patients into C-index ties.

:class:`DeviceBags` moves each bag to the device once and keeps it there while the cached bags fit in a budget
(a fraction of the free device memory), so an epoch over a cohort does not copy every bag host -> device again.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from benchmark.choices import PRECISIONS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Share of the free device memory (measured when training starts) that cached bags may take.
BAG_CACHE_FRACTION = 0.3


def resolve_device(option: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) = CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Raises ValueError naming ``--device`` for an unknown name or CUDA on a machine without it.
    """
    if option is None or str(option) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(option)
    except RuntimeError:
        raise ValueError(f"--device {option}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {option}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {option}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_precision(precision: str, device: torch.device | str | None = None) -> str:
    """Validate ``precision`` (and that ``fp16`` runs on CUDA); returns it."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device is not None and torch.device(device).type != "cuda":
        raise ValueError("--precision fp16: needs --device cuda (use bf16 on CPU)")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a training forward pass runs in (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (None otherwise: bf16 has float32's exponent range)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def bag_bytes(bag) -> int:
    """Bytes of the tensors a bag holds (features, coordinates, graphs, tissue types)."""
    total = 0
    for value in vars(bag).values():
        tensors = value.values() if isinstance(value, dict) else [value]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def default_cache_budget(device: torch.device) -> int:
    """Bytes of bags :class:`DeviceBags` keeps on ``device``: none on CPU (bags are already there)."""
    if device.type != "cuda":
        return 0
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * BAG_CACHE_FRACTION)


class DeviceBags:
    """Bags on the training device: moved once, cached while they fit in ``budget`` bytes.

    Parameters
    ----------
    load : callable
        ``load(sample_id) -> Bag`` on the host (e.g. ``lambda s: cohort.bag(s, needs)``).
    device : torch.device
    budget : int, optional
        Bytes of device memory the cache may hold (default :func:`default_cache_budget`).
    """

    def __init__(self, load: Callable[[str], Any], device: torch.device, budget: int | None = None) -> None:
        self.load, self.device = load, device
        self.budget = default_cache_budget(device) if budget is None else budget
        self.cached: dict[str, Any] = {}
        self.cached_bytes = 0
        #: 20x (else first magnification) patch count of every bag served: the cost model's bag size
        self.patch_counts: dict[str, int] = {}

    def get(self, sample_id: str):
        """The bag of ``sample_id`` on the device."""
        bag = self.cached.get(sample_id)
        if bag is not None:
            return bag
        bag = self.load(sample_id).to(self.device)
        self.patch_counts[sample_id] = bag.num_patches(20 if 20 in bag.features else next(iter(bag.features)))
        size = bag_bytes(bag) if self.budget > 0 else 0
        if 0 < size and self.cached_bytes + size <= self.budget:
            self.cached[sample_id] = bag
            self.cached_bytes += size
        return bag
