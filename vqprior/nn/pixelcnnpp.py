"""PixelCNN++ backbone (Salimans et al. 2017, openai/pixel-cnn) as a PyTorch module.

The layers live in :mod:`vqprior.nn.pixelcnnpp_layers`, the exact incremental evaluation
(the step protocol of :mod:`vqprior.nn.step`) in :mod:`vqprior.nn.pixelcnnpp_step`.

Two streams run side by side at every resolution:

- ``u`` (down-shifted convolutions): at scale ``s`` (factor ``f = 2**s``) the feature at
  row ``p`` depends only on input rows ``< p * f``, i.e. rows strictly above its block.
- ``ul`` (down-right-shifted convolutions, plus ``u`` at the same position): the feature at
  ``(p, q)`` depends only on input pixels strictly before ``(p * f, q * f)`` in raster
  order, i.e. before the first pixel of its block.

Derivation, with ``conv`` reading a ``kh x kw`` window after padding (no padding anywhere
else, so every read below is exact):

- ``DownShiftedConv2d`` pads ``kh - 1`` rows on top and ``(kw - 1) // 2`` columns on each
  side: output ``(i, j)`` reads rows ``i - kh + 1 .. i`` and columns ``j - kw//2 .. j + kw//2``.
  Reading rows ``<= i`` of a ``u`` map keeps the ``u`` property; with stride 2 and
  ``kh = 2`` output row ``p`` reads rows ``2p - 1, 2p``, which depend on rows ``< 2p * f``.
- ``DownRightShiftedConv2d`` pads ``kh - 1`` rows on top and ``kw - 1`` columns on the left:
  output ``(i, j)`` reads ``(i', j')`` with ``i' <= i`` and ``j' <= j``; each such ``ul``
  feature only sees pixels before ``(i' f, j' f)``, which is not after ``(i f, j f)``, so the
  ``ul`` property holds (and with stride 2 the reads are ``(2p - 1 .. 2p, 2q - 1 .. 2q)``).
- The transposed convolutions (stride 2, ``kh = 2``) write input row ``r`` to output rows
  ``2r, 2r + 1`` only, so output row ``y`` reads row ``y // 2``: for ``u`` that sees rows
  ``< (y // 2) * 2f <= y * f``. The ``2 x 2`` down-right one maps ``(y, x)`` to
  ``(y // 2, x // 2)``, whose pixels precede ``(2 (y // 2) f, 2 (x // 2) f) <= (y f, x f)``.
- The raw input breaks the properties (a conv at ``(i, j)`` reads ``(i, j)`` itself), so the
  first layers are shifted once more: ``u = down_shift(conv_2x3(x))`` reads rows
  ``i - 2, i - 1``; ``ul = down_shift(conv_1x3(x)) + right_shift(conv_2x1(x))`` reads row
  ``i - 1`` (columns ``j - 1 .. j + 1``) and ``(i - 1, j - 1), (i, j - 1)``.

So the output at pixel ``(i, j)`` sees nothing of pixel ``(i, j)`` or later pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqprior.nn.pixelcnnpp_layers import (
    ConvFactory,
    DownRightShiftedConv2d,
    DownRightShiftedDeconv2d,
    DownShiftedConv2d,
    DownShiftedDeconv2d,
    GatedResnet,
    down_shift,
    right_shift,
)
from vqprior.nn.pixelcnnpp_step import PixelCNNPPSteps

if TYPE_CHECKING:
    from vqprior.nn.step import StepContext


def _blocks(
    n: int, channels: int, make_conv: ConvFactory, aux: int, dropout: float, cond_dim: int
) -> nn.ModuleList:
    return nn.ModuleList(GatedResnet(channels, make_conv, aux, dropout, cond_dim) for _ in range(n))


def _pairs(blocks_u: nn.Module, blocks_ul: nn.Module) -> Iterator[tuple[nn.Module, nn.Module]]:
    """Zip two equally long ``nn.ModuleList`` of blocks (one per stream)."""
    return zip(cast(nn.ModuleList, blocks_u), cast(nn.ModuleList, blocks_ul), strict=True)


def _check_args(
    in_channels: int, channels: int, nr_resnet: int, num_scales: int, dropout: float, cond_dim: int
) -> None:
    for name, value in [
        ("in_channels", in_channels),
        ("channels", channels),
        ("nr_resnet", nr_resnet),
        ("num_scales", num_scales),
    ]:
        if value < 1:
            raise ValueError(f"PixelCNNPPBackbone: {name} must be >= 1, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"PixelCNNPPBackbone: dropout must be in [0, 1), got {dropout}")
    if cond_dim < 0:
        raise ValueError(f"PixelCNNPPBackbone: cond_dim must be >= 0, got {cond_dim}")


class PixelCNNPPBackbone(nn.Module):
    """PixelCNN++ feature extractor: ``x [b, in_channels, H, W] -> [b, channels, H, W]``.

    The output at pixel ``(i, j)`` depends only on input pixels strictly before ``(i, j)`` in
    raster order (all channels), never on pixel ``(i, j)`` itself; the caller adds the
    within-pixel channel dependencies. ``H`` and ``W`` must be divisible by
    ``2 ** (num_scales - 1)``. ``cond [b, cond_dim]`` is required iff ``cond_dim > 0``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 80,
        nr_resnet: int = 5,
        num_scales: int = 3,
        dropout: float = 0.5,
        cond_dim: int = 0,
    ) -> None:
        super().__init__()
        _check_args(in_channels, channels, nr_resnet, num_scales, dropout, cond_dim)
        self.in_channels, self.channels = in_channels, channels
        self.num_scales, self.cond_dim = num_scales, cond_dim
        c, c_in = channels, in_channels + 1  # + the constant ones channel
        self.u_init = DownShiftedConv2d(c_in, c, (2, 3))
        self.ul_init_above = DownShiftedConv2d(c_in, c, (1, 3))
        self.ul_init_left = DownRightShiftedConv2d(c_in, c, (2, 1))
        conv_u = functools.partial(DownShiftedConv2d, kernel=(2, 3))
        conv_ul = functools.partial(DownRightShiftedConv2d, kernel=(2, 2))
        args = (dropout, cond_dim)
        self.down_u = nn.ModuleList(
            _blocks(nr_resnet, c, conv_u, 0, *args) for _ in range(num_scales)
        )
        self.down_ul = nn.ModuleList(
            _blocks(nr_resnet, c, conv_ul, c, *args) for _ in range(num_scales)
        )
        # up pass, finest scale first; the coarsest scale has one skip fewer (its top is popped)
        n_up = [nr_resnet + 1] * (num_scales - 1) + [nr_resnet]
        self.up_u = nn.ModuleList(_blocks(n, c, conv_u, c, *args) for n in n_up)
        self.up_ul = nn.ModuleList(_blocks(n, c, conv_ul, 2 * c, *args) for n in n_up)
        n_res = num_scales - 1
        self.downsample_u = nn.ModuleList(DownShiftedConv2d(c, c, (2, 3), 2) for _ in range(n_res))
        self.downsample_ul = nn.ModuleList(
            DownRightShiftedConv2d(c, c, (2, 2), 2) for _ in range(n_res)
        )
        self.upsample_u = nn.ModuleList(DownShiftedDeconv2d(c, c) for _ in range(n_res))
        self.upsample_ul = nn.ModuleList(DownRightShiftedDeconv2d(c, c) for _ in range(n_res))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x [b, in_channels, H, W]``, ``cond [b, cond_dim] | None`` -> ``[b, channels, H, W]``."""
        self._check_inputs(x, cond)
        ones = torch.ones_like(x[:, :1])  # tells zero padding from zero-valued pixels
        x = torch.cat([x, ones], dim=1)
        u_list, ul_list = self._down_pass(x, cond)
        return F.elu(self._up_pass(u_list, ul_list, cond))

    # -- step interface (vqprior.nn.step): exact incremental evaluation, in pixelcnnpp_step.py
    def start_steps(self, ctx: StepContext) -> PixelCNNPPSteps:
        """Caches for one batch of ``ctx.n`` images of ``ctx.height x ctx.width``."""
        return PixelCNNPPSteps(self, ctx.n, ctx.height, ctx.width, ctx.cond)

    def step_output(self, state: PixelCNNPPSteps, r: int, c: int) -> Tensor:
        """Features ``[n, channels]`` at ``(r, c)`` given the pixels written before it."""
        return state.output(r, c)

    def step_write(self, state: PixelCNNPPSteps, r: int, c: int, inp: Tensor) -> None:
        """Commit the network input ``inp [n, in_channels]`` at ``(r, c)``."""
        state.write(r, c, inp)

    def _check_inputs(self, x: Tensor, cond: Tensor | None) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PixelCNNPPBackbone expects x of shape [b, {self.in_channels}, H, W], "
                f"got {list(x.shape)}"
            )
        factor = 2 ** (self.num_scales - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"PixelCNNPPBackbone with num_scales={self.num_scales} needs H and W divisible "
                f"by {factor}, got H={x.shape[2]}, W={x.shape[3]}; resize/pad the input or "
                "lower num_scales"
            )
        if self.cond_dim == 0 and cond is not None:
            raise ValueError("PixelCNNPPBackbone was built with cond_dim=0 but got a cond")
        if self.cond_dim > 0 and (cond is None or cond.shape != (x.shape[0], self.cond_dim)):
            got = None if cond is None else list(cond.shape)
            raise ValueError(
                f"PixelCNNPPBackbone expects cond of shape [{x.shape[0]}, {self.cond_dim}], "
                f"got {got}"
            )

    def _down_pass(self, x: Tensor, cond: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
        """Return every down-pass activation of both streams, finest first."""
        u_list = [down_shift(self.u_init(x))]
        ul_list = [down_shift(self.ul_init_above(x)) + right_shift(self.ul_init_left(x))]
        for s in range(self.num_scales):
            if s > 0:
                u_list.append(self.downsample_u[s - 1](u_list[-1]))
                ul_list.append(self.downsample_ul[s - 1](ul_list[-1]))
            for block_u, block_ul in _pairs(self.down_u[s], self.down_ul[s]):
                u_list.append(block_u(u_list[-1], cond=cond))
                ul_list.append(block_ul(ul_list[-1], u_list[-1], cond=cond))
        return u_list, ul_list

    def _up_pass(self, u_list: list[Tensor], ul_list: list[Tensor], cond: Tensor | None) -> Tensor:
        """Consume the down-pass activations (long skips), coarsest first; return ``ul``."""
        u, ul = u_list.pop(), ul_list.pop()
        for s in reversed(range(self.num_scales)):
            if s < self.num_scales - 1:
                u = self.upsample_u[s](u)
                ul = self.upsample_ul[s](ul)
            for block_u, block_ul in _pairs(self.up_u[s], self.up_ul[s]):
                u = block_u(u, u_list.pop(), cond=cond)
                ul = block_ul(ul, torch.cat([u, ul_list.pop()], dim=1), cond=cond)
        assert not u_list and not ul_list, "every down-pass activation is used once"
        return ul
