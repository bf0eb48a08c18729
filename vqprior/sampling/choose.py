"""``choose`` functions: head output + pre-drawn noise -> the values to write.

One :class:`Chooser` serves every sampler: called per element by a walk
(:func:`vqprior.sampling.walk.autoregress`) or on a whole image by the fixed-point sampler
(:meth:`Chooser.values`), both through the same map, so all methods return the same values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from torch import Tensor

from vqprior.nn.categorical import categorical_sample
from vqprior.nn.grid import from_bins
from vqprior.nn.mixture import MixtureRows, logistic_noise, mixture_mode
from vqprior.nn.precision import as_dtype, full_precision, upcast, wide_dtype
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
    logistic: Tensor | None = None,
) -> Tensor:
    """Map head output [n, P, h, w] and matching noise to values: codes [n, h, w] (long) or
    pixels [n, C, h, w] on the grid (head dtype). ``logistic`` [n, h, w, C]: the mixture's
    logistic noise of ``noise.u_val`` when precomputed (:class:`Chooser` does it per image)."""
    draw = RowValues(model, out.dtype, out.device, temperature, top_k, top_p)
    return draw.on_grid(out, noise, logistic)


def _rows(t: Tensor) -> Tensor:
    """Noise [n, C, h, w] -> [(n h w), C]; [n, h, w] -> [(n h w)]."""
    return t.reshape(-1) if t.dim() == 3 else t.movedim(1, -1).reshape(-1, t.shape[1])


class RowValues:
    """Head output rows [R, P] and noise rows (``u`` [R, C]; ``u_comp`` [R], ``u_val``
    [R, C]; ``logistic`` [R, C] or None) -> codes long [R] or pixels [R, C] on the grid (head
    dtype), for head output of ``dtype``. Set up once per sampler (the mixture's draw,
    :class:`~vqprior.nn.mixture.MixtureRows`, with it): a step calls it with R = n."""

    def __init__(
        self,
        model: PixelCNN,
        dtype: torch.dtype,
        device: torch.device,
        temperature: float,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> None:
        cfg = self.config = model.config
        self.temperature, self.trunc = temperature, truncation(top_k, top_p)
        self.out_dtype = wide_dtype(dtype)  # the head dtype (model.head_dtype(), without its cost)
        self.mix: MixtureRows | None = None
        if cfg.mixture and temperature > 0.0:
            args = (cfg.in_channels, cfg.num_mixtures, cfg.num_bins, self.out_dtype, device)
            self.mix = MixtureRows(*args, temperature, top_k, top_p)

    def on_grid(self, out: Tensor, noise: Noise, logistic: Tensor | None = None) -> Tensor:
        """The same on a grid: head output [n, P, h, w] -> codes [n, h, w] or pixels
        [n, C, h, w]; ``logistic`` [n, h, w, C] or None."""
        b, p, h, w = out.shape
        rows = out.movedim(1, -1).reshape(-1, p)
        noise_rows = Noise(*(None if t is None else _rows(t) for t in noise))
        lay = None if logistic is None else logistic.reshape(-1, logistic.shape[-1])
        vals = self(rows, noise_rows, lay)
        if self.config.data == "codes":
            return vals.view(b, h, w)
        return vals.view(b, h, w, -1).movedim(-1, 1)

    def __call__(self, rows: Tensor, noise: Noise, logistic: Tensor | None = None) -> Tensor:
        cfg, temperature = self.config, self.temperature
        if cfg.mixture:
            assert noise.u_comp is not None and noise.u_val is not None
            if self.mix is None:  # temperature 0: the mode
                args = (cfg.in_channels, cfg.num_mixtures, cfg.num_bins)
                return mixture_mode(rows[:, :, None, None], *args)[:, :, 0, 0].to(self.out_dtype)
            with full_precision(rows.device.type):
                work = upcast(rows)
                lay = logistic_noise(noise.u_val, work.dtype) if logistic is None else logistic
                vals = self.mix(work, noise.u_comp, as_dtype(lay, work.dtype))
            return as_dtype(vals, self.out_dtype)
        assert noise.u is not None
        if cfg.data == "codes":
            return categorical_sample(rows, noise.u[:, 0], temperature, **self.trunc)
        c = cfg.in_channels
        logits = rows.reshape(rows.shape[0] * c, -1)  # [(R C), N]: channel-major params
        idx = categorical_sample(logits, noise.u.reshape(-1), temperature, **self.trunc)
        return from_bins(idx.view(-1, c), cfg.num_bins, self.out_dtype)


def guided_logits(model: PixelCNN, out: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``out`` [2n, P, h, w] holds the conditional outputs, then the
    null-class ones; returns ``(1 + s) log p(x | c) - s log p(x | null)`` per categorical
    distribution, as logits [n, P, h, w] (the samplers renormalise)."""
    cfg = model.config
    cats = 1 if cfg.data == "codes" else cfg.in_channels
    work = upcast(out)
    with full_precision(out.device.type):
        lp = torch.log_softmax(rearrange(work, "b (c n) h w -> b c n h w", c=cats), dim=2)
        cond, null = lp.chunk(2)
        mixed = (1.0 + scale) * cond - scale * null
    return rearrange(mixed, "b c n h w -> b (c n) h w")


