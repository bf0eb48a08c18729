"""Causal self-attention block for the gated PixelCNN backbone (issue 12).

:class:`vqprior.nn.gated.GatedStack` inserts an :class:`AttentionBlock` after every
``attention_every`` gated layers (``PixelCNNConfig.attention_every`` / ``attention_heads``).
The block reads the horizontal stream ``h`` ``[b, F, H, W]``, flattens it to the raster
sequence ``t = r * W + c`` and adds multi-head self-attention to it::

    z_t   = LayerNorm(h_t) + pos(r, c) + class bias + spatial bias at (r, c)
    o_t   = W_o softmax_{j <= t}(q_t . k_j / sqrt(d)) v_j      (q, k, v = linear maps of z)
    h'_t  = h_t + o_t        skip_t = o_t        (the vertical stream passes unchanged)

Why it is causal. In a gated stack the horizontal stream at element ``t`` is a function of the
elements *before* ``t`` only: the first gated layer masks the current element out (type A),
and later layers only combine features of elements ``<= t`` that already exclude it. So
``h_t``, and with it ``q_t``, ``k_t`` and ``v_t``, depend on ``x_{<t}``; the attention at ``t``
reads ``k_j, v_j`` for ``j <= t`` only (``is_causal``), hence ``o_t`` depends on ``x_{<t}``
too, and so does everything downstream. Attending to ``j = t`` itself is safe for that reason.
This holds for one channel group per element (codes, the mixture head, one-channel pixels).
With several channel groups (a ``num_bins``-way categorical head on RGB) the stream at ``t``
holds, in group ``g``'s channels, values of the earlier groups of element ``t``; attention mixes
all channels, so group 0 would see them: that configuration is rejected (:class:`ConfigError`).

Positions: a fixed sinusoidal encoding of the row in the first half of the channels and of
the column in the second (:func:`position_encoding`), the same in the full pass and the step.
Conditioning: a class embedding ``[b, cond_dim]`` and a spatial map ``[b, s, H, W]`` add
learned biases (no bias term) to ``z``, as the gated layers take them.

Step protocol (:mod:`vqprior.nn.step`): ``start_steps`` preallocates the key/value cache
``[n, heads, H * W, d]``; ``step_element`` at ``(r, c)`` writes the keys and values *at*
``t = r * W + c`` and lets the query at ``t`` attend over the cache ``[0 .. t]``, so
re-evaluating an element (one call per channel group) overwrites rather than appends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqprior.config import ConfigError
from vqprior.nn.precision import as_dtype, full_precision, wide_dtype
from vqprior.nn.step import LayerOut, StepContext

__all__ = ["AttentionBlock", "attend", "position_encoding"]


def attend(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = False) -> Tensor:
    """``scaled_dot_product_attention`` of ``[n, heads, T, d]`` queries, keys and values, in
    float32 or wider on CPU whatever autocast asks for: there the bf16 kernel's backward is ~2.4x slower
    than the float32 one (16x16 maps, 4 heads of 16; docs/benchmarks.md). Elsewhere (CUDA's
    flash kernels) the inputs' own dtype."""
    return _attend(q, k, v, is_causal=is_causal, float32=q.device.type == "cpu")


def _attend(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, float32: bool) -> Tensor:
    if not float32:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    wide = wide_dtype(q.dtype)  # float64 stays float64
    with full_precision(q.device.type):
        return F.scaled_dot_product_attention(
            as_dtype(q, wide), as_dtype(k, wide), as_dtype(v, wide), is_causal=is_causal
        )


def _sinusoid(pos: Tensor, dim: int) -> Tensor:
    """``[len]`` positions -> ``[len, dim]``: sin/cos pairs at geometric frequencies."""
    half = (dim + 1) // 2
    freq = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float64) / half)
    angle = pos.double()[:, None] * freq[None]  # [len, half]
    out = rearrange(torch.stack([angle.sin(), angle.cos()], -1), "n f two -> n (f two)")
    return out[:, :dim]


