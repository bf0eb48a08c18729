"""Where mixed precision stops: likelihoods, heads' last layers and codebook distances run
in float32 (float64 stays float64) with autocast off."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

__all__ = ["constants", "full_precision", "upcast", "wide_dtype"]


def wide_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of ``dtypes`` is float64, else float32: where full precision computes."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def upcast(t: Tensor) -> Tensor:
    """``t`` in :func:`wide_dtype` (float32, or unchanged if it is already float64)."""
    return as_dtype(t, wide_dtype(t.dtype))


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, with no call when it already is (a no-op ``Tensor.to`` costs a few
    microseconds, and a sampler's step makes several per element)."""
    return t if t.dtype == dtype else t.to(dtype)


def full_precision(device_type: str) -> contextlib.AbstractContextManager[object]:
    """Autocast off on ``device_type``: ``torch.autocast(..., enabled=False)`` when autocast is
    on there, else a null context (entering autocast costs ~4 us, and a sampler's step calls
    this a few times per element)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def constants(
    values: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, ...]:
    """``values`` as 0-dim tensors of ``dtype`` on ``device``, made once per key (read-only).

    An op with a Python number wraps it in a new tensor on every call (on CPU ~1 us, as much as
    a small op itself); a sampler's per-element ops take these instead, with the same results
    (the number is cast to ``dtype`` either way). Made outside inference mode, so they serve
    every mode."""
    with torch.inference_mode(False):
        return tuple(torch.tensor(v, dtype=dtype, device=device) for v in values)