@dataclass(frozen=True)
class Chooser:
    """Sampling as a ``choose`` function; ``known``/``mask`` [n, *data_shape] keep known values
    where ``mask`` is True; ``guidance`` expects a doubled batch (conditional, then null).
    The mixture's logistic noise is computed once per image, for every path."""

    model: PixelCNN
    noise: Noise
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    known: Tensor | None = None
    mask: Tensor | None = None
    guidance: float | None = None
    logistic: Tensor | None = field(init=False, default=None)  # [n, H, W, C]

    def __post_init__(self) -> None:
        u_val = self.noise.u_val
        if u_val is not None and self.temperature > 0.0:
            lay = logistic_noise(u_val.movedim(1, -1), self.model.head_dtype()).contiguous()
            object.__setattr__(self, "logistic", lay)

    def values(self, out: Tensor, rows: slice = ALL, cols: slice = ALL) -> Tensor:
        """Values for a block of pixels from head output [b, P, h, w] there."""
        if self.guidance is not None:
            out = guided_logits(self.model, out, self.guidance)
        noise = self.noise.region(rows, cols)
        lay = None if self.logistic is None else self.logistic[:, rows, cols]
        return self._finish(self._draw.on_grid(out, noise, lay), (Ellipsis, rows, cols))

    def __call__(self, out: Tensor, r: int, c: int, group: int | None) -> Tensor:
        """Values at element (r, c) from its head output [n, P], on rows (no reshapes)."""
        if self.guidance is not None:
            out = guided_logits(self.model, out[:, :, None, None], self.guidance)[:, :, 0, 0]
        noise, lay = self._elements[r * self.model.config.width + c]
        return self._finish(self._draw(out, noise, lay), (Ellipsis, r, c))

    @functools.cached_property
    def _draw(self) -> RowValues:
        """The map from head output rows to values, set up once."""
        device = next(self.model.parameters()).device
        trunc = (self.top_k, self.top_p)
        return RowValues(self.model, self.model.head_dtype(), device, self.temperature, *trunc)

    @functools.cached_property
    def _elements(self) -> list[tuple[Noise, Tensor | None]]:
        """The noise (and logistic noise) of every element in raster order, as views made
        once: indexing a tensor costs about a microsecond a dimension, per step."""
        per_tensor = [
            [None] * self.model.config.height * self.model.config.width
            if t is None
            else t.flatten(-2).unbind(-1)
            for t in (*self.noise, None if self.logistic is None else self.logistic.movedim(-1, 1))
        ]
        return [(Noise(u, comp, val), lay) for u, comp, val, lay in zip(*per_tensor, strict=True)]

    def _finish(self, vals: Tensor, where: tuple[Any, ...]) -> Tensor:
        """Known values where the mask says so; the doubled batch under guidance."""
        if self.known is not None and self.mask is not None:
            vals = torch.where(self.mask[where], self.known[where], vals)
        return vals if self.guidance is None else torch.cat([vals, vals])
