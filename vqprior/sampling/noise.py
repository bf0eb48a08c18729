"""Pre-drawn noise: every random number of a sampling run, drawn up front on the CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from vqprior.nn.mixture import draw_mixture_noise

if TYPE_CHECKING:
    from vqprior.models.pixelcnn import PixelCNN

CPU = torch.device("cpu")


def sampling_generator(seed: int) -> torch.Generator:
    """The generator of a seeded sampling run: always on the CPU, whatever device the model is
    on (the noise is drawn there and moved, :func:`draw_noise`). Every seeded sampler of the
    package gets its generator here; a generator built on a model's device would be refused
    by :func:`draw_noise` on every GPU."""
    return torch.Generator(device=CPU).manual_seed(seed)


class Noise(NamedTuple):
    """Pre-drawn uniforms: ``u`` [n, C, H, W] for categorical heads (codes: C = 1); ``u_comp``
    [n, H, W] and ``u_val`` [n, C, H, W] for the mixture head."""

    u: Tensor | None
    u_comp: Tensor | None
    u_val: Tensor | None

    @property
    def device(self) -> torch.device:
        return next(t for t in self if t is not None).device

    @property
    def n(self) -> int:
        return next(t for t in self if t is not None).shape[0]

    def region(self, rows: slice, cols: slice) -> Noise:
        """The noise of a block of pixels, keeping the 4-d/3-d layouts."""
        return Noise(*(None if t is None else t[..., rows, cols] for t in self))


def draw_noise(
    model: PixelCNN, n: int, generator: torch.Generator | None, device: torch.device
) -> Noise:
    """Draw the uniforms of ``n`` samples on the CPU (from ``generator``, or the global CPU
    RNG when None), in one fixed order, then move them to ``device``: the same seed gives the
    same noise on every device."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            "generator must be a CPU torch.Generator: sampling noise is drawn on the CPU so "
            "that a seed gives the same samples on every device"
        )
    cfg = model.config
    if cfg.mixture:
        shape = (n, cfg.in_channels, cfg.height, cfg.width)
        u_comp, u_val = draw_mixture_noise(shape, generator, CPU)
        return Noise(None, u_comp.to(device), u_val.to(device))
    c = 1 if cfg.data == "codes" else cfg.in_channels
    u = torch.rand((n, c, cfg.height, cfg.width), generator=generator, device=CPU)
    return Noise(u.to(device), None, None)
