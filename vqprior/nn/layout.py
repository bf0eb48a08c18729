"""Memory-layout rules shared by the layers."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["channel_halves", "is_channels_last", "ring_kernels", "trains_channels_last"]


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x [b, c, h, w]`` is laid out channels-last: each pixel's channels adjacent, as
    in a dense channels-last map or a crop of one (``F.pad(x)[..., :-1, :]``), and not also
    plain contiguous, as a map with one channel or one pixel is. What a new map computed from
    ``x`` should follow: on CPU an elementwise op whose operands mix the layouts runs ~5x slower.
    """
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous()


def channel_halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [b, 2F, h, w]`` split in two along channels: views, or dense copies where those
    are faster.

    A channel half of a channels-last map is strided (each pixel's channels sit together): on
    CPU a bf16 elementwise op on it walks element by element, ~8x slower for sigmoid and ~2x
    for tanh than on a dense copy, which costs far less. So 16-bit channels-last halves on CPU
    are copied. Float32 ones stay views: their ops vectorise over the channels, and the copies
    cost more than they save (a gated layer's ``tanh(a) sigmoid(b)`` with its backward, batch
    32, 64 channels, 32x32: 9.5 ms on views against 10.2 ms on copies). Elsewhere (not measured
    on GPUs: the copies would only add traffic there), and for NCHW maps, whose halves are
    dense blocks per example, the halves are views.
    """
    a, b = x.chunk(2, dim=1)
    if x.device.type == "cpu" and x.element_size() < 4 and is_channels_last(x):
        cl = torch.channels_last
        return a.contiguous(memory_format=cl), b.contiguous(memory_format=cl)
    return a, b


def trains_channels_last(device_type: str, precision: str, prior: bool) -> bool:
    """Whether training runs in channels-last memory, for Lightning's ``precision`` string
    (``32-true``, ``bf16-mixed``, ...): on CUDA; under bf16 (oneDNN's bf16 kernels want NHWC);
    in fp32 on CPU for the priors (1.1-1.2x a step). The VQ-VAE's fp32 CPU training stays NCHW:
    its gain is 4-7%, and oneDNN's NHWC kernels round a batch of 8 and one of 16 differently,
    which flips nearest codes and breaks the equality of 2 DDP ranks with one process on the
    whole batch."""
    fp32 = precision.startswith("32")
    return device_type == "cuda" or precision.startswith("bf16") or (prior and fp32)


def ring_kernels(weight: Tensor) -> tuple[Tensor, ...]:
    """A kernel ``[o, i, kh, kw]`` whose output row ``r`` reads input rows ``r - kh + 1 .. r``,
    for a ring of ``kh`` row slots that keeps those rows (input row ``t`` in slot ``t % kh``):
    ``kh`` kernels ``[o, kh i, 1, kw]``, the one for ``r % kh`` first, channels ``(slot, i)``,
    channels-last. A ring ``[n, w, kh, i]`` is then one channels-last ``[n, kh i, 1, w]`` map
    (``rearrange(ring, "n w s i -> n (s i) 1 w")``), which a convolution reads in place, where
    a slice of rows of a taller map is not channels-last contiguous and would be copied first.
    """
    kh = weight.shape[2]
    rows = weight.unbind(2)  # kernel row t reads input row r - kh + 1 + t, which is in slot
    kernels = []  # (r - kh + 1 + t) % kh: slot s holds kernel row (s - r - 1) % kh
    for v in range(kh):
        k = torch.cat([rows[(s - v - 1) % kh] for s in range(kh)], 1).unsqueeze(2)
        kernels.append(k.contiguous(memory_format=torch.channels_last))
    return tuple(kernels)
