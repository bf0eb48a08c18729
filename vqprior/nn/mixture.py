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
logistic tails, so the ``num_bins`` masses sum to one exactly (they telescope).

Log-scale floor. Log-scales are clamped to ``[log_scale_min(num_bins), LOG_SCALE_MAX]``. The
bin centred on the mean holds ``tanh(d / 2s) >= 1 - 2 exp(-d / s)`` of a component's mass, so
at ``s_min = d / log(2 / eps)`` (``eps = FLOOR_EPS = 1e-6``) the best bin already holds
``1 - eps``: a smaller scale gains under ``1e-6`` nats and only inflates gradients. For 256
bins ``log s_min = log(1/255) - log(log 2e6) = -8.216`` and ``1/s_min = 3700`` (PixelCNN++'s
-7 would cap a perfectly predicted interior value at -0.027 nats; the old floor -40 let
gradients reach 1e17). The gradients of a pixel's joint log-probability are then bounded for
any finite params, per parameter::

    |d/d logit_m| <= 1     |d/d mu_mc| <= 1/s_min     |d/d raw coeff| <= 1/s_min
    |d/d log_scale_mc| <= (|mean_mc - x_c| + d) / s_min + 2    (0 outside the clamp range)

with ``mean_mc`` the conditional mean (``|mean_mc - x_c| <= |mu_mc| + C``). The ceiling
``LOG_SCALE_MAX = 40`` only keeps ``exp(-log_scale)`` and ``2d/s`` normal floats; gradients are
bounded there anyway.

Temperature ``T`` (sampling): component weights ``softmax(logits / T)`` and every logistic
scale times ``T``. ``T = 0`` is the mode, taken greedily channel by channel: channel ``c`` is the
most probable bin of ``p(x_c | x_{<c})`` given the already chosen earlier channels (see
:func:`mixture_channel_log_probs`). This is not the limit ``T -> 0+`` (argmax component at its
quantised mean), which need not be a mode at all.

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

from vqprior.nn.categorical import check_truncation, inverse_cdf_rows
from vqprior.nn.grid import from_bins, to_bins
from vqprior.nn.mixture_argmax import most_probable_bin
from vqprior.nn.precision import constants, full_precision, upcast

__all__ = [
    "FLOOR_EPS",
    "LOG_SCALE_MAX",
    "DiscretizedLogisticMixture",
    "MixtureParams",
    "MixtureRows",
    "draw_mixture_noise",
    "log_scale_min",
    "mixture_channel_log_probs",
    "mixture_log_prob",
    "mixture_mode",
    "mixture_sample",
    "num_mixture_params",
    "split_mixture_params",
]

FLOOR_EPS = 1e-6
LOG_SCALE_MAX = 40.0


class MixtureParams(NamedTuple):
    """Split mixture parameters (fp32, or fp64 for fp64 input)."""

    logits: Tensor  # [b, m, h, w] unnormalised component log-weights
    means: Tensor  # [b, m, c, h, w] unconditional means mu
    log_scales: Tensor  # [b, m, c, h, w] clamped to [log_scale_min(num_bins), LOG_SCALE_MAX]
    coeffs: Tensor  # [b, m, c(c-1)/2, h, w] after tanh


def _pair_index(c: int, c_prev: int) -> int:
    """Index of the coefficient coupling channel ``c`` to an earlier channel ``c_prev``."""
    return c * (c - 1) // 2 + c_prev


def log_scale_min(num_bins: int) -> float:
    """Log-scale floor ``log(d / log(2 / FLOOR_EPS))``, ``d = 1 / (num_bins - 1)`` (module doc)."""
    if num_bins < 2:
        raise ValueError(f"num_bins must be at least 2, got {num_bins}")
    return math.log(1.0 / (num_bins - 1) / math.log(2.0 / FLOOR_EPS))


def num_mixture_params(num_channels: int, num_mixtures: int) -> int:
    """Network output channels ``M + 2 C M + M C (C - 1) / 2`` for C channels, M mixtures."""
    if num_channels < 1 or num_mixtures < 1:
        raise ValueError(
            f"num_channels and num_mixtures must be >= 1, got {num_channels}, {num_mixtures}"
        )
    c, m = num_channels, num_mixtures
    return m + 2 * c * m + m * c * (c - 1) // 2


def _infer_channels(num_params: int, num_mixtures: int) -> int:
    """The channel count C with ``num_mixture_params(C, M) == num_params``."""
    c = 1
    while num_mixture_params(c, num_mixtures) < num_params:
        c += 1
    if num_mixture_params(c, num_mixtures) != num_params:
        raise ValueError(f"{num_params} params fit no channel count for {num_mixtures} mixtures")
    return c


