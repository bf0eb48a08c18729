"""Exact incremental evaluation of :class:`~vqprior.nn.pixelcnnpp.PixelCNNPPBackbone`.

The backbone-level step interface (:mod:`vqprior.nn.step`): after the pixels before
``(r, c)`` are written, ``step_output(state, r, c)`` returns the backbone features at
``(r, c)``, equal (to rounding) to a full forward pass, for a few small matmuls per layer.

Every activation map lives in a zero-padded buffer (one row on top, one column each side),
with its ``concat_elu`` beside it, and is filled in place exactly once, as soon as its inputs
are final (the receptive fields derived in :mod:`vqprior.nn.pixelcnnpp`). A buffer keeps a
few rows, not the whole height: the memory does not grow with the image's height.

- ``u`` stream (down-shifted): at scale ``s`` (factor ``f = 2**s``) coarse row ``p`` depends
  on input rows ``< p f`` only, so at the start of fine row ``i`` every scale with ``f | i``
  computes its row ``i / f``: the same convolutions, run on 2-row slices of the buffers.
- ``ul`` stream (down-right-shifted): position ``(p, q)`` depends on pixels before
  ``(p f, q f)`` only, so at pixel ``(i, j)`` every scale with ``f | i, j`` computes its
  position ``(i / f, j / f)``: the down pass fine to coarse, then the up pass coarse to fine,
  each coarse result upsampled into its four children at once. A convolution at one position
  is a matmul of the input window, read in place (:class:`_Points`), with the flattened
  kernel; the terms that depend on the ``u`` stream only (the ``u`` part of each block's
  auxiliary input, the biases, the class conditioning) are computed per row or once per batch.

Dropout is skipped: the state evaluates the network as in eval mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqprior.nn.pixelcnnpp_layers import (
    DownRightShiftedDeconv2d,
    DownShiftedDeconv2d,
    GatedResnet,
    concat_elu_into,
    residual_gate,
)

if TYPE_CHECKING:
    from vqprior.nn.pixelcnnpp import PixelCNNPPBackbone


def _flat_t(weight: Tensor) -> Tensor:
    """Kernel ``[o, i, kh, kw] -> [kw * kh * i, o]``: rows in the order of a window of
    :class:`_Points` (columns outermost, then rows, then channels)."""
    return rearrange(weight, "o i kh kw -> (kw kh i) o").contiguous()


RING = 8
"""Row slots of a :class:`_Map`'s ring (the input and the ``u`` stream). At most four rows of a
map are in use at once: at row ``p`` the input's rows ``p - 2 .. p`` are read and its row
``p - 3`` is cleared to take a later row; a ``u`` map holds rows ``p - 1, p`` and the children
written into row ``p + 1``. So 4 slots would do; with 8, half as many rows have their writes
mirrored."""


class _Map:
    """A padded map filled by rows (the input and the ``u`` stream), channels last:
    ``raw [n, slots, w + 2, ch]`` and its ``concat_elu`` ``celu [n, slots, w + 2, 2 ch]``
    (``raw=False`` keeps the latter only); real column ``j`` is column ``j + 1``, the padding
    columns stay zero.

    Only a few rows are live at any time, so the rows live in a ring of ``period`` slots
    (``min(h + 1, ring)``): real row ``p`` (``-1`` the zero padding on top) is slot
    ``at(p) = (p + 1) % period``. When the ring wraps, slot ``period`` mirrors slot 0, so that
    rows ``p - 1, p`` are always the two adjacent slots ``pair(p), pair(p) + 1``. Every real
    position is written before it is read, so a reused slot needs no clearing (the input map,
    which may be read before it is written, is cleared by :class:`PixelCNNPPSteps`).
    ``raw4``/``celu4`` are the same memory as ``[n, ch, slots, w + 2]`` views.
    """

    def __init__(
        self, n: int, ch: int, h: int, w: int, like: Tensor, raw: bool = True, ring: int = RING
    ) -> None:
        self.n, self.period = n, min(h + 1, ring)
        self.mirror = h + 1 > self.period  # the ring wraps: slot ``period`` mirrors slot 0
        slots = self.period + self.mirror
        self.raw = like.new_zeros(n, slots, w + 2, ch) if raw else None
        self.celu = like.new_zeros(n, slots, w + 2, 2 * ch)

    def at(self, p: int) -> int:
        """The slot of real row ``p``."""
        return (p + 1) % self.period

    def slots(self, p: int) -> tuple[int, ...]:
        """Every slot that holds real row ``p``: its own, and the mirror for slot 0."""
        s = self.at(p)
        return (s, self.period) if s == 0 and self.mirror else (s,)

    def pair(self, p: int) -> int:
        """The first of the two adjacent slots that hold real rows ``p - 1, p``."""
        return p % self.period

    @property
    def raw4(self) -> Tensor:
        assert self.raw is not None
        return rearrange(self.raw, "n h w c -> n c h w")

    @property
    def celu4(self) -> Tensor:
        return rearrange(self.celu, "n h w c -> n c h w")

    def put(self, p: int, cols: slice, v: Tensor) -> None:
        """Write real rows ``p, p + 1, ...`` at real columns ``cols`` with
        ``v [n, ch, rows, len(cols)]`` (at most two rows)."""
        s, rows = self.at(p), v.shape[2]
        at = (slice(s, s + rows), slice(cols.start + 1, cols.stop + 1))  # ends by the mirror
        if self.raw is not None:
            self.raw4[:, :, at[0], at[1]] = v
        concat_elu_into(v, self.celu4[:, :, at[0], at[1]])
        if self.mirror and (s == 0 or s + rows > self.period):
            self._sync(s == 0, at[1])

    def put_row(self, p: int, v: Tensor) -> None:
        """Write real row ``p`` with ``v [n, ch, 1, w]``."""
        self.put(p, slice(0, v.shape[-1]), v)

    def _sync(self, from_first: bool, cols: slice) -> None:
        """Copy columns ``cols`` of slot 0 into its mirror (``from_first``) or back."""
        src, dst = (0, self.period) if from_first else (self.period, 0)
        for buf in (self.raw, self.celu):
            if buf is not None:
                buf[:, dst, cols] = buf[:, src, cols]


class _Points:
    """A ``ul``-stream map, filled point by point along the current row ``p`` of its scale:
    rows ``p - 1`` and ``p`` side by side, ``raw [n, w + 2, 2, ch]`` and its ``concat_elu``
    ``celu [n, w + 2, 2, 2 ch]`` (``raw=False`` keeps the latter only; real column ``j`` is
    ``j + 1``, the padding columns stay zero), and row ``p + 1`` apart, for the children of
    coarser points. :meth:`advance` moves on a row.

    A window of two columns of both rows is one contiguous run, read in place by a matmul.
    Every per-point read and write goes through a view made once here: making a view costs
    about a microsecond, as much as the small op it feeds.
    """

    def __init__(self, n: int, ch: int, w: int, like: Tensor, raw: bool = True) -> None:
        self.n, self.children = n, False
        self.signs = like.new_tensor([1.0, -1.0]).view(2, 1)  # concat_elu's halves [x, -x]
        self.celu = like.new_zeros(n, w + 2, 2, 2 * ch)
        self.next_celu = like.new_zeros(n, w + 2, 2 * ch)
        self.windows = self._windows(self.celu)  # by padded column q: columns q, q + 1
        cur = self.celu[:, 1:-1, 1]  # [n, w, 2 ch]
        self.points = cur.unbind(1)  # [n, 2 ch] by real column
        self._dsts = cur.unflatten(-1, (2, ch)).unbind(1)  # [n, 2, ch]: the halves apart
        self.raw = self.next_raw = None
        if raw:
            self.raw = like.new_zeros(n, w + 2, 2, ch)
            self.next_raw = like.new_zeros(n, w + 2, ch)
            rcur = self.raw[:, 1:-1, 1]
            self.raw_points = rcur.unbind(1)  # [n, ch] by real column
            self._spread = rcur[:, :, None].expand(n, w, 2, ch).unbind(1)  # [n, 2, ch]

    @staticmethod
    def _windows(buf: Tensor) -> tuple[Tensor, ...]:
        s = buf.stride()
        return buf.as_strided((buf.shape[0], buf.shape[1] - 1, 2 * s[1]), (s[0], s[1], 1)).unbind(1)

    @functools.cached_property
    def raw_windows(self) -> tuple[Tensor, ...]:
        """Windows of ``raw`` (as :attr:`windows`; a downsample's input needs them)."""
        assert self.raw is not None
        return self._windows(self.raw)

    def celu_from(self, q: int, spread: Tensor) -> None:
        """``concat_elu`` at real column ``q`` of the current row from ``spread [n, 2, ch]``,
        the value repeated (an ``expand`` view): two ops, where :func:`concat_elu_into`'s five
        (one ``expm1`` per element, for whole rows) cost more on one point."""
        F.elu_(torch.mul(spread, self.signs, out=self._dsts[q]))

    def celu_from_raw(self, q: int) -> None:
        """``concat_elu`` at real column ``q`` of the current row from ``raw_points[q]``."""
        self.celu_from(q, self._spread[q])

    def put(self, q: int, v: Tensor, row: int = 0) -> None:
        """Write ``v [n, ch, cols]`` at real columns ``q ..`` of the current row (``row=0``)
        or the next one (``row=1``)."""
        assert self.raw is not None and self.next_raw is not None
        cols = slice(q + 1, q + 1 + v.shape[-1])
        val = v.transpose(1, 2)
        self.children |= bool(row)
        raw, celu = (
            (self.next_raw, self.next_celu) if row else (self.raw[:, :, 1], self.celu[:, :, 1])
        )
        raw[:, cols] = val
        concat_elu_into(val, celu[:, cols], dim=-1)

    def advance(self) -> None:
        """Move on a row: the current row becomes the one above, the next row current."""
        pairs = [(self.celu, self.next_celu)]
        if self.raw is not None and self.next_raw is not None:
            pairs.append((self.raw, self.next_raw))
        for buf, nxt in pairs:
            buf[:, :, 0] = buf[:, :, 1]
            if self.children:
                buf[:, :, 1] = nxt


class _Block:
    """One :class:`GatedResnet` evaluated in place, by rows (``u``) or by points (``ul``)."""

    def __init__(
        self, module: nn.Module, x: Any, new: Callable[..., Any], cond: Tensor | None
    ) -> None:
        assert isinstance(module, GatedResnet)
        self.m, self.x = module, x  # a _Map (u) or _Points (ul); c1, out: the same kind
        self.c1, self.out = new(raw=False), new()
        proj = module.cond_proj
        bias2 = module.conv2.bias
        assert bias2 is not None and module.conv1.bias is not None
        # conv2's bias plus the class term, [2C] or [n, 2C]
        self.bias2 = bias2 if proj is None or cond is None else bias2 + proj(cond)
        self.w1t, self.w2t = _flat_t(module.conv1.weight), _flat_t(module.conv2.weight)
        self.base: tuple[Tensor, ...] = ()  # the ul block's per-row conv1 terms, W x [n, C]
        nin, c = module.nin_aux, module.conv1.out_channels
        two_streams = nin is not None and nin.in_channels == 4 * c  # aux = cat([u, ul])
        self.nin_u = (
            None if nin is None else _aux_part(nin.weight, c, 0) if two_streams else nin.weight
        )
        self.nin_ul_t = _aux_part(nin.weight, c, 1).flatten(1).t() if two_streams else None  # type: ignore[union-attr]
        # a point's conv1 output (and repeated, for its concat_elu) and conv2 output, halved
        n = cast(int, x.n)
        self.h = self.bias2.new_empty(n, c)
        self.h_spread = self.h[:, None].expand(n, 2, c)
        self.ab = self.bias2.new_empty(n, 2 * c)
        self.a, self.b = cast(tuple[Tensor, Tensor], self.ab.chunk(2, dim=1))

    # ---------------------------------------------------------------- u stream: rows
    def row(self, p: int, aux: _Map | None) -> None:
        """Output row ``p``; ``aux``: the auxiliary map (its row ``p`` is read)."""
        m = self.m
        k = self.x.pair(p)
        c1 = F.conv2d(self.x.celu4[:, :, k : k + 2], m.conv1.weight, m.conv1.bias)
        if m.nin_aux is not None:
            assert aux is not None, "this block was built with an auxiliary input"
            at = aux.at(p)
            c1 = c1 + F.conv2d(aux.celu4[:, :, at : at + 1, 1:-1], m.nin_aux.weight, m.nin_aux.bias)
        self.c1.put_row(p, c1)
        k = self.c1.pair(p)
        per_image = self.bias2.dim() == 2  # the class term: [n, 2C]
        c2 = F.conv2d(
            self.c1.celu4[:, :, k : k + 2], m.conv2.weight, None if per_image else self.bias2
        )
        if per_image:
            c2 = c2 + self.bias2[..., None, None]
        at = self.x.at(p)
        self.out.put_row(p, residual_gate(self.x.raw4[:, :, at : at + 1, 1:-1], c2))

    # --------------------------------------------------------------- ul stream: points
    def prepare_row(self, p: int, u: _Map) -> None:
        """conv1's bias plus the auxiliary input's ``u`` part, for every position of row ``p``."""
        nin = self.m.nin_aux
        assert nin is not None and nin.bias is not None and self.m.conv1.bias is not None
        assert self.nin_u is not None
        at = u.at(p)
        row = F.conv2d(u.celu4[:, :, at : at + 1, 1:-1], self.nin_u, nin.bias + self.m.conv1.bias)
        self.base = rearrange(row, "n c 1 w -> w n c").contiguous().unbind(0)

    def point(self, q: int, skip: _Points | None) -> Tensor:
        """Output at column ``q`` of the current row, ``[n, C]`` (a view of ``out``);
        ``skip``: the ``ul`` long skip (up pass) or None."""
        x, c1, out = self.x, self.c1, self.out
        term = self.base[q]
        if skip is not None:
            assert self.nin_ul_t is not None
            term = torch.addmm(term, skip.points[q], self.nin_ul_t)
        torch.addmm(term, x.windows[q], self.w1t, out=self.h)
        c1.celu_from(q, self.h_spread)
        torch.addmm(self.bias2, c1.windows[q], self.w2t, out=self.ab)
        self.b.sigmoid_()
        value = torch.addcmul(x.raw_points[q], self.a, self.b, out=out.raw_points[q])
        out.celu_from_raw(q)
        return value


def _deconv_matrix(deconv: nn.ConvTranspose2d) -> tuple[Tensor, Tensor]:
    """A 2x2 stride-2 transposed convolution of one input point as ``addmm(bias, x, weight)``:
    ``weight [C_in, C_out * 4]`` (columns ``(o, kh, kw)``, the output's ``[n, C_out, 2, 2]``
    order) and ``bias [C_out * 4]``."""
    assert deconv.bias is not None and tuple(deconv.kernel_size) == (2, 2)
    weight = deconv.weight.flatten(1).contiguous()
    return weight, deconv.bias.repeat_interleave(4)


def _aux_part(weight: Tensor, c: int, part: int) -> Tensor:
    """Columns of a 1x1 kernel over ``concat_elu(cat([u, ul]))`` (order ``u, ul, -u, -ul``)
    that act on ``concat_elu(u)`` (part 0) or ``concat_elu(ul)`` (part 1)."""
    lo = part * c
    return torch.cat([weight[:, lo : lo + c], weight[:, 2 * c + lo : 3 * c + lo]], dim=1)


def _blocks(blocks: nn.Module) -> nn.ModuleList:
    return cast(nn.ModuleList, blocks)


class _NewMap:
    """Allocates maps of one scale."""

    def __init__(self, n: int, ch: int, h: int, w: int, like: Tensor, ring: int) -> None:
        self.args, self.ring = (n, ch, h, w, like), ring

    def __call__(self, raw: bool = True) -> _Map:
        return _Map(*self.args, raw=raw, ring=self.ring)


class _NewPoints:
    """Allocates ``ul`` maps of one scale, each kept in ``made`` (to :meth:`_Points.advance`)."""

    def __init__(self, n: int, ch: int, w: int, like: Tensor, made: list[_Points]) -> None:
        self.args, self.made = (n, ch, w, like), made

    def __call__(self, raw: bool = True) -> _Points:
        points = _Points(*self.args, raw=raw)
        self.made.append(points)
        return points


class _DownStep:
    """Down-pass entry ``k`` at ``scale``: a block pair, or (``blocks`` None) a downsample."""

    def __init__(self, scale: int, k: int, blocks: tuple[_Block, _Block] | None = None) -> None:
        self.scale, self.k, self.blocks = scale, k, blocks
        self.w_t: Tensor | None = None  # the downsample's flattened kernel, once needed


class _UpStep:
    """Up-pass block pair consuming down-pass entry ``k`` as its long skip."""

    def __init__(self, k: int, u: _Block, ul: _Block) -> None:
        self.k, self.u, self.ul = k, u, ul


class PixelCNNPPSteps:
    """Incremental state of a batch of ``n`` images of ``height x width``; ``cond [n, d]``.

    :meth:`write` pixels in raster order; :meth:`output` at ``(r, c)`` runs the pending row
    and pixel events up to ``(r, c)`` and returns the features ``[n, channels]``. Every map
    keeps ``ring`` rows (:class:`_Map`), whatever the height.
    """

    @torch.no_grad()
    def __init__(
        self,
        net: PixelCNNPPBackbone,
        n: int,
        height: int,
        width: int,
        cond: Tensor | None,
        ring: int = RING,
    ) -> None:
        factor = 2 ** (net.num_scales - 1)
        if n < 1 or height < 1 or width < 1 or height % factor or width % factor:
            raise ValueError(
                f"start_steps needs n >= 1 and H, W >= 1 divisible by {factor}, "
                f"got n={n}, H={height}, W={width}"
            )
        if ring < 4:
            raise ValueError(f"the row ring needs at least 4 slots, got {ring}")
        net._check_inputs(torch.zeros(n, net.in_channels, factor, factor), cond)
        self.net, self.n, self.height, self.width = net, n, height, width
        self._like = next(net.parameters())
        self._cond, self._ring = cond, ring
        self.x = self._maps(0, net.in_channels + 1)()
        assert self.x.raw is not None
        self.x.raw[:, 1 : self.x.period, 1:-1, -1] = 1.0  # the ones channel (zero in the padding)
        # the features of rows r % 2, by column (F.elu of the last ul block's output)
        self.feats: list[list[Tensor]] = [[], []]
        # the ul init: ul_init_above (1 x 3 over row i - 1) plus the left term, right-shifted,
        # whose (2, 1) kernel reads column j - 1: its top tap (row i - 1) joins the first
        # column of ul_init_above's kernel and runs per row, its bottom tap per pixel
        above, left = net.ul_init_above, net.ul_init_left
        assert above.bias is not None and left.bias is not None
        self._above_k = above.weight.clone()
        self._above_k[..., :1] += left.weight[:, :, :1]
        self._above_bias = above.bias + left.bias
        self._left_bottom_t = left.weight[:, :, 1, 0].t().contiguous()
        # the ul upsampling at one point as a matmul: [n, C] -> [n, C * 2 * 2] (bias per column)
        self._kids = [
            _deconv_matrix(cast(DownRightShiftedDeconv2d, d).deconv) for d in net.upsample_ul
        ]
        # ul init: column 0's value (the row above's term only), and by column the row
        # above's terms with the left term's bias and top tap; the input's current row
        self._above = torch.empty(0)
        self._above_left: tuple[Tensor, ...] = ()
        self._x_row: tuple[Tensor, ...] = ()
        self._x_dsts: tuple[int, list[tuple[Tensor, ...]]] = (-1, [])
        self._point_maps: list[list[_Points]] = [[] for _ in range(net.num_scales)]
        self.done = 0  # pixel events processed: the raster index of the next one
        self._build()

    def _maps(self, scale: int, ch: int | None = None) -> _NewMap:
        c = self.net.channels if ch is None else ch
        h, w = self.height >> scale, self.width >> scale
        return _NewMap(self.n, c, h, w, self._like, self._ring)

    def _points(self, scale: int) -> _NewPoints:
        made = self._point_maps[scale]
        return _NewPoints(self.n, self.net.channels, self.width >> scale, self._like, made)

    def _pair(
        self, mu: nn.Module, mul: nn.Module, x: tuple[_Map, _Points], s: int
    ) -> tuple[_Block, _Block]:
        u = _Block(mu, x[0], self._maps(s), self._cond)
        return u, _Block(mul, x[1], self._points(s), self._cond)

    def _build(self) -> None:
        net = self.net
        self.du: list[_Map] = [self._maps(0)()]
        self.dul: list[_Points] = [self._points(0)()]
        self.down: list[_DownStep] = []
        for s in range(net.num_scales):
            if s > 0:
                self.du.append(self._maps(s)())
                self.dul.append(self._points(s)())
                self.down.append(_DownStep(s, len(self.du) - 1))
            for mu, mul in zip(_blocks(net.down_u[s]), _blocks(net.down_ul[s]), strict=True):
                bu, bul = self._pair(mu, mul, (self.du[-1], self.dul[-1]), s)
                self.du.append(bu.out)
                self.dul.append(bul.out)
                self.down.append(_DownStep(s, len(self.du) - 1, (bu, bul)))
        skips = list(range(len(self.du)))
        top = skips.pop()
        x = (self.du[top], self.dul[top])
        self.up: dict[int, list[_UpStep]] = {}
        self.up_in: dict[int, tuple[_Map, _Points]] = {}
        for s in reversed(range(net.num_scales)):
            if s < net.num_scales - 1:
                x = (self._maps(s)(), self._points(s)())
                self.up_in[s] = x
            self.up[s] = []
            for mu, mul in zip(_blocks(net.up_u[s]), _blocks(net.up_ul[s]), strict=True):
                bu, bul = self._pair(mu, mul, x, s)
                self.up[s].append(_UpStep(skips.pop(), bu, bul))
                x = (bu.out, bul.out)
        assert not skips, "every down-pass activation is used once"

    # ------------------------------------------------------------------------ events
    def _scales(self, *coords: int) -> list[int]:
        """Scales whose grid has a point at fine coordinates ``coords`` (fine first)."""
        return [s for s in range(self.net.num_scales) if all(v % (1 << s) == 0 for v in coords)]

    def _row_event(self, i: int) -> None:
        """Start of fine row ``i``: the ``u`` stream rows of every scale with ``2**s | i``."""
        self._init_row(i)
        scales = self._scales(i)
        for s in scales:
            for points in self._point_maps[s]:
                points.advance()
        for step in self.down:
            if step.scale in scales:
                self._down_row(step, i >> step.scale)
        for s in reversed(scales):
            p = i >> s
            for up in self.up[s]:
                up.u.row(p, self.du[up.k])
                up.ul.prepare_row(p, up.u.out)
            if s > 0:
                last = self.up[s][-1].u.out
                deconv = cast(DownShiftedDeconv2d, self.net.upsample_u[s - 1])
                at = last.at(p)
                fine = deconv(last.raw4[:, :, at : at + 1, 1:-1])  # [n, C, 2, 2 W_s]
                self.up_in[s - 1][0].put(2 * p, slice(0, fine.shape[-1]), fine)

    def _init_row(self, i: int) -> None:
        """The first ``u`` map's row ``i`` and the ``ul`` init's row-above term (both shifted
        down: zero in row 0)."""
        net, x = self.net, self.x.raw4
        assert net.ul_init_left.bias is not None
        if self.x.mirror and i >= 2:  # row i - 3 is no longer read: its slot takes a new row
            self._clear_input_row(i - 3)
        k, at = self.x.pair(i - 1), self.x.at(i - 1)
        left_bias = net.ul_init_left.bias
        if i > 0:  # the row above's terms are shifted down: zero in row 0
            u0 = F.conv2d(x[:, :, k : k + 2], net.u_init.weight, net.u_init.bias)
            self.du[0].put_row(i, u0)
            above = F.conv2d(x[:, :, at : at + 1], self._above_k, self._above_bias)  # [n, C, 1, W]
            self._above_left = rearrange(above, "n c 1 w -> w n c").contiguous().unbind(0)
            self._above = self._above_left[0] - left_bias  # column 0 has no left term
        else:
            self._above_left = (left_bias.expand(self.n, -1),) * self.width
            self._above = torch.zeros_like(self._above_left[0])
        raw = cast(Tensor, self.x.raw)
        self._x_row = raw[:, self.x.at(i), 1:-1].unbind(1)
        # where write() puts row i's pixels, by column: its slot (and the mirror)
        self._x_dsts = (i, [raw[:, s, 1:-1, :-1].unbind(1) for s in self.x.slots(i)])

    def _clear_input_row(self, p: int) -> None:
        """Reset the input's slot of row ``p``: zero pixels, the ones channel in real columns."""
        assert self.x.raw is not None
        for slot in self.x.slots(p):
            self.x.raw[:, slot].zero_()
            self.x.raw[:, slot, 1:-1, -1] = 1.0

    def _down_row(self, step: _DownStep, p: int) -> None:
        if step.blocks is not None:
            step.blocks[0].row(p, None)
            step.blocks[1].prepare_row(p, step.blocks[0].out)
            return
        conv = cast(nn.Conv2d, self.net.downsample_u[step.scale - 1])
        prev, k = self.du[step.k - 1], self.du[step.k - 1].pair(2 * p)
        row = F.conv2d(prev.raw4[:, :, k : k + 2], conv.weight, conv.bias, stride=2)
        self.du[step.k].put_row(p, row)

    def _pixel_event(self, i: int, j: int) -> None:
        """Pixel ``(i, j)``: the ``ul`` stream at every scale with ``2**s | i, j``."""
        init = self.dul[0]
        if j == 0:  # the left term is shifted right: column 0 is zero
            init.raw_points[0].copy_(self._above)
        else:  # the left term's bottom tap reads the input at (i, j - 1)
            torch.addmm(
                self._above_left[j], self._x_row[j - 1], self._left_bottom_t, out=init.raw_points[j]
            )
        init.celu_from_raw(j)
        scales = self._scales(i, j)
        for step in self.down:
            if step.scale in scales:
                self._down_point(step, j >> step.scale)
        for s in reversed(scales):
            q = j >> s
            out = self._up_point(s, q)
            if s > 0:
                weight, bias = self._kids[s - 1]
                kids = torch.addmm(bias, out, weight).view(self.n, -1, 2, 2)  # [n, C, 2, 2]
                for row in range(2):
                    self.up_in[s - 1][1].put(2 * q, kids[:, :, row], row)
            else:
                feats = self.feats[i % 2]
                if j == 0:
                    feats.clear()
                feats.append(F.elu(out))

    def _up_point(self, s: int, q: int) -> Tensor:
        out: Tensor | None = None
        for up in self.up[s]:
            out = up.ul.point(q, self.dul[up.k])
        assert out is not None, "every scale has at least one up-pass block"
        return out

    def _down_point(self, step: _DownStep, q: int) -> None:
        if step.blocks is not None:
            step.blocks[1].point(q, None)
            return
        conv = cast(nn.Conv2d, self.net.downsample_ul[step.scale - 1])
        assert conv.bias is not None
        win = self.dul[step.k - 1].raw_windows[2 * q]  # real columns 2q - 1, 2q
        if step.w_t is None:
            step.w_t = _flat_t(conv.weight)
        out = self.dul[step.k]
        torch.addmm(conv.bias, win, step.w_t, out=out.raw_points[q])
        out.celu_from_raw(q)

    # --------------------------------------------------------------------- interface
    @torch.no_grad()
    def output(self, r: int, c: int) -> Tensor:
        """Backbone features ``[n, channels]`` at ``(r, c)`` given every pixel written before
        ``(r, c)`` (unwritten ones count as zero, as in the reference loop)."""
        self._check_position(r, c)
        target = r * self.width + c
        if r < (self.done - 1) // self.width - 1:
            raise ValueError(f"the features of row {r} are no longer kept (two rows are)")
        while self.done <= target:
            i, j = divmod(self.done, self.width)
            if j == 0:
                self._row_event(i)
            self._pixel_event(i, j)
            self.done += 1
        return self.feats[r % 2][c]

    @torch.no_grad()
    def write(self, r: int, c: int, inp: Tensor) -> None:
        """Commit the network input ``inp [n, in_channels]`` of pixel ``(r, c)`` (rewriting
        it is fine until the features after ``(r, c)`` have been evaluated)."""
        self._check_position(r, c)
        if not self.done - 1 <= r * self.width + c <= self.done:
            where = "behind" if r * self.width + c < self.done else "ahead of"
            raise ValueError(
                f"pixel ({r}, {c}) is {where} the evaluated frontier; write in raster order"
            )
        if inp.shape != (self.n, self.net.in_channels):
            raise ValueError(
                f"step_write expects [{self.n}, {self.net.in_channels}], got {list(inp.shape)}"
            )
        row, dsts = self._x_dsts
        if r != row:  # the first pixel of a row, written before its features are evaluated
            raw = cast(Tensor, self.x.raw)
            dsts = [raw[:, s, 1:-1, :-1].unbind(1) for s in self.x.slots(r)]
        for dst in dsts:
            dst[c].copy_(inp)

    def _check_position(self, r: int, c: int) -> None:
        if not (0 <= r < self.height and 0 <= c < self.width):
            raise ValueError(f"position ({r}, {c}) is outside the {self.height}x{self.width} grid")
