"""Gated PixelCNN blocks with vertical and horizontal stacks (van den Oord et al. 2016).

Convention used throughout (and by the cached sampler in :mod:`vqprior.sampling`):

- vertical-stack features at row ``r`` depend only on input rows ``< r``: the first layer's
  vertical kernel covers rows ``r-p .. r-1`` (``p = k // 2``), later layers rows ``r-p .. r``
  of the previous vertical features, all ``k`` columns ``c-p .. c+p``;
- horizontal-stack features at ``(r, c)`` depend on vertical features of row ``r`` (a 1x1
  link; they hold rows above only) and on horizontal features of row ``r``, columns
  ``c-p .. c``, masked at ``c`` for channel groups (type A in the first layer, B after).

So the receptive field is the whole cone above plus the row to the left: no blind spot.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqprior.nn.masked import MaskedConv2d, causal_mask, channel_groups


def gate(x: Tensor) -> Tensor:
    """tanh(a) * sigmoid(b) for x = [a | b] along channels: [b, 2F, ...] -> [b, F, ...]."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class LayerOut(NamedTuple):
    v: Tensor  # [b, F, H, W] gated vertical features
    h: Tensor  # [b, F, H, W] horizontal features (residual stream)
    skip: Tensor  # [b, F, H, W]


class GatedLayer(nn.Module):
    """One gated layer: vertical stack, horizontal stack, residual and skip outputs."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int,
        groups: int,
        first: bool,
        cond_dim: int = 0,
        spatial_channels: int = 0,
        last: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"gated layers need an odd kernel_size >= 3, got {kernel_size}")
        p = kernel_size // 2
        self.first, self.p = first, p
        in_groups = channel_groups(in_channels, groups)
        hid = channel_groups(channels, groups)
        hid2 = torch.cat([hid, hid])  # gate halves [a | b] keep the group layout
        v_rows = p if first else p + 1
        v_pad = (p, p, p, -1) if first else (p, p, p, 0)  # negative bottom pad crops one row
        self.v_conv = MaskedConv2d(in_channels, 2 * channels, (v_rows, kernel_size), v_pad)
        h_mask = causal_mask((1, p + 1), "A" if first else "B", in_groups, hid2, center=(0, p))
        self.h_conv = MaskedConv2d(in_channels, 2 * channels, (1, p + 1), (p, 0, 0, 0), h_mask)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        mask_b = causal_mask(1, "B", hid, hid)
        # the last layer's residual output is never read: build no unused weights (DDP needs that)
        self.h_res = None if last else MaskedConv2d(channels, channels, (1, 1), mask=mask_b)
        self.h_skip = MaskedConv2d(channels, channels, (1, 1), mask=mask_b.clone())
        self.cond = nn.Linear(cond_dim, 4 * channels, bias=False) if cond_dim else None
        self.spatial = (
            nn.Conv2d(spatial_channels, 4 * channels, 1, bias=False) if spatial_channels else None
        )

    def biases(
        self, cond: Tensor | None, spatial: Tensor | None
    ) -> tuple[Tensor | float, Tensor | float]:
        """Conditioning biases for the vertical and horizontal pre-activations.

        cond [b, cond_dim] gives [b, 2F, 1, 1] each; spatial [b, s, H, W] gives [b, 2F, H, W].
        """
        total: Tensor | float = 0.0
        if self.cond is not None:
            if cond is None:
                raise ValueError("this layer is conditional: pass a class embedding")
            total = self.cond(cond)[:, :, None, None]
        if self.spatial is not None:
            if spatial is None:
                raise ValueError("this model takes a spatial condition: pass spatial_cond")
            total = total + self.spatial(spatial)
        if isinstance(total, float):
            return 0.0, 0.0
        bv, bh = total.chunk(2, dim=1)
        return bv, bh

    def forward(
        self, v: Tensor, h: Tensor, bv: Tensor | float = 0.0, bh: Tensor | float = 0.0
    ) -> LayerOut:
        v_pre = self.v_conv(v) + bv  # [b, 2F, H, W]
        h_pre = self.h_conv(h) + self.v_to_h(v_pre) + bh
        h_gated = gate(h_pre)
        if self.h_res is None:
            h_out = h
        else:
            h_out = self.h_res(h_gated) if self.first else self.h_res(h_gated) + h
        return LayerOut(gate(v_pre), h_out, self.h_skip(h_gated))


class GatedStack(nn.Module):
    """``num_layers`` gated layers; returns the summed skip features [b, F, H, W]."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_layers: int,
        kernel_size: int = 3,
        groups: int = 1,
        cond_dim: int = 0,
        spatial_channels: int = 0,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            GatedLayer(
                in_channels if i == 0 else channels,
                channels,
                kernel_size,
                groups,
                first=i == 0,
                cond_dim=cond_dim,
                spatial_channels=spatial_channels,
                last=i == num_layers - 1,
            )
            for i in range(num_layers)
        )

    @property
    def gated_layers(self) -> list[GatedLayer]:
        return [layer for layer in self.layers if isinstance(layer, GatedLayer)]

    def forward(
        self, x: Tensor, cond: Tensor | None = None, spatial: Tensor | None = None
    ) -> Tensor:
        v, h, skips = x, x, 0.0
        for layer in self.gated_layers:
            bv, bh = layer.biases(cond, spatial)
            v, h, skip = layer(v, h, bv, bh)
            skips = skips + skip
        assert isinstance(skips, Tensor)
        return skips


class CausalHead(nn.Module):
    """ReLU -> 1x1 (type B) -> ReLU -> 1x1 (type B) to ``out_channels`` with given out groups."""

    def __init__(self, channels: int, out_channels: int, groups: int, out_groups: Tensor) -> None:
        super().__init__()
        hid = channel_groups(channels, groups)
        self.hidden = MaskedConv2d(channels, channels, (1, 1), mask=causal_mask(1, "B", hid, hid))
        self.out = MaskedConv2d(
            channels, out_channels, (1, 1), mask=causal_mask(1, "B", hid, out_groups)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.hidden(F.relu(x))))
