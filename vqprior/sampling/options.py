"""Argument checks for :func:`vqprior.sampling.sample`: one clear ValueError per mistake."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from vqprior.models.checks import check_data
from vqprior.nn.mixture import mixture_sample
from vqprior.nn.step import supports_steps

if TYPE_CHECKING:
    from vqprior.models.pixelcnn import PixelCNN


class Run(NamedTuple):
    """Checked arguments of one sampling run (the batch is 2n under guidance)."""

    batch: int
    cond: Tensor | None
    spatial_cond: Tensor | None
    known: Tensor | None
    mask: Tensor | None
    guidance: float | None
    cached: bool  # the backbone has the step interface


def prepare(
    model: PixelCNN,
    n: int,
    cond: Tensor | int | None,
    temperature: float,
    spatial_cond: Tensor | None,
    known: Tensor | None,
    mask: Tensor | None,
    top_k: int | None,
    top_p: float | None,
    guidance: float | None,
) -> Run:
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    device = next(model.parameters()).device
    labels = _labels(model, n, cond, device)
    spatial = None if spatial_cond is None else spatial_cond.to(device)
    _check_truncation(model, top_k, top_p)
    known, mask = _completion(model, n, known, mask, device)
    batch = n
    if guidance is not None:
        labels, spatial = _guided(model, n, labels, spatial, guidance)
        batch = 2 * n
    return Run(batch, labels, spatial, known, mask, guidance, supports_steps(model.backbone))


def _labels(
    model: PixelCNN, n: int, cond: Tensor | int | None, device: torch.device
) -> Tensor | None:
    if cond is None:
        return None
    t = torch.as_tensor(cond, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.dtype.is_floating_point or t.shape != (n,):
        raise ValueError(f"cond must be one integer label or an integer tensor of shape [{n}]")
    if model.null_class is not None and t.numel() and int(t.max()) >= model.config.num_classes:
        raise ValueError(f"class labels must lie in [0, {model.config.num_classes})")
    return t.long()


def _check_truncation(model: PixelCNN, top_k: int | None, top_p: float | None) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must lie in (0, 1]")
    if (top_k is not None or top_p is not None) and model.config.mixture:
        params = inspect.signature(mixture_sample).parameters
        if "top_k" not in params or "top_p" not in params:
            raise ValueError(
                "top_k/top_p truncate categorical heads; this prior has head='mixture'"
            )


def _completion(
    model: PixelCNN, n: int, known: Tensor | None, mask: Tensor | None, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    if known is None and mask is None:
        return None, None
    if known is None or mask is None:
        raise ValueError("completion needs both known (values) and mask (True: keep known)")
    shape = (n, *model.data_shape)
    try:
        known = known.to(device).expand(shape)
        mask = mask.to(device).expand(shape)
    except RuntimeError:
        raise ValueError(
            f"known {list(known.shape)} and mask {list(mask.shape)} must be of shape "
            f"{list(shape)} (or {list(shape[1:])})"
        ) from None
    if mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor (True: keep the known value)")
    check_data(model.config, known, model.data_shape)
    if model.config.mixture and not torch.equal(mask.any(1), mask.all(1)):
        raise ValueError("the mixture head couples a pixel's channels: mask whole pixels")
    dtype = torch.long if model.config.data == "codes" else model.head_dtype()
    return known.to(dtype), mask


def _guided(
    model: PixelCNN, n: int, labels: Tensor | None, spatial: Tensor | None, scale: float
) -> tuple[Tensor, Tensor | None]:
    """The doubled batch: conditional first, then the null class."""
    null = model.null_class
    if null is None:
        raise ValueError(
            "guidance needs a prior trained with class_dropout > 0 (a learned null class)"
        )
    if model.config.mixture:
        raise ValueError("guidance mixes categorical log-probabilities; head='mixture' has none")
    if labels is None:
        raise ValueError(
            f"this prior is class-conditional ({model.config.num_classes} classes): pass cond"
        )
    if not scale >= 0:
        raise ValueError(f"guidance={scale} must be >= 0")
    both = torch.cat([labels, torch.full_like(labels, null)])
    return both, None if spatial is None else torch.cat([spatial, spatial])
