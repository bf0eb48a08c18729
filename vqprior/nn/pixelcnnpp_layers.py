"""PixelCNN++ layers (Salimans et al. 2017): shifted convolutions, the gated resnet block,
``concat_elu`` and a memory-format-preserving dropout.

Each shifted layer reads only the rows (and columns) its name says; the receptive field of
every layer and of the whole network is derived in :mod:`vqprior.nn.pixelcnnpp`. The backbone
there and its incremental evaluation in :mod:`vqprior.nn.pixelcnnpp_step` both build on these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqprior.nn.layout import channel_halves, is_channels_last

Pads = tuple[int, int, int, int]  # left, right, top, bottom, as F.pad's last two dimensions
FUSED_CONCAT_ELU_MIN = 1 << 14  # elements above which concat_elu takes the fused form
ConvFactory = Callable[[int, int], "ShiftedConv2d"]


def concat_elu(x: Tensor, pads: Pads = (0, 0, 0, 0)) -> Tensor:
    """ELU of ``[x, -x]`` along channels, zero-padded by ``pads`` (the input of the shifted
    convolution that reads it): ``[b, c, h, w] -> [b, 2c, h + top + bottom, w + left + right]``.

    A map is written in one pass into its padded output (:class:`_ConcatElu`). Small inputs
    (the sampler's points and rows: the fused form's fixed cost outweighs its savings below
    ~16k elements on a CPU) and graphs being compiled (inductor fuses the plain form itself)
    take the plain ``elu(cat([x, -x]))``.
    """
    if x.dim() != 4 or x.numel() <= FUSED_CONCAT_ELU_MIN or torch.compiler.is_compiling():
        y = F.elu(torch.cat([x, -x], dim=1))
        return F.pad(y, pads) if any(pads) else y
    return _ConcatElu.apply(x, pads)


def concat_elu_into(x: Tensor, out: Tensor, dim: int = 1) -> Tensor:
    """Write ``elu(cat([x, -x], dim))`` into ``out`` (any strides) with one ``expm1`` per
    element of ``x``: with ``m = expm1(-|x|)``, ``elu(x) = max(x, m)`` and
    ``elu(-x) = max(-x, m)`` (``expm1`` lies above its argument, and below 0 for negative
    ones). No grad: :class:`_ConcatElu` is the autograd form."""
    neg = torch.neg(x)
    m = torch.minimum(x, neg).expm1_()
    first, second = out.chunk(2, dim)
    torch.maximum(x, m, out=first)
    torch.maximum(neg, m, out=second)
    return out


class _ConcatElu(torch.autograd.Function):
    """``pad(elu(cat([x, -x])))`` with one ``expm1`` per element of ``x`` and no copies.

    With ``m = expm1(-|x|)``: ``elu(x) = max(x, m)`` and ``elu(-x) = max(-x, m)`` (``expm1``
    lies above its argument, and below 0 for negative ones), written straight into the two
    channel halves of the padded output. The backward is ELU's, from the output.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, pads: Pads) -> Tensor:
        left, right, top, bottom = pads
        n, c, h, w = x.shape
        cl = is_channels_last(x)
        size = (n, 2 * c, h + top + bottom, w + left + right)
        fmt = torch.channels_last if cl else torch.contiguous_format
        y = torch.empty(size, dtype=x.dtype, device=x.device, memory_format=fmt)
        # the zero border, through a view with the dense dimension last (CPU bf16 fills of a
        # channels-last map's strips in NCHW order are ~30x slower): the grid at dims -3, -2
        grid = y.movedim(1, -1) if cl else y.unsqueeze(-1)
        rows = slice(top, top + h)
        for strip, width in (
            (grid[..., :top, :, :], top),
            (grid[..., top + h :, :, :], bottom),
            (grid[..., rows, :left, :], left),
            (grid[..., rows, left + w :, :], right),
        ):
            if width:
                strip.zero_()
        concat_elu_into(x, y[:, :, top : top + h, left : left + w])
        ctx.save_for_backward(y)
        ctx.pads = pads  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (y,) = ctx.saved_tensors  # type: ignore[attr-defined]
        left, right, top, bottom = ctx.pads  # type: ignore[attr-defined]
        rows, cols = slice(top, y.shape[2] - bottom), slice(left, y.shape[3] - right)
        # ELU's gradient from its output, on both halves at once (dense channels), then the
        # halves' difference: d/dx of [elu(x), elu(-x)]
        g = torch.ops.aten.elu_backward(
            grad[:, :, rows, cols], 1.0, 1, 1, True, y[:, :, rows, cols]
        )
        c = g.shape[1] // 2
        return g[:, :c] - g[:, c:], None


