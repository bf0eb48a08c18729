"""``choose`` functions: head output + pre-drawn noise -> the values to write.

One :class:`Chooser` serves every sampler: called per element by a walk
(:func:`vqprior.sampling.walk.autoregress`) or on a whole image by the fixed-point sampler
(:meth:`Chooser.values`), both through the same map, so all methods return the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from torch import Tensor

from vqprior.nn.categorical import categorical_sample
from vqprior.nn.grid import from_bins
from vqprior.nn.mixture import mixture_sample
from vqprior.nn.precision import full_precision
from vqprior.sampling.noise import Noise

if TYPE_CHECKING:
    from vqprior.models.pixelcnn import PixelCNN

ALL = slice(None)


def truncation(top_k: int | None, top_p: float | None) -> dict[str, Any]:
    """Keyword arguments for the head samplers (empty when not truncating)."""
    trunc: dict[str, Any] = {}
    if top_k is not None:
        trunc["top_k"] = top_k
    if top_p is not None:
        trunc["top_p"] = top_p
    return trunc


def values_from_output(
    model: PixelCNN,
    out: Tensor,
    noise: Noise,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Map head output [n, P, h, w] and matching noise to values: codes [n, h, w] (long) or
    pixels [n, C, h, w] on the grid (head dtype)."""
    cfg = model.config
    trunc = truncation(top_k, top_p)
    if cfg.mixture:
        assert noise.u_comp is not None and noise.u_val is not None
        args = (cfg.in_channels, cfg.num_mixtures, cfg.num_bins, noise.u_comp, noise.u_val)
        return mixture_sample(out, *args, temperature, **trunc).to(model.head_dtype())
    assert noise.u is not None
    if cfg.data == "codes":
        return categorical_sample(out, noise.u[:, 0], temperature, **trunc)
    logits = rearrange(out, "b (c n) h w -> b n c h w", c=cfg.in_channels)
    idx = categorical_sample(logits, noise.u, temperature, **trunc)
    return from_bins(idx, cfg.num_bins, model.head_dtype())


def guided_logits(model: PixelCNN, out: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``out`` [2n, P, h, w] holds the conditional outputs, then the
    null-class ones; returns ``(1 + s) log p(x | c) - s log p(x | null)`` per categorical
    distribution, as logits [n, P, h, w] (the samplers renormalise)."""
    cfg = model.config
    cats = 1 if cfg.data == "codes" else cfg.in_channels
    work = out if out.dtype == torch.float64 else out.float()
    with full_precision(out.device.type):
        lp = torch.log_softmax(rearrange(work, "b (c n) h w -> b c n h w", c=cats), dim=2)
        cond, null = lp.chunk(2)
        mixed = (1.0 + scale) * cond - scale * null
    return rearrange(mixed, "b c n h w -> b (c n) h w")


@dataclass(frozen=True)
class Chooser:
    """Sampling as a ``choose`` function; ``known``/``mask`` [n, *data_shape] keep known values
    where ``mask`` is True; ``guidance`` expects a doubled batch (conditional, then null)."""

    model: PixelCNN
    noise: Noise
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    known: Tensor | None = None
    mask: Tensor | None = None
    guidance: float | None = None

    def values(self, out: Tensor, rows: slice = ALL, cols: slice = ALL) -> Tensor:
        """Values for a block of pixels from head output [b, P, h, w] there."""
        if self.guidance is not None:
            out = guided_logits(self.model, out, self.guidance)
        noise = self.noise.region(rows, cols)
        vals = values_from_output(self.model, out, noise, self.temperature, self.top_k, self.top_p)
        if self.known is not None and self.mask is not None:
            vals = torch.where(self.mask[..., rows, cols], self.known[..., rows, cols], vals)
        return vals if self.guidance is None else torch.cat([vals, vals])

    def __call__(self, out: Tensor, r: int, c: int, group: int | None) -> Tensor:
        vals = self.values(out[:, :, None, None], slice(r, r + 1), slice(c, c + 1))
        return vals[..., 0, 0]
