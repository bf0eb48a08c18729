"""PixelCNN++ discretized logistic mixture (Salimans et al. 2017) as pure functions.

Network output ``params`` ``[b, P, h, w]`` for ``C`` channels and ``M`` mixtures, with
``P = num_mixture_params(C, M) = M + 2 C M + M C (C - 1) / 2``, laid out along dim 1 as::

    [ M logits | C*M means "(c m)" | C*M log-scales "(c m)" | M*C(C-1)/2 raw coeffs "(k m)" ]

Coefficient ``k`` couples the pair ``(c, c')``, ``c' < c``, in the order (1,0), (2,0), (2,1),
(3,0), ...; i.e. ``k = c (c - 1) / 2 + c'``. A coefficient is ``tanh(raw)``. Under component
``m`` channel ``c`` has mean ``mu[m, c] + sum_{c' < c} coeff[m, k(c, c')] x[c']`` (for C = 3
exactly PixelCNN++: G uses R, B uses R and G) and scale ``exp(log_scale[m, c])``; the component
is shared by all channels of a pixel. Values live on the ``num_bins`` grid of
:mod:`vqprior.nn.grid` with bin half-width ``d = 1 / (num_bins - 1)``; the edge bins take the
logistic tails. Log-scales are clamped to [-40, 40] only to keep ``exp`` finite.

All math runs in fp32 (fp64 inputs stay fp64) with autocast disabled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqprior.nn.categorical import categorical_sample
from vqprior.nn.grid import from_bins, to_bins

__all__ = [
    "DiscretizedLogisticMixture",
    "MixtureParams",
    "draw_mixture_noise",
    "mixture_log_prob",
    "mixture_sample",
    "num_mixture_params",
    "split_mixture_params",
]

LOG_SCALE_MIN = -40.0
LOG_SCALE_MAX = 40.0


class MixtureParams(NamedTuple):
    """Split mixture parameters (fp32, or fp64 for fp64 input)."""

    logits: Tensor  # [b, m, h, w] unnormalised component log-weights
    means: Tensor  # [b, m, c, h, w] unconditional means mu
    log_scales: Tensor  # [b, m, c, h, w] clamped to [-40, 40]
    coeffs: Tensor  # [b, m, c(c-1)/2, h, w] after tanh


def _upcast(t: Tensor) -> Tensor:
    """Return ``t`` as float32, or unchanged if it is already float64."""
    return t if t.dtype == torch.float64 else t.float()


def _pair_index(c: int, c_prev: int) -> int:
    """Index of the coefficient coupling channel ``c`` to an earlier channel ``c_prev``."""
    return c * (c - 1) // 2 + c_prev


def num_mixture_params(num_channels: int, num_mixtures: int) -> int:
    """Network output channels ``M + 2 C M + M C (C - 1) / 2`` for C channels, M mixtures."""
    if num_channels < 1 or num_mixtures < 1:
        raise ValueError(
            f"num_channels and num_mixtures must be >= 1, got {num_channels}, {num_mixtures}"
        )
    c, m = num_channels, num_mixtures
    return m + 2 * c * m + m * c * (c - 1) // 2


def split_mixture_params(params: Tensor, num_channels: int, num_mixtures: int) -> MixtureParams:
    """Split ``[b, P, h, w]`` network output into :class:`MixtureParams` (see module doc)."""
    c, m = num_channels, num_mixtures
    expected = num_mixture_params(c, m)
    if params.dim() != 4 or params.shape[1] != expected:
        raise ValueError(
            f"params must have shape [b, {expected}, h, w] for {c} channels and {m} mixtures, "
            f"got {tuple(params.shape)}"
        )
    with torch.autocast(device_type=params.device.type, enabled=False):
        p = _upcast(params)
        logits, means, log_scales, raw = torch.split(
            p, [m, c * m, c * m, expected - m - 2 * c * m], 1
        )
        return MixtureParams(
            logits=logits,
            means=rearrange(means, "b (c m) h w -> b m c h w", c=c),
            log_scales=rearrange(log_scales, "b (c m) h w -> b m c h w", c=c).clamp(
                LOG_SCALE_MIN, LOG_SCALE_MAX
            ),
            coeffs=torch.tanh(rearrange(raw, "b (k m) h w -> b m k h w", m=m)),
        )


def _conditional_mean(mu: Tensor, coeffs: Tensor, x: Sequence[Tensor], c: int) -> Tensor:
    """Mean of channel ``c``: ``mu[..., c] + sum_{c' < c} coeff[k(c, c')] * x[c']``.

    ``mu`` ``[..., C, h, w]`` and ``coeffs`` ``[..., K, h, w]`` share leading axes; ``x`` holds
    (at least) the earlier channels, each broadcastable to ``mu[..., c, :, :]``.
    """
    mean = mu[..., c, :, :]
    for c_prev in range(c):
        mean = mean + coeffs[..., _pair_index(c, c_prev), :, :] * x[c_prev]
    return mean


def _log1mexp(t: Tensor) -> Tensor:
    """``log(1 - exp(-t))`` for ``t > 0``, accurate at both ends (Maechler 2012).

    Each branch only ever sees inputs in its own range, so neither produces a NaN gradient.
    """
    t = t.clamp(min=torch.finfo(t.dtype).tiny)
    small = torch.log(-torch.expm1(-t.clamp(max=math.log(2.0))))
    large = torch.log1p(-torch.exp(-t.clamp(min=math.log(2.0))))
    return torch.where(t <= math.log(2.0), small, large)


def _log_bin_mass(idx: Tensor, mean: Tensor, log_scale: Tensor, num_bins: int) -> Tensor:
    """Log mass of grid bin ``idx`` under logistic(mean, exp(log_scale)).

    ``idx`` broadcasts against ``mean``/``log_scale``; result has their broadcast shape.
    """
    half = 1.0 / (num_bins - 1)
    inv_scale = torch.exp(-log_scale)
    # Bin edges x -/+ d = (2 idx - (N - 1) -/+ 1) / (N - 1): exact integer numerators.
    twice = 2 * idx - (num_bins - 1)
    upper = (twice + 1).to(mean.dtype) / (num_bins - 1)
    lower = (twice - 1).to(mean.dtype) / (num_bins - 1)
    a = (upper - mean) * inv_scale  # upper edge, standardised
    b = (lower - mean) * inv_scale  # lower edge, standardised
    left = F.logsigmoid(a)  # log sigmoid(a): bin 0 takes the whole lower tail
    right = F.logsigmoid(-b)  # log(1 - sigmoid(b)) = -softplus(b): the upper tail
    # a - b computed directly as 2d/s: no cancellation when the mean is far away.
    interior = F.logsigmoid(a) + F.logsigmoid(-b) + _log1mexp(2.0 * half * inv_scale)
    return torch.where(idx == 0, left, torch.where(idx == num_bins - 1, right, interior))


def mixture_log_prob(x: Tensor, params: Tensor, num_mixtures: int, num_bins: int = 256) -> Tensor:
    """Per-element conditional log-probabilities in nats.

    ``lp[c] = log p(x_c | x_{<c} of the same pixel, params)``, the component being shared by all
    channels of a pixel; summing over ``c`` gives the pixel's joint log-probability.

    Args:
        x: float ``[b, c, h, w]`` on the ``num_bins`` grid in [-1, 1] (snapped to the nearest level).
        params: ``[b, P, h, w]`` raw network output, ``P = num_mixture_params(c, num_mixtures)``.
        num_mixtures: M.
        num_bins: grid levels N (256 for 8-bit pixels).

    Returns:
        float32 ``[b, c, h, w]`` (float64 for float64 params), finite for any finite params.
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape [b, c, h, w], got {tuple(x.shape)}")
    if params.shape[:1] + params.shape[2:] != x.shape[:1] + x.shape[2:]:
        raise ValueError(
            f"params {tuple(params.shape)} and x {tuple(x.shape)} differ in batch or grid size"
        )
    num_channels = x.shape[1]
    with torch.autocast(device_type=params.device.type, enabled=False):
        p = split_mixture_params(params, num_channels, num_mixtures)
        idx = to_bins(x, num_bins)  # [b, c, h, w]
        xq = from_bins(idx, num_bins, dtype=p.means.dtype)
        x_prev = [xq[:, None, c] for c in range(num_channels)]  # each [b, 1, h, w]
        mean = torch.stack(
            [_conditional_mean(p.means, p.coeffs, x_prev, c) for c in range(num_channels)], dim=2
        )  # [b, m, c, h, w]
        lm = _log_bin_mass(idx[:, None], mean, p.log_scales, num_bins)  # [b, m, c, h, w]
        # Component log-weights given the earlier channels: log pi_m + sum_{c' < c} l[m, c'].
        before = torch.cat([torch.zeros_like(lm[:, :, :1]), lm[:, :, :-1].cumsum(dim=2)], dim=2)
        prior = torch.log_softmax(p.logits, dim=1)[:, :, None] + before  # [b, m, c, h, w]
        # LSE(prior + l) - LSE(prior), taken as LSE(log_softmax(prior) + l) to avoid cancellation.
        return torch.logsumexp(torch.log_softmax(prior, dim=1) + lm, dim=1)


def _gather_component(t: Tensor, comp: Tensor) -> Tensor:
    """Pick component ``comp`` ``[b, h, w]`` from ``t`` ``[b, m, k, h, w]`` -> ``[b, k, h, w]``."""
    index = comp[:, None, None].expand(-1, 1, t.shape[2], -1, -1)
    return t.gather(1, index).squeeze(1)


def mixture_sample(
    params: Tensor,
    num_channels: int,
    num_mixtures: int,
    num_bins: int,
    u_comp: Tensor,
    u_val: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Sample pixels on the grid, deterministically given pre-drawn uniforms.

    The component is the inverse CDF of ``softmax(logits / T)`` at ``u_comp``; then channel by
    channel ``x_c = mean_c + exp(log_scale_c) * T * logit(u_val[c])`` quantised to the grid, where
    ``mean_c`` uses the already sampled (quantised) earlier channels. ``T == 0`` takes the argmax
    component and ``x_c = mean_c`` (quantised), ignoring the uniforms.

    Args:
        params: ``[b, P, h, w]`` raw network output.
        num_channels: C.
        num_mixtures: M.
        num_bins: grid levels N.
        u_comp: uniforms in (0, 1), ``[b, h, w]``.
        u_val: uniforms in (0, 1), ``[b, c, h, w]``.
        temperature: >= 0.

    Returns:
        float32 ``[b, c, h, w]`` on the grid (float64 for float64 params).
    """
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    b, _, h, w = params.shape
    if tuple(u_comp.shape) != (b, h, w) or tuple(u_val.shape) != (b, num_channels, h, w):
        raise ValueError(
            f"u_comp must be {(b, h, w)} and u_val {(b, num_channels, h, w)}, got "
            f"{tuple(u_comp.shape)} and {tuple(u_val.shape)}"
        )
    with torch.autocast(device_type=params.device.type, enabled=False):
        p = split_mixture_params(params, num_channels, num_mixtures)
        comp = categorical_sample(p.logits, u_comp, temperature)  # [b, h, w]
        mu = _gather_component(p.means, comp)  # [b, c, h, w]
        log_scale = _gather_component(p.log_scales, comp)  # [b, c, h, w]
        coeffs = _gather_component(p.coeffs, comp)  # [b, c(c-1)/2, h, w]
        eps = torch.finfo(mu.dtype).eps
        u = _upcast(u_val).to(mu.dtype).clamp(eps, 1.0 - eps)
        noise = torch.log(u) - torch.log1p(-u)  # standard logistic, [b, c, h, w]
        out: list[Tensor] = []
        for c in range(num_channels):
            value = _conditional_mean(mu, coeffs, out, c)
            if temperature > 0.0:
                value = value + torch.exp(log_scale[:, c]) * temperature * noise[:, c]
            out.append(from_bins(to_bins(value, num_bins), num_bins, dtype=mu.dtype))
        return torch.stack(out, dim=1)


def draw_mixture_noise(
    shape_bchw: tuple[int, int, int, int] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw float32 ``u_comp`` ``[b, h, w]`` then ``u_val`` ``[b, c, h, w]`` with ``torch.rand``.

    The uniforms are drawn on the generator's device (so a CPU generator gives the same numbers
    whatever ``device`` is) and then moved to ``device`` (default: the generator's device, or
    the default device without a generator).
    """
    b, c, h, w = shape_bchw
    draw_device = generator.device if generator is not None else device
    u_comp = torch.rand((b, h, w), generator=generator, device=draw_device, dtype=torch.float32)
    u_val = torch.rand((b, c, h, w), generator=generator, device=draw_device, dtype=torch.float32)
    if device is not None:
        u_comp, u_val = u_comp.to(device), u_val.to(device)
    return u_comp, u_val


class DiscretizedLogisticMixture(nn.Module):
    """Parameter-free head: log-likelihood and sampling for C channels and M mixtures."""

    def __init__(self, num_channels: int, num_mixtures: int, num_bins: int = 256) -> None:
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}")
        self.num_channels = num_channels
        self.num_mixtures = num_mixtures
        self.num_bins = num_bins
        self.num_params = num_mixture_params(num_channels, num_mixtures)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, num_mixtures={self.num_mixtures}, num_bins={self.num_bins}"

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """``x`` ``[b, c, h, w]`` on the grid, ``params`` ``[b, P, h, w]`` -> fp32 nats ``[b, c, h, w]``."""
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"x must be [b, {self.num_channels}, h, w], got {tuple(x.shape)}")
        return mixture_log_prob(x, params, self.num_mixtures, self.num_bins)

    def forward(self, x: Tensor, params: Tensor) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x, params)

    def sample(
        self,
        params: Tensor,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """Draw ``[b, c, h, w]`` grid values from ``[b, P, h, w]`` params."""
        b, _, h, w = params.shape
        u_comp, u_val = draw_mixture_noise(
            (b, self.num_channels, h, w), generator=generator, device=params.device
        )
        return mixture_sample(
            params, self.num_channels, self.num_mixtures, self.num_bins, u_comp, u_val, temperature
        )

    def mode(self, params: Tensor) -> Tensor:
        """The ``temperature = 0`` sample: argmax component, each channel at its (quantised) mean."""
        b, _, h, w = params.shape
        u_comp = torch.full((b, h, w), 0.5, device=params.device)
        u_val = torch.full((b, self.num_channels, h, w), 0.5, device=params.device)
        return mixture_sample(
            params, self.num_channels, self.num_mixtures, self.num_bins, u_comp, u_val, 0.0
        )