def residual_gate(x: Tensor, c: Tensor) -> Tensor:
    """``x + a * sigmoid(b)`` for ``c = [a | b]`` split along channels (the gated block's
    output). With gradients it runs as :class:`_ResidualGate`; without (the sampler's rows) and
    under compile (inductor fuses it) as those three ops."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or c.requires_grad)
    if not needs_grad or torch.compiler.is_compiling():
        a, b = channel_halves(c)
        return torch.addcmul(x, a, torch.sigmoid(b))
    return _ResidualGate.apply(x, c)


class _ResidualGate(torch.autograd.Function):
    """:func:`residual_gate` whose backward writes both halves' gradients straight into one
    buffer in ``c``'s layout: ``grad s`` and ``sigmoid'(b) grad a``. Autograd's own backward of
    ``addcmul`` makes two more passes (its ``value`` times each factor) and then concatenates
    the halves; on CPU this one is 1.4-1.6x faster (batch 32, 32 channels, 32x32)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, c: Tensor) -> Tensor:
        a, b = channel_halves(c)
        s = torch.sigmoid(b)
        ctx.save_for_backward(a, s)
        fmt = torch.channels_last if is_channels_last(c) else torch.contiguous_format
        ctx.like = (c.shape, c.dtype, fmt)  # type: ignore[attr-defined]
        return torch.addcmul(x, a, s)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        if not ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            return grad, None
        a, s = ctx.saved_tensors  # type: ignore[attr-defined]
        shape, dtype, fmt = ctx.like  # type: ignore[attr-defined]
        grad_c = torch.empty(shape, dtype=dtype, device=grad.device, memory_format=fmt)
        grad_a, grad_b = grad_c.chunk(2, dim=1)
        torch.mul(grad, s, out=grad_a)
        torch.mul(grad, a, out=grad_b)
        torch.ops.aten.sigmoid_backward.grad_input(grad_b, s, grad_input=grad_b)
        return grad, grad_c


def random_bytes_like(x: Tensor) -> Tensor:
    """Independent uniform uint8 values of ``x``'s shape, device and memory format.

    Drawn as full-range 64-bit integers viewed as 8 bytes each: one generator call per 8 bytes
    (``random_(0, 256)`` on uint8 makes one per byte, ~4x slower on CPU).
    """
    n = x.numel()
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device)
    flat = words.random_(torch.iinfo(torch.int64).min, None).view(torch.uint8)[:n]
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return flat.as_strided(x.shape, x.stride())  # dense strides are a permutation
    return flat.view(x.shape)