def _check_params(params: Tensor, c: int, m: int) -> int:
    """ValueError unless ``params`` is ``[b, P, h, w]`` for C channels and M mixtures; returns P."""
    expected = num_mixture_params(c, m)
    if params.dim() != 4 or params.shape[1] != expected:
        raise ValueError(
            f"params must have shape [b, {expected}, h, w] for {c} channels and {m} mixtures, "
            f"got {tuple(params.shape)}"
        )
    return expected


def split_mixture_params(
    params: Tensor, num_channels: int, num_mixtures: int, num_bins: int = 256
) -> MixtureParams:
    """Split ``[b, P, h, w]`` network output into :class:`MixtureParams` (see module doc)."""
    c, m = num_channels, num_mixtures
    expected = _check_params(params, c, m)
    with full_precision(params.device.type):
        p = upcast(params)
        logits, means, log_scales, raw = torch.split(
            p, [m, c * m, c * m, expected - m - 2 * c * m], 1
        )
        return MixtureParams(
            logits=logits,
            means=rearrange(means, "b (c m) h w -> b m c h w", c=c),
            log_scales=rearrange(log_scales, "b (c m) h w -> b m c h w", c=c).clamp(
                log_scale_min(num_bins), LOG_SCALE_MAX
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


def _log_bin_mass(idx: Tensor, mean: Tensor, log_scale: Tensor, num_bins: int) -> Tensor:
    """Log mass of grid bin ``idx`` under logistic(mean, exp(log_scale)), floor-clamped scale.

    With standardised edges ``a = (x + d - mean) / s`` and ``b = (x - d - mean) / s``:
    ``log(sigmoid(a) - sigmoid(b)) = logsigmoid(a) + logsigmoid(-b) + log(1 - exp(-2d/s))``; bin
    0 keeps only the first term, bin N-1 only the second. Two logsigmoids, one exp, one expm1
    and one log per element (``2d/s`` is computed directly: no cancellation for a far mean;
    ``log(-expm1(-t))`` is accurate to an ulp absolute for every ``t``, which a log-likelihood
    needs). ``idx`` broadcasts against ``mean``/``log_scale``.
    """
    n1 = num_bins - 1
    inv_scale = torch.exp(-log_scale)
    twice = 2 * idx - n1  # bin centre times (N - 1): exact integers
    a = ((twice + 1).to(mean.dtype) / n1 - mean) * inv_scale  # upper edge, standardised
    b = ((twice - 1).to(mean.dtype) / n1 - mean) * inv_scale  # lower edge, standardised
    lm = torch.where(idx == n1, 0.0, F.logsigmoid(a)) + torch.where(idx == 0, 0.0, F.logsigmoid(-b))
    width = torch.log(-torch.expm1(inv_scale * (-2.0 / n1)))  # log(1 - exp(-2d/s))
    return lm + torch.where((idx > 0) & (idx < n1), width, 0.0)


def _channel_log_weights(lm: Tensor, logits: Tensor) -> Tensor:
    """Log posterior component weights before each channel: ``log_softmax_m(logits +
    sum_{c' < c} lm[:, m, c'])`` for ``lm`` ``[b, m, c, h, w]`` -> ``[b, m, c, h, w]``."""
    before = torch.cat([torch.zeros_like(lm[:, :, :1]), lm[:, :, :-1].cumsum(dim=2)], dim=2)
    return torch.log_softmax(logits[:, :, None] + before, dim=1)


def _check_x(x: Tensor, params: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must have shape [b, c, h, w], got {tuple(x.shape)}")
    if params.shape[:1] + params.shape[2:] != x.shape[:1] + x.shape[2:]:
        raise ValueError(
            f"params {tuple(params.shape)} and x {tuple(x.shape)} differ in batch or grid size"
        )


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
    _check_x(x, params)
    num_channels = x.shape[1]
    # a channels-last map's per-component views are strided: the ~20 elementwise ops below and
    # their backward take 2x as long on them as on NCHW copies (which cost far less)
    x, params = x.contiguous(), params.contiguous()
    with full_precision(params.device.type):
        p = split_mixture_params(params, num_channels, num_mixtures, num_bins)
        idx = to_bins(x, num_bins)  # [b, c, h, w]
        xq = from_bins(idx, num_bins, dtype=p.means.dtype)
        x_prev = [xq[:, None, c] for c in range(num_channels)]  # each [b, 1, h, w]
        mean = p.means
        if num_channels > 1:
            mean = torch.stack(
                [_conditional_mean(p.means, p.coeffs, x_prev, c) for c in range(num_channels)], 2
            )  # [b, m, c, h, w]
        lm = _log_bin_mass(idx[:, None], mean, p.log_scales, num_bins)  # [b, m, c, h, w]
        # LSE_m(w + l) with w already normalised: no LSE(prior + l) - LSE(prior) cancellation.
        return torch.logsumexp(_channel_log_weights(lm, p.logits) + lm, dim=1)


def _earlier_channels(
    p: MixtureParams, x: Tensor | None, channel: int, num_bins: int
) -> tuple[Tensor, list[Tensor]]:
    """Log posterior component weights ``[b, m, h, w]`` given channels ``< channel`` of ``x``,
    and those channels' grid values, each ``[b, 1, h, w]``."""
    log_w = torch.log_softmax(p.logits, dim=1)
    if channel == 0:
        return log_w, []
    assert x is not None
    idx = to_bins(x[:, :channel], num_bins)  # [b, channel, h, w]
    xq = from_bins(idx, num_bins, dtype=p.means.dtype)
    x_prev = [xq[:, None, c] for c in range(channel)]
    mean = torch.stack([_conditional_mean(p.means, p.coeffs, x_prev, c) for c in range(channel)], 2)
    lm = _log_bin_mass(idx[:, None], mean, p.log_scales[:, :, :channel], num_bins)
    return torch.log_softmax(p.logits + lm.cumsum(dim=2)[:, :, -1], dim=1), x_prev


def mixture_channel_log_probs(
    params: Tensor, x: Tensor | None, channel: int, num_mixtures: int, num_bins: int = 256
) -> Tensor:
    """Exact, normalised ``log p(x_c = v | x_{<c})`` for every bin ``v`` of one channel ``c``.

    The conditional distribution of channel ``channel`` at each position given the values of the
    earlier channels of the same pixel (the component posterior given them, times each
    component's bin masses); ``logsumexp`` over dim 1 is 0 and entry ``v`` equals
    :func:`mixture_log_prob` at channel ``c`` for ``x_c`` = bin ``v``. For lossless coding and
    for the greedy mode.

    Args:
        params: ``[b, P, h, w]`` raw network output for ``C`` channels (inferred from ``P``).
        x: float ``[b, k, h, w]`` on the grid with ``k >= channel``; only channels ``< channel``
            are read (later ones may hold anything). May be None for ``channel == 0``.
        channel: ``c`` in ``[0, C)``.
        num_mixtures: M.
        num_bins: grid levels N.

    Returns:
        ``[b, num_bins, h, w]`` log-probabilities in nats (fp32; fp64 for fp64 params).
    """
    if params.dim() != 4:
        raise ValueError(f"params must have shape [b, P, h, w], got {tuple(params.shape)}")
    num_channels = _infer_channels(params.shape[1], num_mixtures)
    if not 0 <= channel < num_channels:
        raise ValueError(f"channel must lie in [0, {num_channels}), got {channel}")
    if channel and (x is None or x.dim() != 4 or x.shape[1] < channel):
        raise ValueError(f"x must be [b, >= {channel}, h, w] holding the earlier channels")
    if x is not None and channel:
        _check_x(x, params)
    with full_precision(params.device.type):
        p = split_mixture_params(params, num_channels, num_mixtures, num_bins)
        log_w, x_prev = _earlier_channels(p, x, channel, num_bins)
        mean = _conditional_mean(p.means, p.coeffs, x_prev, channel)  # [b, m, h, w]
        bins = torch.arange(num_bins, device=params.device).view(1, 1, num_bins, 1, 1)
        lm = _log_bin_mass(bins, mean[:, :, None], p.log_scales[:, :, channel, None], num_bins)
        return torch.logsumexp(log_w[:, :, None] + lm, dim=1)  # [b, N, h, w]


def mixture_mode(params: Tensor, num_channels: int, num_mixtures: int, num_bins: int) -> Tensor:
    """The greedy mode: channel by channel the most probable bin of ``p(x_c | x_{<c})`` given the
    earlier channels already chosen this way (the ``T = 0`` sample) -> ``[b, c, h, w]`` values."""
    with full_precision(params.device.type):
        p = split_mixture_params(params.detach(), num_channels, num_mixtures, num_bins)
        b, _, h, w = params.shape
        x = torch.zeros(b, num_channels, h, w, dtype=p.means.dtype, device=params.device)
        for c in range(num_channels):
            log_w, x_prev = _earlier_channels(p, x, c, num_bins)
            mean = _conditional_mean(p.means, p.coeffs, x_prev, c)
            idx = most_probable_bin(log_w, mean, p.log_scales[:, :, c], num_bins)
            x[:, c] = from_bins(idx, num_bins, dtype=x.dtype)
        return x


def mixture_sample(
    params: Tensor,
    num_channels: int,
    num_mixtures: int,
    num_bins: int,
    u_comp: Tensor,
    u_val: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Sample pixels on the grid, deterministically given pre-drawn uniforms.

    The component is the inverse CDF at ``u_comp`` of ``softmax(logits / T)``, truncated by
    ``top_k`` / ``top_p`` over the M components exactly as in
    :func:`~vqprior.nn.categorical.categorical_sample`; then channel by channel
    ``x_c = mean_c + exp(log_scale_c) * T * logit(u_val[c])`` quantised to the grid, where
    ``mean_c`` uses the already sampled (quantised) earlier channels. ``T == 0`` is the greedy
    mode (:func:`mixture_mode`): it ignores the uniforms and the truncation.

    Args:
        params: ``[b, P, h, w]`` raw network output.
        num_channels: C.
        num_mixtures: M.
        num_bins: grid levels N.
        u_comp: uniforms in (0, 1), ``[b, h, w]``.
        u_val: uniforms in (0, 1), ``[b, c, h, w]``.
        temperature: >= 0.
        top_k: keep the k most probable components (None: all).
        top_p: keep the smallest set of most probable components with mass >= p (None: all).

    Returns:
        float32 ``[b, c, h, w]`` on the grid (float64 for float64 params).
    """
    check_truncation(top_k, top_p)
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    b, _, h, w = params.shape
    if tuple(u_comp.shape) != (b, h, w) or tuple(u_val.shape) != (b, num_channels, h, w):
        raise ValueError(
            f"u_comp must be {(b, h, w)} and u_val {(b, num_channels, h, w)}, got "
            f"{tuple(u_comp.shape)} and {tuple(u_val.shape)}"
        )
    if temperature == 0.0:
        return mixture_mode(params, num_channels, num_mixtures, num_bins)
    expected = _check_params(params, num_channels, num_mixtures)
    with full_precision(params.device.type):
        # one row per pixel, [R, P] (a sampler's step is R = b): the same maths whatever the
        # image size, in a handful of ops on rows
        rows = upcast(params).movedim(1, -1).reshape(-1, expected)
        noise = logistic_noise(u_val.movedim(1, -1).reshape(-1, num_channels), rows.dtype)
        draw = MixtureRows(
            num_channels, num_mixtures, num_bins, rows.dtype, rows.device, temperature, top_k, top_p
        )
        out = draw(rows, u_comp.reshape(-1), noise)
        return out.view(b, h, w, num_channels).movedim(-1, 1)


def logistic_noise(u: Tensor, dtype: torch.dtype) -> Tensor:
    """Standard logistic noise ``log(u) - log1p(-u)`` from uniforms in (0, 1), in ``dtype``
    (float32 or float64); ``u`` is clamped one ulp inside (0, 1) so the noise stays finite."""
    eps = torch.finfo(dtype).eps
    u = upcast(u).to(dtype).clamp(eps, 1.0 - eps)
    return torch.log(u) - torch.log1p(-u)


class MixtureRows:
    """:func:`mixture_sample` on rows (``temperature > 0``), set up once per sampler: called
    with ``rows`` ``[R, P]`` float32/64 parameters, ``u_comp`` ``[R]`` uniforms and ``noise``
    ``[R, C]`` standard logistic noise (:func:`logistic_noise`; a sampler computes it once per
    image) -> ``[R, C]`` on the grid. A sampler's step calls it on one element's ``[n, P]``, so
    what does not depend on the element (the checks, the constants, the columns of the picked
    component's parameters) is done here, once, and a call is a few ops."""

    def __init__(
        self,
        num_channels: int,
        num_mixtures: int,
        num_bins: int,
        dtype: torch.dtype,
        device: torch.device,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> None:
        check_truncation(top_k, top_p)
        if not temperature > 0.0:
            raise ValueError(f"MixtureRows samples at temperature > 0, got {temperature}")
        c, m = num_channels, num_mixtures
        self.c, self.m, self.temperature, self.trunc = c, m, temperature, (top_k, top_p)
        # rows[:, m + j m + comp] is parameter j of component comp; the picked component's, in
        # one gather: means, log-scales, then the coefficients ordered by the earlier channel
        # they weigh (a channel's bin then reaches every later channel in one op)
        by_earlier = [_pair_index(ch, e) for e in range(c) for ch in range(e + 1, c)]
        params = [*range(2 * c), *(2 * c + i for i in by_earlier)]
        self.columns = torch.tensor([m + j * m for j in params], device=device)
        top = float(num_bins - 1)
        self._works: dict[tuple[int, torch.dtype, torch.device], _MixtureWork] = {}
        # 0-dim tensors, not Python numbers (the same values: each number would be wrapped in a
        # new tensor per op, ~1 us, and a step makes ~12 such ops a pixel)
        self.k, self.top, self.neg_top, self.zero, self.one, self.two, self.lo, self.hi = constants(
            (top / 2.0, top, -top, 0.0, 1.0, 2.0, log_scale_min(num_bins), LOG_SCALE_MAX),
            dtype,
            device,
        )

    def __call__(self, rows: Tensor, u_comp: Tensor, noise: Tensor) -> Tensor:
        if rows.requires_grad:  # a draw has no gradient, and it writes into its buffers
            rows = rows.detach()
        comp = inverse_cdf_rows(rows[:, : self.m], u_comp, self.temperature, *self.trunc)
        w = self._work(rows)
        torch.gather(rows, 1, self.columns + comp, out=w.picked)  # [R, 2C + K]
        scale = torch.clamp(w.log_scale, self.lo, self.hi, out=w.scale).exp_()
        if self.temperature != 1.0:
            scale.mul_(self.temperature)
        # Channel by channel in bin units y = (x + 1) k, k = (N - 1) / 2: x_c = mean_c + scale_c
        # T noise_c + sum_e coeff_ce x_e becomes y_c = (mean_c + scale_c T noise_c + 1) k
        # + sum_e coeff_ce (bin_e - k), since x_e k = bin_e - k exactly for a grid value x_e;
        # the bin is round(y_c) clamped to the grid, computed in place in y's column.
        torch.addcmul(w.mean, scale, noise, out=w.y).add_(self.one).mul_(self.k)
        torch.tanh(w.coeff_params, out=w.coeffs)
        for v, reach in w.channels:
            v.round_().clamp_(self.zero, self.top)
            if reach is not None:  # the channels this bin reaches (ch + 1 ..), its coefficients
                later, coeffs = reach
                later.addcmul_(coeffs, torch.sub(v, self.k, out=w.centred))
        # (2 bin - (N - 1)) / (N - 1): exact numerator, correctly rounded value (as from_bins)
        return torch.addcmul(self.neg_top, w.y, self.two).div_(self.top)

    def _work(self, rows: Tensor) -> _MixtureWork:
        """Buffers for ``R`` rows and their views, made at the first call with ``R`` (a view or
        a new tensor costs about a microsecond, and a step makes ~20)."""
        key = (rows.shape[0], rows.dtype, rows.device)
        if key not in self._works:
            self._works[key] = _MixtureWork(rows.shape[0], self.c, self.columns.numel(), rows)
        return self._works[key]


class _MixtureWork:
    """:class:`MixtureRows`'s buffers for ``r`` rows: the picked component's parameters
    ``[r, 2C + K]``, the scales, ``y [r, C]``, the coefficients ``[r, K]``, and per channel
    the views: its column of ``y`` and (None for the last) the later columns with the
    coefficients that reach them."""

    def __init__(self, r: int, c: int, picked: int, like: Tensor) -> None:
        self.picked = like.new_empty(r, picked)
        self.mean, self.log_scale = self.picked[:, :c], self.picked[:, c : 2 * c]
        self.coeff_params = self.picked[:, 2 * c :]
        self.scale, self.y = like.new_empty(r, c), like.new_empty(r, c)
        self.coeffs = like.new_empty(r, picked - 2 * c)
        self.centred = like.new_empty(r, 1)
        self.channels: list[tuple[Tensor, tuple[Tensor, Tensor] | None]] = []
        at = 0
        for ch in range(c):
            later = c - 1 - ch
            reach = (self.y[:, ch + 1 :], self.coeffs[:, at : at + later]) if later else None
            self.channels.append((self.y[:, ch : ch + 1], reach))
            at += later


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
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> Tensor:
        """Draw ``[b, c, h, w]`` grid values from ``[b, P, h, w]`` params (see mixture_sample)."""
        b, _, h, w = params.shape
        u_comp, u_val = draw_mixture_noise(
            (b, self.num_channels, h, w), generator=generator, device=params.device
        )
        return mixture_sample(
            params,
            self.num_channels,
            self.num_mixtures,
            self.num_bins,
            u_comp,
            u_val,
            temperature,
            top_k,
            top_p,
        )

    def mode(self, params: Tensor) -> Tensor:
        """The ``temperature = 0`` sample: the greedy channel-by-channel mode."""
        return mixture_mode(params, self.num_channels, self.num_mixtures, self.num_bins)
