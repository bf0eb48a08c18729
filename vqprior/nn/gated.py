"""Gated PixelCNN blocks with vertical and horizontal stacks (van den Oord et al. 2016).

Convention used throughout (and by the step protocol of :mod:`vqprior.nn.step`):

- vertical-stack features at row ``r`` depend only on input rows ``< r``: the first layer's
  vertical kernel covers rows ``r-p .. r-1`` (``p = k // 2``), later layers rows ``r-p .. r``
  of the previous vertical features, all ``k`` columns ``c-p .. c+p``;
- horizontal-stack features at ``(r, c)`` depend on vertical features of row ``r`` (a 1x1
  link; they hold rows above only) and on horizontal features of row ``r``, columns
  ``c-p .. c``, masked at ``c`` for channel groups (type A in the first layer, B after).

So the receptive field is the whole cone above plus the row to the left: no blind spot.
Every layer also steps incrementally (``start_steps`` / ``step_row`` / ``step_element``),
computing exactly what its ``forward`` computes at one row or one element.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqprior.nn.attention import AttentionBlock
from vqprior.nn.layout import channel_halves, is_channels_last, ring_kernels
from vqprior.nn.masked import MaskedConv2d, causal_mask, channel_groups
from vqprior.nn.precision import as_dtype, full_precision, wide_dtype
from vqprior.nn.step import LayerOut, StepBlock, StepContext

Bias = Tensor | float


def gate(x: Tensor) -> Tensor:
    """tanh(a) * sigmoid(b) for x = [a | b] along channels: [b, 2F, ...] -> [b, F, ...]."""
    a, b = channel_halves(x)
    return torch.tanh(a) * torch.sigmoid(b)


def _plus(x: Tensor, bias: Bias) -> Tensor:
    """``x + bias``; no pass over ``x`` for the float 0.0 of an unconditional layer."""
    return x if isinstance(bias, float) and bias == 0.0 else x + bias


def _weight(conv: nn.Conv2d) -> Tensor:
    return conv.masked_weight() if isinstance(conv, MaskedConv2d) else conv.weight


def conv1x1_fp32(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Apply a 1x1 ``conv`` to ``x`` [b, Cin, h, w] in fp32 (fp64 stays fp64), autocast off.

    For the last layer of a head: its output feeds the likelihood, whose parameters (means,
    log-scales, logits) must not be rounded to bf16 under mixed precision. The output is NCHW
    whatever ``x``'s layout (:class:`_NCHWConv1x1`), as the likelihoods, which work per
    component, want it.
    """
    weight = _weight(conv)
    dtype = wide_dtype(x.dtype, weight.dtype)
    bias = None if conv.bias is None else conv.bias.to(dtype)
    with full_precision(x.device.type):
        if not is_channels_last(x):
            return F.conv2d(x.to(dtype), weight.to(dtype), bias)
        out = _NCHWConv1x1.apply(x.to(dtype), weight.to(dtype)[:, :, 0, 0])
        return out if bias is None else out + bias[:, None, None]


class _NCHWConv1x1(torch.autograd.Function):
    """A 1x1 convolution ``weight [Cout, Cin]`` of a channels-last map ``x [b, Cin, h, w]``
    with an NCHW output: one matrix product per image reads ``x`` in place (the transposing
    copy of a channels-last output and of its gradient cost ~2-3% of a pixel prior's step on
    a CPU), and ``x``'s gradient comes back channels-last, as ``x``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor) -> Tensor:
        b, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view of a dense map
        ctx.save_for_backward(pixels, weight)
        # bmm straight into [b, Cout, hw] (matmul folds the batch into rows, then copies)
        return torch.bmm(weight.expand(b, -1, -1), pixels.transpose(1, 2)).view(b, -1, h, w)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor]:
        pixels, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        b, hw, c = pixels.shape
        g = grad.reshape(b, -1, hw)  # [b, Cout, hw]
        grad_x = torch.bmm(g.transpose(1, 2), weight.expand(b, -1, -1))  # [b, hw, Cin]: CL
        h = grad.shape[2]
        return grad_x.view(b, h, -1, c).permute(0, 3, 1, 2), torch.bmm(g, pixels).sum(0)


def matrix_1x1(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A 1x1 ``conv`` (its mask applied) as ``[Cin, Cout]`` and its bias ``[Cout]`` (zeros when
    it has none), in ``dtype``: ``x @ w + b`` at one element, for the samplers' steps."""
    weight = _weight(conv)
    w = weight[:, :, 0, 0].t().to(dtype).contiguous()
    return w, _bias(conv, conv.out_channels, dtype, weight.device)


HeadStep = Callable[[Tensor], Tensor]


