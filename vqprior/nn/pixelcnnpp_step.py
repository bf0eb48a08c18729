"""Exact incremental evaluation of :class:`~vqprior.nn.pixelcnnpp.PixelCNNPPBackbone`.

The backbone-level step interface (:mod:`vqprior.nn.step`): after the pixels before
``(r, c)`` are written, ``step_output(state, r, c)`` returns the backbone features at
``(r, c)``, equal (to rounding) to a full forward pass, for a few small matmuls per layer.

Every activation map lives in a zero-padded buffer (one row on top, one column each side),
with its ``concat_elu`` beside it, and is filled in place exactly once, as soon as its inputs
are final (the receptive fields derived in :mod:`vqprior.nn.pixelcnnpp`). A buffer keeps
two rows, not the whole height: the memory does not grow with the image's height.

- ``u`` stream (down-shifted): at scale ``s`` (factor ``f = 2**s``) coarse row ``p`` depends
  on input rows ``< p f`` only, so at the start of fine row ``i`` every scale with ``f | i``
  computes its row ``i / f``: the same convolutions, run on a map's two row slots at once
  (:class:`_Map`).
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

from vqprior.nn.layout import ring_kernels
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


class _Map:
    """A padded map filled by rows (the input and the ``u`` stream), channels last, that keeps
    two rows: real row ``p`` lives in slot ``p % 2`` of ``raw [n, w + 2, 2, ch]`` and of its
    ``concat_elu`` ``celu [n, w + 2, 2, 2 ch]`` (``raw=False`` keeps the latter only). Real
    column ``j`` is column ``j + 1``; the padding columns stay zero, and slot 1 starts as the
    zero row above the map.

    A convolution over rows ``p - 1, p`` reads the whole buffer as one channels-last
    ``[n, 2 ch, 1, w + 2]`` map (:attr:`raw_pair`, :attr:`celu_pair`) with the kernels of
    :func:`~vqprior.nn.layout.ring_kernels`, in place (two rows sliced from a taller buffer are
    not channels-last contiguous, and the convolution would copy them first). Every real position
    is written before it is read. An upsampling writes two rows at once; the second waits
    (:meth:`put_ahead`) until its row starts (:meth:`start_row`), as its slot still holds the
    row above.
    """

    def __init__(self, n: int, ch: int, w: int, like: Tensor, raw: bool = True) -> None:
        self.n = n
        self.raw = like.new_zeros(n, w + 2, 2, ch) if raw else None
        self.celu = like.new_zeros(n, w + 2, 2, 2 * ch)
        self._ahead: tuple[int, Tensor] | None = None
        # views made once (a view costs about a microsecond): both slots as one map, and each
        # slot as a [n, ch, 1, w + 2] row
        self.celu_pair, self.celu_rows = self._views(self.celu)
        if self.raw is not None:
            self.raw_pair, self.raw_rows = self._views(self.raw)

    @staticmethod
    def _views(buf: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        pair = rearrange(buf, "n w s c -> n (s c) 1 w")
        return pair, tuple(rearrange(buf, "n w s c -> s n c 1 w").unbind(0))

    def raw_row(self, p: int) -> Tensor:
        """Real row ``p`` of ``raw``, ``[n, ch, 1, w]`` (a view)."""
        return self.raw_rows[p % 2][..., 1:-1]

    def celu_row(self, p: int) -> Tensor:
        """Real row ``p`` of ``celu``, ``[n, 2 ch, 1, w]`` (a view)."""
        return self.celu_rows[p % 2][..., 1:-1]

    def linear(self, p: int, weight_t: Tensor, bias: Tensor, by_column: bool = False) -> Tensor:
        """A 1x1 convolution of real row ``p`` of ``celu``: ``celu @ weight_t [2 ch, o] + bias``,
        ``[n, w, o]`` (``[w, n, o]`` ``by_column``). One matmul of the row's contiguous copy (a
        convolution would copy the strided row into its own layout first, several times slower)."""
        rows = self.celu[:, 1:-1, p % 2]
        rows = rows.transpose(0, 1) if by_column else rows
        return torch.addmm(bias, rows.reshape(-1, rows.shape[-1]), weight_t).unflatten(
            0, rows.shape[:2]
        )

    def put_row(self, p: int, v: Tensor) -> None:
        """Write real row ``p`` with ``v [n, ch, 1, w]``."""
        if self.raw is not None:
            self.raw_row(p).copy_(v)
        concat_elu_into(v, self.celu_row(p))

    def put_ahead(self, p: int, v: Tensor) -> None:
        """Row ``p`` (``v [n, ch, 1, w]``), written when it starts (:meth:`start_row`)."""
        self._ahead = (p, v)

    def start_row(self, p: int) -> None:
        """Row ``p`` starts: write it if it was put ahead."""
        if self._ahead is not None and self._ahead[0] == p:
            self.put_row(p, self._ahead[1])
            self._ahead = None


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
        halves = cur.unflatten(-1, (2, ch))  # [n, w, 2, ch]: the halves apart
        self.dsts = halves.unbind(1)
        self.pos, self.neg = halves[:, :, 0].unbind(1), halves[:, :, 1].unbind(1)  # [n, ch]
        self.raw = self.next_raw = None
        if raw:
            self.raw = like.new_zeros(n, w + 2, 2, ch)
            self.next_raw = like.new_zeros(n, w + 2, ch)
            self.raw_points = self.raw[:, 1:-1, 1].unbind(1)  # [n, ch] by real column

    @staticmethod
    def _windows(buf: Tensor) -> tuple[Tensor, ...]:
        s = buf.stride()
        return buf.as_strided((buf.shape[0], buf.shape[1] - 1, 2 * s[1]), (s[0], s[1], 1)).unbind(1)

    @functools.cached_property
    def raw_windows(self) -> tuple[Tensor, ...]:
        """Windows of ``raw`` (as :attr:`windows`; a downsample's input needs them)."""
        assert self.raw is not None
        return self._windows(self.raw)

    def celu_at(self, q: int, value: Tensor | None = None) -> None:
        """``concat_elu`` at real column ``q`` of the current row, of ``value [n, ch]`` (copied
        into the first half) or of what the first half holds: three ops on views made once
        (:func:`concat_elu_into`'s five, one ``expm1`` per element, suit whole rows)."""
        if value is not None:
            self.pos[q].copy_(value)
        torch.neg(self.pos[q], out=self.neg[q])
        F.elu_(self.dsts[q])

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
        spread = val[:, :, None].expand(-1, -1, 2, -1)  # [n, cols, 2, ch]
        F.elu_(torch.mul(spread, self.signs, out=celu[:, cols].unflatten(-1, (2, -1))))

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
        """``x``: the input, a :class:`_Map` (by rows) or :class:`_Points` (by points);
        ``new`` allocates the block's own maps of the same kind."""
        assert isinstance(module, GatedResnet)
        self.m, self.x = module, x  # a _Map (u) or _Points (ul); c1, out: the same kind
        self.c1, self.out = new(raw=False), new()
        proj = module.cond_proj
        bias2 = module.conv2.bias
        assert bias2 is not None and module.conv1.bias is not None
        # conv2's bias plus the class term, [2C] or [n, 2C]
        self.bias2 = bias2 if proj is None or cond is None else bias2 + proj(cond)
        # the kernels as read: over a map's two slots (by rows), flattened (by points)
        w1, w2 = module.conv1.weight, module.conv2.weight
        by_rows = isinstance(x, _Map)
        none: tuple[Tensor, ...] = ()
        self.k1, self.k2 = (ring_kernels(w1), ring_kernels(w2)) if by_rows else (none, none)
        self.w1t, self.w2t = (w1, w2) if by_rows else (_flat_t(w1), _flat_t(w2))
        self.base: tuple[Tensor, ...] = ()  # the ul block's per-row conv1 terms, W x [n, C]
        self.celu_out = True  # whether a point's output needs its concat_elu (see _build)
        nin, c = module.nin_aux, module.conv1.out_channels
        two_streams = nin is not None and nin.in_channels == 4 * c  # aux = cat([u, ul])
        nin_u = None if nin is None else _aux_part(nin.weight, c, 0) if two_streams else nin.weight
        self.nin_u_t = torch.empty(0) if nin_u is None else nin_u.flatten(1).t().contiguous()
        self.nin_ul_t = _aux_part(nin.weight, c, 1).flatten(1).t() if two_streams else None  # type: ignore[union-attr]
        # conv1's bias and the auxiliary input's, added once per row
        self.bias1 = None if nin is None or nin.bias is None else nin.bias + module.conv1.bias
        # a point's conv2 output, halved
        n = cast(int, x.n)
        self.ab = self.bias2.new_empty(n, 2 * c)
        self.a, self.b = cast(tuple[Tensor, Tensor], self.ab.chunk(2, dim=1))

    # ---------------------------------------------------------------- u stream: rows
    def row(self, p: int, aux: _Map | None) -> None:
        """Output row ``p``; ``aux``: the auxiliary map (its row ``p`` is read)."""
        m = self.m
        if m.nin_aux is None:
            c1 = F.conv2d(self.x.celu_pair, self.k1[p % 2], m.conv1.bias)
        else:
            assert aux is not None and self.bias1 is not None, "built with an auxiliary input"
            aux_term = aux.linear(p, self.nin_u_t, self.bias1).permute(0, 2, 1)[:, :, None]
            c1 = F.conv2d(self.x.celu_pair, self.k1[p % 2]).add_(aux_term)
        self.c1.put_row(p, c1)
        per_image = self.bias2.dim() == 2  # the class term: [n, 2C]
        c2 = F.conv2d(self.c1.celu_pair, self.k2[p % 2], None if per_image else self.bias2)
        if per_image:
            c2 = c2 + self.bias2[..., None, None]
        self.out.put_row(p, residual_gate(self.x.raw_row(p), c2))

    # --------------------------------------------------------------- ul stream: points
    def prepare_row(self, p: int, u: _Map) -> None:
        """conv1's bias plus the auxiliary input's ``u`` part, for every position of row ``p``."""
        assert self.bias1 is not None
        self.base = u.linear(p, self.nin_u_t, self.bias1, by_column=True).unbind(0)

    def point(self, q: int, skip: _Points | None) -> Tensor:
        """Output at column ``q`` of the current row, ``[n, C]`` (a view of ``out``);
        ``skip``: the ``ul`` long skip (up pass) or None."""
        x, c1, out = self.x, self.c1, self.out
        term = self.base[q]
        if skip is not None:
            assert self.nin_ul_t is not None
            term = torch.addmm(term, skip.points[q], self.nin_ul_t)
        torch.addmm(term, x.windows[q], self.w1t, out=c1.pos[q])
        c1.celu_at(q)
        torch.addmm(self.bias2, c1.windows[q], self.w2t, out=self.ab)
        self.b.sigmoid_()
        value = torch.addcmul(x.raw_points[q], self.a, self.b, out=out.raw_points[q])
        if self.celu_out:  # read by a later block or a skip
            out.celu_at(q, value)
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

    def __init__(
        self,
        scale: int,
        k: int,
        blocks: tuple[_Block, _Block] | None = None,
        convs: tuple[nn.Module, nn.Module] | None = None,
    ) -> None:
        self.scale, self.k, self.blocks = scale, k, blocks
        # a downsample's convolutions (u, ul): the u one over a map's slots (its row 2p is
        # even), the ul one flattened for a point
        self.convs = cast(tuple[nn.Conv2d, nn.Conv2d], convs)
        if convs is not None:
            self.u_k = ring_kernels(self.convs[0].weight)[0]
            self.ul_t = _flat_t(self.convs[1].weight)


class _UpStep:
    """Up-pass block pair consuming down-pass entry ``k`` as its long skip."""

    def __init__(self, k: int, u: _Block, ul: _Block) -> None:
        self.k, self.u, self.ul = k, u, ul


class PixelCNNPPSteps:
    """Incremental state of a batch of ``n`` images of ``height x width``; ``cond [n, d]``.

    :meth:`write` pixels in raster order; :meth:`output` at ``(r, c)`` runs the pending row
    and pixel events up to ``(r, c)`` and returns the features ``[n, channels]``. Every map
    keeps two rows (:class:`_Map`, :class:`_Points`), whatever the height.
    """

    @torch.no_grad()
    def __init__(
        self,
        net: PixelCNNPPBackbone,
        n: int,
        height: int,
        width: int,
        cond: Tensor | None,
    ) -> None:
        factor = 2 ** (net.num_scales - 1)
        if n < 1 or height < 1 or width < 1 or height % factor or width % factor:
            raise ValueError(
                f"start_steps needs n >= 1 and H, W >= 1 divisible by {factor}, "
                f"got n={n}, H={height}, W={width}"
            )
        net._check_inputs(torch.zeros(n, net.in_channels, factor, factor), cond)
        self.net, self.n, self.height, self.width = net, n, height, width
        self._like = next(net.parameters())
        self._cond = cond
        # the input (its raw rows only) with the ones channel, zero in the padding (slot 1 is
        # the row above the image until row 1 starts); a fresh row: zero pixels, the ones
        self.x = self._maps(0, net.in_channels + 1)()
        assert self.x.raw is not None
        self.x.raw[:, 1:-1, 0, -1] = 1.0
        self._fresh = torch.zeros_like(self.x.raw[0, 0, 0])
        self._fresh[-1] = 1.0
        # by slot, by column: a pixel with the ones channel (read) and without (written)
        self._x_pix = [self.x.raw[:, 1:-1, s].unbind(1) for s in range(2)]
        self._x_cols = [self.x.raw[:, 1:-1, s, :-1].unbind(1) for s in range(2)]
        self._early: Tensor | None = None  # a row's first pixel, written before its row starts
        # the features of rows r % 2, by column (F.elu of the last ul block's output)
        self.feats: list[list[Tensor]] = [[], []]
        # the ul init: ul_init_above (1 x 3 over row i - 1) plus the left term, right-shifted,
        # whose (2, 1) kernel reads column j - 1: its top tap (row i - 1) joins the first
        # column of ul_init_above's kernel and runs per row, its bottom tap per pixel
        above, left = net.ul_init_above, net.ul_init_left
        assert above.bias is not None and left.bias is not None
        above_k = above.weight.clone()
        above_k[..., :1] += left.weight[:, :, :1]
        # u_init (2 x 3 over rows i - 2, i - 1) and that row-above term as one convolution
        u_init = net.u_init
        assert u_init.bias is not None
        both = torch.cat([u_init.weight, F.pad(above_k, (0, 0, 1, 0))])  # [2C, Cin + 1, 2, 3]
        self._init_k = ring_kernels(both)
        self._init_bias = torch.cat([u_init.bias, above.bias + left.bias])
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
        self._point_maps: list[list[_Points]] = [[] for _ in range(net.num_scales)]
        self.done = 0  # pixel events processed: the raster index of the next one
        self._build()

    def _maps(self, scale: int, ch: int | None = None) -> Callable[..., _Map]:
        """Allocates maps of one scale."""
        c = self.net.channels if ch is None else ch
        return functools.partial(_Map, self.n, c, self.width >> scale, self._like)

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
                convs = (net.downsample_u[s - 1], net.downsample_ul[s - 1])
                self.down.append(_DownStep(s, len(self.du) - 1, convs=convs))
            for mu, mul in zip(_blocks(net.down_u[s]), _blocks(net.down_ul[s]), strict=True):
                bu, bul = self._pair(mu, mul, (self.du[-1], self.dul[-1]), s)
                self.du.append(bu.out)
                self.dul.append(bul.out)
                self.down.append(_DownStep(s, len(self.du) - 1, (bu, bul)))
        # the down pass is in scale order: the steps of scales 0 .. d - 1 are its first ones
        self._down_until = [
            sum(st.scale < d for st in self.down) for d in range(net.num_scales + 1)
        ]
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
            # the last ul block's output is read as it is (upsampled, or the features)
            self.up[s][-1].ul.celu_out = False
        assert not skips, "every down-pass activation is used once"

    # ------------------------------------------------------------------------ events
    def _scales(self, i: int, j: int = 0) -> range:
        """Scales whose grid has a point at fine coordinates ``(i, j)`` (``2**s`` divides both):
        ``0 .. d - 1``, ``d - 1`` the trailing zero bits they share, at most the coarsest."""
        bits = i | j
        shared = (bits & -bits).bit_length() if bits else self.net.num_scales
        return range(min(shared, self.net.num_scales))

    def _row_event(self, i: int) -> None:
        """Start of fine row ``i``: the ``u`` stream rows of every scale with ``2**s | i``."""
        self._init_row(i)
        scales = self._scales(i)
        for s in scales:
            for points in self._point_maps[s]:
                points.advance()
            if s in self.up_in:
                self.up_in[s][0].start_row(i >> s)
        for step in self.down[: self._down_until[len(scales)]]:
            self._down_row(step, i >> step.scale)
        for s in reversed(scales):
            p = i >> s
            for up in self.up[s]:
                up.u.row(p, self.du[up.k])
                up.ul.prepare_row(p, up.u.out)
            if s > 0:
                deconv = cast(DownShiftedDeconv2d, self.net.upsample_u[s - 1])
                fine = deconv(self.up[s][-1].u.out.raw_row(p))  # [n, C, 2, 2 W_s]
                self.up_in[s - 1][0].put_row(2 * p, fine[:, :, :1])
                self.up_in[s - 1][0].put_ahead(2 * p + 1, fine[:, :, 1:])

    def _init_row(self, i: int) -> None:
        """The first ``u`` map's row ``i`` and the ``ul`` init's row-above term (both shifted
        down: zero in row 0); then the input's row ``i`` takes the slot of row ``i - 2``."""
        left_bias = self.net.ul_init_left.bias
        assert left_bias is not None
        if i > 0:  # the row above's terms are shifted down: zero in row 0
            c = self.net.channels
            both = F.conv2d(self.x.raw_pair, self._init_k[(i - 1) % 2], self._init_bias)
            self.du[0].put_row(i, both[:, :c])
            self._above_left = rearrange(both[:, c:], "n c 1 w -> w n c").contiguous().unbind(0)
            self._above = self._above_left[0] - left_bias  # column 0 has no left term
            cast(Tensor, self.x.raw)[:, 1:-1, i % 2] = self._fresh
        else:
            self._above_left = (left_bias.expand(self.n, -1),) * self.width
            self._above = torch.zeros_like(self._above_left[0])
        self._x_row = self._x_pix[i % 2]
        if self._early is not None:
            self._x_cols[i % 2][0].copy_(self._early)
            self._early = None

    def _down_row(self, step: _DownStep, p: int) -> None:
        if step.blocks is not None:
            step.blocks[0].row(p, None)
            step.blocks[1].prepare_row(p, step.blocks[0].out)
            return
        prev = self.du[step.k - 1]
        row = F.conv2d(prev.raw_pair, step.u_k, step.convs[0].bias, stride=(1, 2))
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
        init.celu_at(j, init.raw_points[j])
        scales = self._scales(i, j)
        for step in self.down[: self._down_until[len(scales)]]:
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
        bias = step.convs[1].bias
        assert bias is not None
        win = self.dul[step.k - 1].raw_windows[2 * q]  # real columns 2q - 1, 2q
        out = self.dul[step.k]
        torch.addmm(bias, win, step.ul_t, out=out.raw_points[q])
        out.celu_at(q, out.raw_points[q])

    # --------------------------------------------------------------------- interface
    def output(self, r: int, c: int) -> Tensor:
        """Backbone features ``[n, channels]`` at ``(r, c)`` given every pixel written before
        ``(r, c)`` (unwritten ones count as zero, as in the reference loop)."""
        if torch.is_grad_enabled():  # the maths run in place, never recorded (a sampler's
            with torch.no_grad():  # walk already runs without grad: no decorator's cost)
                return self.output(r, c)
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

    def write(self, r: int, c: int, inp: Tensor) -> None:
        """Commit the network input ``inp [n, in_channels]`` of pixel ``(r, c)`` (rewriting
        it is fine until the features after ``(r, c)`` have been evaluated)."""
        if torch.is_grad_enabled():  # as in output
            with torch.no_grad():
                return self.write(r, c, inp)
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
        if r * self.width + c == self.done and c == 0:  # before its row starts: held till then
            self._early = inp.clone()
        else:
            self._x_cols[r % 2][c].copy_(inp)

    def _check_position(self, r: int, c: int) -> None:
        if not (0 <= r < self.height and 0 <= c < self.width):
            raise ValueError(f"position ({r}, {c}) is outside the {self.height}x{self.width} grid")
