"""Input checks of :class:`vqprior.PixelCNN`: one clear ValueError line per mistake.

Shape and dtype checks read metadata only and always run. Value checks (codes in [0, K),
pixels in [-1, 1], labels in range) need a host sync, so they run only when ``values`` is
True and never under ``torch.compile`` (a sync would break the graph): training steps pass
``values=False`` (``PixelCNN.log_prob(..., check=False)``) for data that was checked or
built in range when loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vqprior.models.pixelcnn import PixelCNNConfig

PIXEL_TOLERANCE = 1e-5  # rounding slack around [-1, 1]


def wants_value_check(values: bool, x: Tensor) -> bool:
    """Whether to run a value check (a host sync) on ``x``: asked for, not compiling, non-empty."""
    return values and not torch.compiler.is_compiling() and x.numel() > 0


def check_data(cfg: PixelCNNConfig, x: Tensor, want: tuple[int, ...], values: bool = True) -> None:
    """Codes long [b, h, w] in [0, K); pixels float [b, c, H, W] in [-1, 1] (the ranges only
    when ``values``, see the module docstring)."""
    if tuple(x.shape[1:]) != want or x.dim() != len(want) + 1:
        layout = "[b, h, w] codes" if cfg.data == "codes" else "[b, c, H, W] pixels"
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not fit this prior: expected {layout} "
            f"with trailing shape {want}"
        )
    if cfg.data == "codes":
        if x.dtype.is_floating_point:
            raise ValueError("codes must be an integer tensor")
        if wants_value_check(values, x) and (int(x.min()) < 0 or int(x.max()) >= cfg.num_codes):
            raise ValueError(
                f"codes must lie in [0, {cfg.num_codes}); got [{int(x.min())}, {int(x.max())}]"
            )
        return
    if not x.dtype.is_floating_point:
        raise ValueError("pixels must be floats in [-1, 1] (8-bit value v maps to 2v/255 - 1)")
    if wants_value_check(values, x):
        lo, hi = (float(t) for t in x.detach().aminmax())
        if not (lo >= -1 - PIXEL_TOLERANCE and hi <= 1 + PIXEL_TOLERANCE):
            raise ValueError(
                f"pixels must lie in [-1, 1], got values in [{lo:g}, {hi:g}]: map 8-bit values "
                "v with 2v/255 - 1 (a [0, 1] tensor u with 2u - 1)"
            )


def check_cond(cfg: PixelCNNConfig, cond: Tensor | None, b: int, values: bool = True) -> None:
    """Class labels long [b] in [0, num_classes) (or the null class num_classes if learned;
    the range only when ``values``)."""
    if not cfg.num_classes:
        if cond is not None:
            raise ValueError("this prior is unconditional (num_classes=0): cond must be None")
        return
    if cond is None:
        raise ValueError(f"this prior is class-conditional ({cfg.num_classes} classes): pass cond")
    if cond.shape != (b,) or cond.dtype.is_floating_point:
        raise ValueError(f"cond must be an integer tensor of shape [{b}]")
    top = cfg.num_classes + int(cfg.has_null_class)
    if wants_value_check(values, cond) and (int(cond.min()) < 0 or int(cond.max()) >= top):
        raise ValueError(f"class labels must lie in [0, {cfg.num_classes})")


def check_spatial(cfg: PixelCNNConfig, spatial: Tensor | None, b: int) -> None:
    """A spatial condition float [b, s, H, W] exactly when spatial_cond_channels = s > 0
    (shapes and dtype only: no value check, no sync)."""
    s = cfg.spatial_cond_channels
    if not s:
        if spatial is not None:
            raise ValueError(
                "this prior takes no spatial condition (spatial_cond_channels=0): "
                "spatial_cond must be None"
            )
        return
    want = (b, s, cfg.height, cfg.width)
    if spatial is None:
        raise ValueError(f"this prior takes a spatial condition of shape {list(want)}: pass it")
    if tuple(spatial.shape) != want or not spatial.dtype.is_floating_point:
        raise ValueError(
            f"spatial_cond must be a float tensor of shape {list(want)}, "
            f"got {spatial.dtype} {list(spatial.shape)}"
        )
