"""Causal masks and masked convolutions.

Raster order is (row, column, channel group). An element at pixel ``(i, j)`` in channel group
``g`` may depend on every element of an earlier pixel and on groups ``< g`` (mask type A) or
``<= g`` (type B) of its own pixel. Channels are split into ``G`` contiguous groups:
``G = 3`` for RGB (R sees nothing of the current pixel, G sees R, B sees R and G),
``G = 1`` for grayscale and code maps.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MaskType = Literal["A", "B"]


def channel_groups(num_channels: int, num_groups: int) -> Tensor:
    """Group index of each channel: ``num_groups`` contiguous blocks. Shape [num_channels]."""
    if num_groups < 1 or num_channels % num_groups:
        raise ValueError(
            f"{num_channels} channels cannot be split into {num_groups} equal channel groups"
        )
    return torch.arange(num_channels) // (num_channels // num_groups)


def causal_mask(
    kernel_size: int | tuple[int, int],
    mask_type: MaskType,
    in_groups: Tensor,
    out_groups: Tensor,
    center: tuple[int, int] | None = None,
) -> Tensor:
    """Mask [out, in, kh, kw] for a kernel whose output sits at ``center`` (default: the middle).

    Kernel taps before the center in raster order are open, taps after it are closed, and the
    center tap connects input group ``gi`` to output group ``go`` iff ``gi < go`` (type A) or
    ``gi <= go`` (type B).
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    ci, cj = (kh // 2, kw // 2) if center is None else center
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    if not (0 <= ci < kh and 0 <= cj < kw):
        raise ValueError(f"center {center} lies outside the {kh}x{kw} kernel")
    rows = torch.arange(kh).view(kh, 1)
    cols = torch.arange(kw).view(1, kw)
    before = (rows < ci) | ((rows == ci) & (cols < cj))  # [kh, kw]
    go = out_groups.view(-1, 1)
    gi = in_groups.view(1, -1)
    center_open = gi < go if mask_type == "A" else gi <= go  # [out, in]
    mask = before.expand(len(out_groups), len(in_groups), kh, kw).clone().float()
    mask[:, :, ci, cj] = center_open.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A convolution with explicit (left, right, top, bottom) padding and an optional mask.

    The mask multiplies the weight inside ``forward`` (the stored weight is never mutated, so
    optimiser state and weight decay see the true parameter). Negative padding crops.
    """

    mask: Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        pad: tuple[int, int, int, int] = (0, 0, 0, 0),
        mask: Tensor | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=0, bias=bias)
        self.pad = pad
        if mask is not None and mask.shape != self.weight.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}"
            )
        self.register_buffer("mask", mask, persistent=False)
        # an all-ones mask (e.g. 1x1 type B with one group) is skipped; without autograd the
        # masked weight is reused while the weight, the mask and the dtype are unchanged
        self._mask_key: tuple[int, int] | None = None
        self._mask_trivial = False
        self._cache: tuple[tuple[object, ...], Tensor] | None = None

    @classmethod
    def causal(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        mask_type: MaskType,
        groups: int = 1,
        in_groups: Tensor | None = None,
        out_groups: Tensor | None = None,
    ) -> MaskedConv2d:
        """A 'same'-padded ``k x k`` PixelCNN convolution masked for raster order over groups."""
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        gi = channel_groups(in_channels, groups) if in_groups is None else in_groups
        go = channel_groups(out_channels, groups) if out_groups is None else out_groups
        p = kernel_size // 2
        mask = causal_mask(kernel_size, mask_type, gi, go)
        return cls(in_channels, out_channels, (kernel_size, kernel_size), (p, p, p, p), mask)

    def _trivial_mask(self, mask: Tensor) -> bool:
        key = (mask.data_ptr(), mask._version)
        if key != self._mask_key:
            self._mask_key, self._mask_trivial = key, bool(mask.eq(1).all())
        return self._mask_trivial

    def masked_weight(self) -> Tensor:
        """``weight * mask`` (differentiable whenever autograd records)."""
        mask, weight = self.mask, self.weight
        if mask is None:
            return weight
        if torch.compiler.is_compiling():
            return weight * mask
        if self._trivial_mask(mask):
            return weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return weight * mask
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, self._mask_key)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, (weight * mask).detach())
        return self._cache[1]

    def forward(self, x: Tensor) -> Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return F.conv2d(x, self.masked_weight(), self.bias)
