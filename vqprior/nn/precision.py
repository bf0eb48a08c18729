"""Where mixed precision stops: likelihoods, heads' last layers and codebook distances run
in float32 (float64 stays float64) with autocast off."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["full_precision", "upcast", "wide_dtype"]


def wide_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of ``dtypes`` is float64, else float32: where full precision computes."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def upcast(t: Tensor) -> Tensor:
    """``t`` in :func:`wide_dtype` (float32, or unchanged if it is already float64)."""
    wide = wide_dtype(t.dtype)
    return t if t.dtype == wide else t.to(wide)  # no call at all on a sampler's hot path


def full_precision(device_type: str) -> contextlib.AbstractContextManager[object]:
    """Autocast off on ``device_type``: ``torch.autocast(..., enabled=False)`` when autocast is
    on there, else a null context (entering autocast costs ~4 us, and a sampler's step calls
    this a few times per element)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