def position_encoding(
    height: int, width: int, channels: int, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """Fixed encoding ``[H * W, F]`` of raster position ``t = r * W + c``: row ``r`` in the
    first ``F // 2`` channels, column ``c`` in the rest (computed in float64, then cast)."""
    rows = _sinusoid(torch.arange(height), channels // 2)  # [H, F/2]
    cols = _sinusoid(torch.arange(width), channels - channels // 2)  # [W, F - F/2]
    grid = torch.cat(
        [rows[:, None].expand(-1, width, -1), cols[None].expand(height, -1, -1)], dim=-1
    )
    return rearrange(grid, "h w f -> (h w) f").to(device=device, dtype=dtype)


@dataclass
class _AttentionSteps:
    """Caches of one attention block for one batch (see :meth:`AttentionBlock.start_steps`)."""

    keys: Tensor  # [n, heads, H * W, d], written at t = r * W + c
    values: Tensor  # [n, heads, H * W, d]
    bias: Tensor  # [n, H * W, F] positions + class bias + spatial bias, per element
    h_out: Tensor  # [n, pad + W, F] this block's horizontal output row
    width: int
    pad: int


class AttentionBlock(nn.Module):
    """Pre-norm multi-head causal self-attention over the horizontal stream (module doc)."""

    def __init__(
        self,
        *,
        channels: int,
        heads: int = 4,
        groups: int = 1,
        cond_dim: int = 0,
        spatial_channels: int = 0,
    ) -> None:
        super().__init__()
        if groups > 1:
            raise ConfigError(
                f"attention mixes channels, so it cannot keep {groups} channel groups causal: "
                "use head=mixture or one channel with attention_every > 0"
            )
        if heads < 1 or channels % heads:
            raise ConfigError(f"channels={channels} must be divisible by attention_heads={heads}")
        self.channels, self.heads = channels, heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.cond = nn.Linear(cond_dim, channels, bias=False) if cond_dim else None
        self.spatial = (
            nn.Conv2d(spatial_channels, channels, 1, bias=False) if spatial_channels else None
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}"

    def _bias(
        self,
        n: int,
        height: int,
        width: int,
        cond: Tensor | None,
        spatial: Tensor | None,
        ref: Tensor,
    ) -> Tensor:
        """Positions plus conditioning for every element, ``[n or 1, H * W, F]``."""
        bias = position_encoding(height, width, self.channels, ref.dtype, ref.device)[None]
        if self.cond is not None:
            if cond is None:
                raise ValueError("this attention block is conditional: pass a class embedding")
            bias = bias + self.cond(cond)[:, None]
        if self.spatial is not None:
            if spatial is None:
                raise ValueError("this model takes a spatial condition: pass spatial_cond")
            bias = bias + rearrange(self.spatial(spatial), "b f h w -> b (h w) f")
        return bias.expand(n, -1, -1)

    def _qkv(self, h_tokens: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[n, T, F]`` tokens -> queries, keys, values ``[n, heads, T, d]``."""
        z = self.norm(h_tokens) + bias
        q, k, v = rearrange(self.qkv(z), "n t (three e d) -> three n e t d", three=3, e=self.heads)
        return q, k, v

    def forward(
        self, v: Tensor, h: Tensor, cond: Tensor | None = None, spatial: Tensor | None = None
    ) -> LayerOut:
        """Full pass: ``h`` ``[b, F, H, W]`` -> ``LayerOut(v, h + o, o)``."""
        b, _, height, width = h.shape
        tokens = rearrange(h, "b f h w -> b (h w) f")
        q, k, val = self._qkv(tokens, self._bias(b, height, width, cond, spatial, h))
        att = attend(q, k, val, is_causal=True)  # [b, e, T, d]
        o = self.out(rearrange(att, "b e t d -> b t (e d)"))
        o = rearrange(o, "b (h w) f -> b f h w", h=height, w=width)
        return LayerOut(v, h + o, o)

    # ------------------------------------------------------------------ step protocol
    def start_steps(self, ctx: StepContext) -> _AttentionSteps:
        """Preallocate the key/value cache and fold positions and conditioning in once."""
        n, t, f = ctx.n, ctx.height * ctx.width, self.channels
        ref = torch.empty(0, device=ctx.device, dtype=ctx.dtype)
        cache = (n, self.heads, t, f // self.heads)
        return _AttentionSteps(
            keys=torch.zeros(cache, device=ctx.device, dtype=ctx.dtype),
            values=torch.zeros(cache, device=ctx.device, dtype=ctx.dtype),
            bias=self._bias(n, ctx.height, ctx.width, ctx.cond, ctx.spatial, ref),
            h_out=torch.zeros(n, ctx.pad + ctx.width, f, device=ctx.device, dtype=ctx.dtype),
            width=ctx.width,
            pad=ctx.pad,
        )

    def step_row(self, state: _AttentionSteps, r: int, v_in: Tensor) -> Tensor:
        """The vertical stream passes through unchanged."""
        return v_in

    def step_element(
        self, state: _AttentionSteps, r: int, c: int, h_row: Tensor, skips: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Attention output at ``t = r * W + c`` over the cache ``[0 .. t]``; writes k, v at t.
        Its output is also its skip, added to ``skips``."""
        t, at = r * state.width + c, state.pad + c
        x = h_row[:, at]  # [n, F]
        n, heads = x.shape[0], self.heads
        z = self.norm(x) + state.bias[:, t]
        # plain views here (the step is latency-bound): "(three e d)" -> three, e, d
        q, k, v = self.qkv(z).view(n, 3, heads, 1, -1).unbind(1)  # each [n, e, 1, d]
        state.keys[:, :, t : t + 1] = k
        state.values[:, :, t : t + 1] = v
        att = attend(
            q, state.keys[:, :, : t + 1], state.values[:, :, : t + 1]
        )  # [n, e, 1, d]: the one query sees every cached element up to t
        o = self.out(att.reshape(n, -1))
        state.h_out[:, at] = x + o
        return state.h_out, skips + o
