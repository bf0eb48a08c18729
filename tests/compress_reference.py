"""Independent reference implementations for the tests of the uses: a naive raster walk with
the signature of :func:`vqprior.sampling.autoregress` (one full forward pass per step), and
per-channel mixture bin log-probabilities with the signature of
:func:`vqprior.nn.mixture.mixture_channel_log_probs` (the public ``mixture_log_prob``
evaluated at every bin). Compression must round-trip with either."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from einops import rearrange, repeat
from torch import Tensor

from vqprior.nn.grid import from_bins
from vqprior.nn.mixture import mixture_log_prob

if TYPE_CHECKING:
    from vqprior.models.pixelcnn import PixelCNN

Choose = Callable[[Tensor, int, int, "int | None"], Tensor]


def naive_autoregress(
    model: PixelCNN,
    n: int,
    choose: Choose,
    cond: Tensor | None = None,
    spatial_cond: Tensor | None = None,
    method: str = "naive",
) -> Tensor:
    """One full forward pass per (row, column, channel group) step; ``choose(out [n, P], r, c,
    group)`` returns codes long [n] or pixels [n, C] (only channel ``group`` is written)."""
    cfg = model.config
    groups = getattr(cfg, "channel_groups", None) or getattr(cfg, "groups")  # noqa: B009
    dev = next(model.parameters()).device
    if cfg.data == "codes":
        x = torch.zeros(n, cfg.height, cfg.width, dtype=torch.long, device=dev)
    else:
        x = torch.zeros(
            n, cfg.in_channels, cfg.height, cfg.width, dtype=model.head_dtype(), device=dev
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for r in range(cfg.height):
                for c in range(cfg.width):
                    for group in [None] if groups == 1 else list(range(groups)):
                        out = model(x, cond, spatial_cond)[:, :, r, c]
                        values = choose(out, r, c, group)
                        if cfg.data == "codes":
                            x[:, r, c] = values
                        elif group is None:
                            x[:, :, r, c] = values.to(x.dtype)
                        else:
                            x[:, group, r, c] = values[:, group].to(x.dtype)
    finally:
        model.train(was_training)
    return x


def channel_log_probs(
    params: Tensor, x: Tensor | None, channel: int, num_mixtures: int, num_bins: int = 256
) -> Tensor:
    """``log p(x_c = v | x_{<c})`` ``[b, num_bins, h, w]`` for every bin ``v`` of channel
    ``channel``, given the earlier channels of ``x`` ``[b, C, h, w]``."""
    b, _, h, w = params.shape
    num_channels = 1 if x is None else x.shape[1]
    base = torch.zeros(b, num_channels, h, w, device=params.device) if x is None else x
    cand = repeat(base.float(), "b c h w -> b n c h w", n=num_bins).clone()
    cand[:, :, channel] = from_bins(torch.arange(num_bins, device=params.device), num_bins).view(
        1, num_bins, 1, 1
    )
    cand[:, :, channel + 1 :] = 0.0
    lp = mixture_log_prob(
        rearrange(cand, "b n c h w -> (b n) c h w"),
        repeat(params, "b p h w -> (b n) p h w", n=num_bins),
        num_mixtures,
        num_bins,
    )
    return rearrange(lp[:, channel], "(b n) h w -> b n h w", n=num_bins)