def last_1x1_step(conv: nn.Conv2d, dtype: torch.dtype) -> HeadStep:
    """:func:`conv1x1_fp32` at one element, ``[n, Cin] -> [n, Cout]``, its matrices prepared
    once (``dtype``: the features' dtype)."""
    wide = wide_dtype(dtype, conv.weight.dtype)
    w, b = matrix_1x1(conv, wide)

    def step(x: Tensor) -> Tensor:
        with full_precision(x.device.type):
            return torch.addmm(b, as_dtype(x, wide), w)

    return step


def _bias(conv: nn.Conv2d, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``conv``'s bias [n] (zeros when it has none) in ``dtype``."""
    if conv.bias is None:
        return torch.zeros(n, dtype=dtype, device=device)
    return conv.bias.to(dtype)


def _rows(cond: Bias, bias: Tensor, f2: int, dtype: torch.dtype) -> Tensor:
    """A conditioning bias (0, [n, 2F, 1, 1] or [n, 2F, H, W]) plus a layer bias [2F], laid
    out for the row step: [H | 1, n | 1, W | 1, 2F]."""
    if isinstance(cond, float):  # no conditioning: biases() gives 0.0
        return bias.view(1, 1, 1, f2)
    return rearrange(cond.to(dtype) + bias[:, None, None], "n c h w -> h n w c").contiguous()


@dataclass
class _GatedSteps:
    """Caches of one gated layer for one batch (see :meth:`GatedLayer.start_steps`). The
    per-element weights are transposed ([in, out]) for ``addmm``."""

    v_in: Tensor  # [n, W + 2p, kh, Cin] the last kh vertical input rows, zero padded: a
    # ring (row t in slot t % kh), read in place as one channels-last [n, kh Cin, 1, W + 2p] map
    v_ring: Tensor  # that map (a view)
    h_out: Tensor  # [n, pad + W, F] horizontal output of the current row
    h_bias_at: tuple[Tensor, ...]  # the current row's vertical link + conditioning + h bias
    # at each of its W columns, [n, 2F] (views of one [n, W, 2F]: no indexing per element)
    h_out_at: tuple[Tensor, ...]  # h_out's pad + W columns [n, F] (views)
    w_v: tuple[Tensor, ...]  # the masked vertical kernel over the ring, by r % kh (ring_kernels)
    w_link: Tensor  # [2F, 2F] the vertical-to-horizontal 1x1
    w_h: Tensor  # [(p + 1) * Cin, 2F] masked horizontal kernel, columns then channels
    w_res: Tensor | None  # [F, F]; None in the last layer (its residual output is unused)
    b_res: Tensor | None  # [F]
    w_skip: Tensor  # [F, F]
    bv: Tensor  # [H | 1, n | 1, W | 1, 2F] vertical pre-activation bias per row (+ v bias)
    bh: Tensor  # the same for the horizontal one (+ the h-conv and link biases)
    pad: int


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

    def biases(self, cond: Tensor | None, spatial: Tensor | None) -> tuple[Bias, Bias]:
        """Conditioning biases for the vertical and horizontal pre-activations.

        cond [b, cond_dim] gives [b, 2F, 1, 1] each; spatial [b, s, H, W] gives [b, 2F, H, W].
        """
        total: Bias = 0.0
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
        bv, bh = channel_halves(total)
        return bv, bh

    def forward(
        self, v: Tensor, h: Tensor, cond: Tensor | None = None, spatial: Tensor | None = None
    ) -> LayerOut:
        bv, bh = self.biases(cond, spatial)
        v_pre = _plus(self.v_conv(v), bv)  # [b, 2F, H, W]
        h_pre = _plus(self.h_conv(h) + self.v_to_h(v_pre), bh)
        h_gated = gate(h_pre)
        if self.h_res is None:
            h_out = h
        else:
            h_out = self.h_res(h_gated) if self.first else self.h_res(h_gated) + h
        return LayerOut(gate(v_pre), h_out, self.h_skip(h_gated))

    # ------------------------------------------------------------------ step protocol
    def start_steps(self, ctx: StepContext) -> _GatedSteps:
        """Allocate the row caches and fold the masks and the conditioning in once."""
        p, kh = self.p, self.v_conv.kernel_size[0]
        f2, cin = self.v_conv.out_channels, self.v_conv.in_channels
        n, W = ctx.n, ctx.width

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, device=ctx.device, dtype=ctx.dtype)

        bv, bh = self.biases(ctx.cond, ctx.spatial)
        res, dt, dev = self.h_res, ctx.dtype, ctx.device
        bv = _rows(bv, _bias(self.v_conv, f2, dt, dev), f2, dt)
        bh = _rows(bh, _bias(self.h_conv, f2, dt, dev) + _bias(self.v_to_h, f2, dt, dev), f2, dt)
        h_out = zeros(n, ctx.pad + W, f2 // 2)
        v_in = zeros(n, W + 2 * p, kh, cin)
        return _GatedSteps(
            v_in=v_in,
            v_ring=rearrange(v_in, "n w s i -> n (s i) 1 w"),
            h_out=h_out,
            h_bias_at=zeros(n, W, f2).unbind(1),
            h_out_at=h_out.unbind(1),
            w_v=ring_kernels(self.v_conv.masked_weight()),
            w_link=self.v_to_h.weight[:, :, 0, 0].t().to(dt).contiguous(),
            w_h=rearrange(self.h_conv.masked_weight(), "o i 1 k -> (k i) o").contiguous(),
            w_res=None if res is None else res.masked_weight()[:, :, 0, 0].t().contiguous(),
            b_res=None if res is None else _bias(res, f2 // 2, ctx.dtype, ctx.device),
            w_skip=self.h_skip.masked_weight()[:, :, 0, 0].t().contiguous(),
            bv=bv,
            bh=bh,
            pad=ctx.pad,
        )

    def step_row(self, state: _GatedSteps, r: int, v_in: Tensor) -> Tensor:
        """Vertical input row r [n, Cin, W] -> gated vertical output row r [n, F, W]: the
        vertical convolution over the ring of input rows, and the link as a matrix product."""
        p, kh = self.p, self.v_conv.kernel_size[0]
        n, _, w = v_in.shape
        state.v_in[:, p : p + w, r % kh] = v_in.transpose(1, 2)  # row r takes row r - kh's slot
        # the biases join the matrix products when they are one vector (no conditioning)
        bv, bh = state.bv[r % len(state.bv)], state.bh[r % len(state.bh)]
        flat_v, flat_h = bv.numel() == bv.shape[-1], bh.numel() == bh.shape[-1]
        v_conv = F.conv2d(state.v_ring, state.w_v[r % kh], bv.view(-1) if flat_v else None)
        v_pre = v_conv[:, :, 0].transpose(1, 2)  # [n, W, 2F] (channels-last: contiguous)
        v_pre = v_pre if flat_v else v_pre + bv
        rows = v_pre.reshape(n * w, -1)
        if flat_h:
            h_bias = torch.addmm(bh.view(-1), rows, state.w_link).view(n, w, -1)
        else:
            h_bias = (rows @ state.w_link).view(n, w, -1) + bh
        state.h_bias_at = h_bias.unbind(1)
        return gate(v_pre.transpose(1, 2))  # [n, F, W] (a view of [n, W, F])

    def step_element(
        self, state: _GatedSteps, r: int, c: int, h_row: Tensor, skips: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Horizontal stack at (r, c) from the input row ``h_row`` [n, pad + W, Cin] (column
        ``pad + c`` current); returns this layer's output row buffer and ``skips`` [n, F] plus
        this layer's skip. Four matrix products and the gate: the op count is the cost here."""
        p, at = self.p, state.pad + c
        window = h_row[:, at - p : at + 1].reshape(h_row.shape[0], -1)  # a view: [n, (k i)]
        hg = gate(torch.addmm(state.h_bias_at[c], window, state.w_h))  # [n, F]
        skips = torch.addmm(skips, hg, state.w_skip)
        if state.w_res is None or state.b_res is None:
            return h_row, skips  # the last layer: its residual stream is never read
        resid = state.b_res if self.first else h_row[:, at] + state.b_res
        torch.addmm(resid, hg, state.w_res, out=state.h_out_at[at])
        return state.h_out, skips


def _attention_block(
    channels: int, heads: int, groups: int, cond_dim: int, spatial: int
) -> AttentionBlock:
    """The causal self-attention block of :mod:`vqprior.nn.attention` (see nn/step.py)."""
    return AttentionBlock(
        channels=channels, heads=heads, groups=groups, cond_dim=cond_dim, spatial_channels=spatial
    )


@dataclass
class _StackSteps:
    blocks: list[Any]  # one state per block
    x_row: Tensor  # [n, pad + W, Cin] network input of the current row (left zero pad)
    skip_bias: Tensor  # [F] the gated layers' skip biases, summed
    row: int  # the row whose vertical stream has been computed (-1: none yet)
    pad: int  # left zero columns of the horizontal row buffers


class GatedStack(nn.Module):
    """``num_layers`` gated layers (and, every ``attention_every`` of them, an attention
    block); returns the summed skip features [b, F, H, W]."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_layers: int,
        kernel_size: int = 3,
        groups: int = 1,
        cond_dim: int = 0,
        spatial_channels: int = 0,
        attention_every: int = 0,
        attention_heads: int = 4,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.pad = kernel_size // 2
        blocks: list[nn.Module] = []
        for i in range(num_layers):
            blocks.append(
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
            )
            if attention_every and (i + 1) % attention_every == 0 and i < num_layers - 1:
                blocks.append(
                    _attention_block(channels, attention_heads, groups, cond_dim, spatial_channels)
                )
        self.layers = nn.ModuleList(blocks)

    def _blocks(self) -> list[StepBlock]:
        return [cast(StepBlock, block) for block in self.layers]

    @property
    def gated_layers(self) -> list[GatedLayer]:
        return [layer for layer in self.layers if isinstance(layer, GatedLayer)]

    def forward(
        self, x: Tensor, cond: Tensor | None = None, spatial: Tensor | None = None
    ) -> Tensor:
        v, h, skips = x, x, 0.0
        for block in self.layers:
            v, h, skip = block(v, h, cond, spatial)
            if skip is not None:
                skips = skips + skip
        assert isinstance(skips, Tensor)
        return skips

    # ------------------------------------------------------------------ step protocol
    def start_steps(self, ctx: StepContext) -> _StackSteps:
        ctx = ctx._replace(pad=max(ctx.pad, self.pad))
        layers = self.gated_layers
        cin = layers[0].v_conv.in_channels
        x_row = torch.zeros(ctx.n, ctx.pad + ctx.width, cin, device=ctx.device, dtype=ctx.dtype)
        f = layers[0].h_skip.out_channels
        skip_bias = sum(
            (_bias(layer.h_skip, f, ctx.dtype, ctx.device) for layer in layers),
            torch.zeros(f, dtype=ctx.dtype, device=ctx.device),
        )
        blocks = [block.start_steps(ctx) for block in self._blocks()]
        return _StackSteps(blocks, x_row, skip_bias, -1, ctx.pad)

    def step_write(self, state: _StackSteps, r: int, c: int, inp: Tensor) -> None:
        """Set the network input at (r, c) [n, Cin] (all of it, unwritten groups zero)."""
        if r != state.row:
            self._advance_row(state, r)
        state.x_row[:, state.pad + c] = inp

    def step_output(self, state: _StackSteps, r: int, c: int) -> Tensor:
        """Summed skip features at (r, c) [n, F], given every input written so far."""
        if r != state.row:
            self._advance_row(state, r)
        h, skips = state.x_row, state.skip_bias
        for block, block_state in zip(self._blocks(), state.blocks, strict=True):
            h, skips = block.step_element(block_state, r, c, h, skips)
        return skips.expand(h.shape[0], -1)  # [F] only if no block added a skip

    def _advance_row(self, state: _StackSteps, r: int) -> None:
        """Start row r: feed the finished input row r - 1 down the vertical stream."""
        if r != state.row + 1:
            raise ValueError(f"steps must visit rows in order: row {r} after row {state.row}")
        v = state.x_row[:, state.pad :].transpose(1, 2)  # input row r - 1 (zeros for r = 0)
        for block, block_state in zip(self._blocks(), state.blocks, strict=True):
            v = block.step_row(block_state, r, v)  # the first block copies its input row
        state.x_row.zero_()
        state.row = r


class CausalHead(nn.Module):
    """ReLU -> 1x1 (type B) -> ReLU -> 1x1 (type B) to ``out_channels`` with given out groups.

    The last 1x1 runs in fp32 with autocast off (:func:`conv1x1_fp32`)."""

    def __init__(self, channels: int, out_channels: int, groups: int, out_groups: Tensor) -> None:
        super().__init__()
        hid = channel_groups(channels, groups)
        self.hidden = MaskedConv2d(channels, channels, (1, 1), mask=causal_mask(1, "B", hid, hid))
        self.out = MaskedConv2d(
            channels, out_channels, (1, 1), mask=causal_mask(1, "B", hid, out_groups)
        )

    def forward(self, x: Tensor) -> Tensor:
        return conv1x1_fp32(self.out, F.relu(self.hidden(F.relu(x))))

    def start_steps(self, dtype: torch.dtype) -> HeadStep:
        """The head at one element, features [n, F] -> output [n, P], as two matrix products
        with the masks applied and the matrices laid out once per batch (``dtype``: the
        features')."""
        w, b = matrix_1x1(self.hidden, dtype)
        last = last_1x1_step(self.out, dtype)
        return lambda x: last(torch.relu(torch.addmm(b, torch.relu(x), w)))
