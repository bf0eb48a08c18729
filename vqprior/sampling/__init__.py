"""Exact samplers for :class:`vqprior.PixelCNN`: the reference loop and two fast ones.

Every sampler draws all its random numbers up front, in one fixed order, on the CPU (from the
caller's CPU ``torch.Generator``, or the global CPU RNG when ``generator`` is None) and moves
them to the model's device (:func:`draw_noise`); noise then maps to a sample deterministically
element by element in raster order (row, column, channel group), through one ``choose``
function (:class:`Chooser`). So every method returns the *same* samples:

- ``naive``: one full forward pass per sequential step (the reference).
- ``cached``: :func:`autoregress` through the model's step interface: every layer keeps row
  caches (:mod:`vqprior.nn.step`), so a step costs O(layers) small matmuls, not a full pass.
- ``fixed_point`` (any causal backbone): iterate ``x <- choose(model(x))`` until nothing
  changes; after ``t`` passes the first ``t`` steps are final, so it converges to the
  reference sample in at most ``steps + 1`` passes, usually far fewer.

What "exact" means: the methods evaluate the same network, but in different orders of floating
point operations (a 1x1 matmul on one element instead of a convolution over the image). The
results agree to rounding, so in float64 the samples are identical; in float32 (and under TF32
or bf16 weights, where rounding is coarser) a sample can differ where the noise falls within
rounding distance of a bin boundary (a near tie), after which the rest of that sample follows
a different path. On one device the same seed always gives the same samples for a method; the
noise, drawn on the CPU, is the same on every device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vqprior.sampling.choose import Chooser, values_from_output
from vqprior.sampling.noise import Noise, draw_noise, sampling_generator
from vqprior.sampling.options import prepare
from vqprior.sampling.walk import autoregress, fixed_point, num_steps, raster

if TYPE_CHECKING:
    from vqprior.models.pixelcnn import PixelCNN

__all__ = [
    "METHODS",
    "Chooser",
    "Noise",
    "autoregress",
    "draw_noise",
    "fixed_point",
    "num_steps",
    "raster",
    "sample",
    "sample_naive",
    "sampling_generator",
    "values_from_output",
]

METHODS = ("auto", "naive", "cached", "fixed_point")


def sample(
    model: PixelCNN,
    n: int,
    cond: Tensor | int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    method: str = "auto",
    spatial_cond: Tensor | None = None,
    *,
    known: Tensor | None = None,
    mask: Tensor | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance: float | None = None,
) -> Tensor:
    """Draw ``n`` samples from ``model`` (the entry point behind :meth:`PixelCNN.sample`).

    Args:
        cond: class labels [n] (or one label for all) for a class-conditional prior.
        temperature: >= 0; 0 takes the mode of every conditional.
        generator: a CPU ``torch.Generator``; None uses the global CPU RNG.
        method: "auto" (cached when the backbone steps, else fixed_point), "cached",
            "fixed_point" or "naive" (the reference loop).
        spatial_cond: [n, s, H, W] for a prior with ``spatial_cond_channels = s``.
        known, mask: completion. ``mask`` (bool, [n, *data_shape] or [*data_shape]) marks the
            elements that keep ``known``'s values; the others are sampled in raster order,
            each conditioned on everything before it. Exact for a known prefix; a known
            element cannot condition earlier ones (the model is autoregressive), so for other
            masks the result is the raster-order completion, not the posterior. The mixture
            head couples a pixel's channels: mask whole pixels there.
        top_k, top_p: truncate every categorical distribution to its ``top_k`` most likely
            values / its smallest set of probability >= ``top_p`` (categorical heads).
        guidance: classifier-free guidance scale ``s``: sample from ``(1 + s) log p(x | c) -
            s log p(x | null)``, renormalised, at every step (0 is the conditional prior);
            needs a prior trained with ``class_dropout > 0`` and a categorical head.

    Returns:
        codes long [n, h, w] or pixels [n, C, H, W] on the grid.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
    run = prepare(model, n, cond, temperature, spatial_cond, known, mask, top_k, top_p, guidance)
    if method == "auto":
        method = "cached" if run.cached else "fixed_point"
    if method == "cached" and not run.cached:
        raise ValueError(
            f"method='cached' needs backbone='gated' (backbone={model.config.backbone!r} has no "
            "step interface); use 'fixed_point' or 'auto'"
        )
    device = next(model.parameters()).device
    noise = draw_noise(model, n, generator, device)
    choose = Chooser(model, noise, temperature, top_k, top_p, run.known, run.mask, run.guidance)
    if method == "fixed_point":
        x = fixed_point(model, run.batch, choose.values, run.cond, run.spatial_cond)
    else:
        x = autoregress(model, run.batch, choose, run.cond, run.spatial_cond, method)
    return x[:n]


def sample_naive(
    model: PixelCNN,
    n: int,
    cond: Tensor | None,
    temperature: float,
    noise: Noise,
    spatial_cond: Tensor | None,
    max_steps: int | None = None,
) -> Tensor:
    """The reference loop on pre-drawn noise; ``max_steps`` stops early (the benchmark times
    such a prefix)."""
    choose = Chooser(model, noise, temperature)
    return autoregress(model, n, choose, cond, spatial_cond, "naive", max_steps=max_steps)