class Dropout(nn.Module):
    """Element-wise dropout, as ``nn.Dropout(p)``, with the keep mask drawn in ``x``'s memory
    format: uniform bytes ``>= 256 p`` when ``256 p`` is a whole number (exact, e.g. p = 0.5),
    else ``rand >= p`` in fp32 (on CPU both are several times cheaper than ``bernoulli_``).
    Under ``torch.compile`` it is always ``rand >= p``: inductor generates (and fuses) it."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        level = self.p * 256
        if level == round(level) and not torch.compiler.is_compiling():
            # bytes >= level as 0 / 1 without a bool tensor (on CPU a comparison and a cast
            # from bool are each slower than this whole line): clamp to [level - 1, level]
            keep = random_bytes_like(x).clamp_(int(level) - 1, int(level)).sub_(int(level) - 1)
        else:
            keep = torch.rand_like(x, dtype=torch.float32) >= self.p
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


def down_shift(x: Tensor) -> Tensor:
    """Shift ``[b, c, h, w]`` down one row: row ``i`` takes row ``i - 1``, row 0 is zero."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: Tensor) -> Tensor:
    """Shift ``[b, c, h, w]`` right one column: column ``j`` takes ``j - 1``, column 0 is zero."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class ShiftedConv2d(nn.Conv2d):
    """A convolution over its input zero-padded by ``pads`` (left, right, top, bottom)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: tuple[int, int], stride: int, pads: Pads
    ) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride)
        self.pads = pads

    def forward(self, x: Tensor) -> Tensor:
        return self.of_padded(F.pad(x, self.pads))

    def of_padded(self, x: Tensor) -> Tensor:
        """The convolution of an input already padded by ``pads`` (e.g. by :func:`concat_elu`)."""
        return super().forward(x)

    def of_concat_elu(self, x: Tensor, dropout: nn.Module | None = None) -> Tensor:
        """``self(dropout(concat_elu(x)))``, padded in the same pass as the ELU (the
        dropout's mask also covers the zero padding, where it changes nothing)."""
        y = concat_elu(x, self.pads)
        return self.of_padded(y if dropout is None else dropout(y))


class DownShiftedConv2d(ShiftedConv2d):
    """Conv whose output ``(i, j)`` reads rows ``i-kh+1..i``, columns ``j-kw//2..j+kw//2``.

    ``kernel[1]`` must be odd (centred columns). ``[b, c_in, h, w] -> [b, c_out, h/s, w/s]``.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: tuple[int, int] = (2, 3), stride: int = 1
    ) -> None:
        if kernel[1] % 2 != 1:
            raise ValueError(f"DownShiftedConv2d needs an odd kernel width, got {kernel}")
        side = (kernel[1] - 1) // 2
        super().__init__(in_ch, out_ch, kernel, stride, (side, side, kernel[0] - 1, 0))


class DownRightShiftedConv2d(ShiftedConv2d):
    """Conv whose output ``(i, j)`` reads rows ``i-kh+1..i`` and columns ``j-kw+1..j``.

    ``[b, c_in, h, w] -> [b, c_out, h/s, w/s]``.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: tuple[int, int] = (2, 2), stride: int = 1
    ) -> None:
        super().__init__(in_ch, out_ch, kernel, stride, (kernel[1] - 1, 0, kernel[0] - 1, 0))


class DownShiftedDeconv2d(nn.Module):
    """2x upsampling, kernel ``(2, 3)``: output ``(y, x)`` reads input row ``y // 2`` and
    columns ``x // 2 .. (x + 1) // 2``. ``[b, c_in, h, w] -> [b, c_out, 2h, 2w]``.

    The weights are a ``ConvTranspose2d``'s (stride 2, the output cropped by one column), but
    on CPU the map is computed as one ``(1, 2)`` convolution with ``4 c_out`` outputs and a
    pixel shuffle (oneDNN's bf16 kernel for this transposed convolution is ~10x slower than its
    fp32 one): output ``(2r + a, 2c + e)`` is input ``(r, c)`` times kernel tap ``(a, 1)`` for
    ``e = 0``, and ``(r, c)`` times tap ``(a, 2)`` plus ``(r, c + 1)`` times tap ``(a, 0)`` for
    ``e = 1`` (zero beyond the last column).
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_ch, out_ch, (2, 3), stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":  # the transposed convolution itself (the shuffle: CPU-measured)
            h, width = x.shape[-2:]
            return self.deconv(x)[:, :, : 2 * h, 1 : 2 * width + 1]
        w, bias = self.deconv.weight, self.deconv.bias  # [c_in, c_out, 2 (a), 3], [c_out]
        assert bias is not None
        even, odd = F.pad(w[..., 1:2], (0, 1)), w[..., [2, 0]]  # taps on columns c, c + 1
        kernel = rearrange(torch.stack([even, odd]), "e i o a t -> (a e o) i 1 t")
        return _shuffle_up(F.conv2d(F.pad(x, (0, 1)), kernel, bias.repeat(4)), x)


class DownRightShiftedDeconv2d(nn.Module):
    """2x upsampling, kernel ``(2, 2)``: output ``(y, x)`` reads input ``(y // 2, x // 2)``.

    ``[b, c_in, h, w] -> [b, c_out, 2h, 2w]``. As :class:`DownShiftedDeconv2d`, on CPU a
    ``1 x 1`` convolution with ``4 c_out`` outputs (output ``(2r + a, 2c + e)`` is input
    ``(r, c)`` times tap ``(a, e)``) and a pixel shuffle: oneDNN's bf16 kernel for the
    transposed convolution takes 4.4 ms forward and backward at batch 32, 32 channels,
    16x16 -> 32x32, this 1.0 ms (the same values).
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_ch, out_ch, (2, 2), stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return self.deconv(x)
        w, bias = self.deconv.weight, self.deconv.bias  # [c_in, c_out, 2 (a), 2 (e)], [c_out]
        assert bias is not None
        kernel = rearrange(w, "i o a e -> (a e o) i 1 1")
        return _shuffle_up(F.conv2d(x, kernel, bias.repeat(4)), x)


def _shuffle_up(z: Tensor, x: Tensor) -> Tensor:
    """``z [b, (a e o), h, w] -> [b, o, 2h, 2w]``: output ``(2r + a, 2c + e)`` is channel block
    ``(a, e)`` of ``z`` at ``(r, c)``; channels-last if the input ``x`` was."""
    if is_channels_last(x):
        out = rearrange(z.permute(0, 2, 3, 1), "b h w (a e o) -> b (h a) (w e) o", a=2, e=2)
        return out.permute(0, 3, 1, 2)
    return rearrange(z, "b (a e o) h w -> b o (h a) (w e)", a=2, e=2)


class GatedResnet(nn.Module):
    """``x + a * sigmoid(b)`` with ``[a, b] = conv(dropout(concat_elu(conv(concat_elu(x)) +
    nin(concat_elu(aux)))) + proj(cond)``. Causality is that of ``make_conv``; ``aux`` is read
    at the same position only. ``x: [b, c, h, w]``, ``aux: [b, aux_ch, h, w]``, ``cond: [b, d]``.
    """

    def __init__(
        self,
        channels: int,
        make_conv: ConvFactory,
        aux_channels: int = 0,
        dropout: float = 0.0,
        cond_dim: int = 0,
    ) -> None:
        super().__init__()
        self.conv1 = make_conv(2 * channels, channels)
        self.nin_aux = nn.Conv2d(2 * aux_channels, channels, 1) if aux_channels else None
        self.dropout = Dropout(dropout)
        self.conv2 = make_conv(2 * channels, 2 * channels)
        with torch.no_grad():  # small residual branch at init, as the original's init_scale
            self.conv2.weight.mul_(0.1)
        self.cond_proj = nn.Linear(cond_dim, 2 * channels, bias=False) if cond_dim else None

    def forward(self, x: Tensor, aux: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        c1 = self.conv1.of_concat_elu(x)
        if self.nin_aux is not None:
            assert aux is not None, "this block was built with an auxiliary input"
            c1 = c1 + self.nin_aux(concat_elu(aux))
        c2 = self.conv2.of_concat_elu(c1, self.dropout)
        if self.cond_proj is not None:
            assert cond is not None, "this block was built with conditioning"
            c2 = c2 + self.cond_proj(cond)[:, :, None, None]  # [b, 2c] -> [b, 2c, 1, 1]
        return residual_gate(x, c2)
