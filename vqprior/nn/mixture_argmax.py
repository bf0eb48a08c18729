"""The most probable grid bin of a mixture of discretized logistics, exactly and cheaply.

Used by :func:`vqprior.nn.mixture.mixture_mode` (the ``T = 0`` sample of the mixture head).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["most_probable_bin"]

_MODE_CHUNK = 1 << 22  # elements of one [positions, m, bins] block


def _candidate_windows(mu: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Interior bins ``[lo, hi]`` (per row of ``mu`` ``[P, m]``) that can hold the mixture's mode.

    A component's interior bin mass ``F(x + d) - F(x - d)`` grows with the bin centre ``x`` while
    ``x`` is below its mean (and an edge bin holds at least that much), so an interior bin whose
    upper neighbour's centre is at most every component's mean is strictly beaten by that
    neighbour; likewise on the right. Only bins 0 and N-1 and the bins between the lowest and the
    highest component mean (plus one on each side) remain.
    """
    half = (num_bins - 1) / 2
    lo = torch.floor((mu.amin(1).clamp(-2.0, 2.0) + 1.0) * half) - 1
    hi = torch.ceil((mu.amax(1).clamp(-2.0, 2.0) + 1.0) * half) + 1
    return lo.clamp(1, num_bins - 2).long(), hi.clamp(1, num_bins - 2).long()


def _edge_cdf(edges: Tensor, w: Tensor, mu: Tensor, inv: Tensor, n: int) -> Tensor:
    """Mixture CDF at interior bin edges ``edges`` ``[P, K]`` (edge k, in ``[1, N - 1]``, lies
    between bins k - 1 and k) for float64 rows ``[P, m]`` -> ``[P, K]``."""
    x = (2 * edges - n).double() / (n - 1)
    cdf = torch.sigmoid((x[:, None] - mu[:, :, None]) * inv[:, :, None])  # [P, m, K]
    return (cdf * w[:, :, None]).sum(1)


def _threshold(w: Tensor, mu: Tensor, inv: Tensor, n: int) -> Tensor:
    """A lower bound ``L`` ``[P]`` on the largest bin mass: the mixture mass at each component's
    nearest bin and at both edge bins."""
    k = torch.round((mu.clamp(-2.0, 2.0) + 1.0) * ((n - 1) / 2)).clamp(0, n - 1).long()
    bins = torch.cat([torch.zeros_like(k[:, :1]), k, torch.full_like(k[:, :1], n - 1)], 1)
    upper = _edge_cdf((bins + 1).clamp(max=n - 1), w, mu, inv, n)
    lower = _edge_cdf(bins.clamp(min=1), w, mu, inv, n)
    upper = torch.where(bins == n - 1, w.sum(1, keepdim=True), upper)  # edge N is +inf
    lower = torch.where(bins == 0, 0.0, lower)  # edge 0 is -inf
    return (upper - lower).amax(1)


def _component_windows(
    w: Tensor, mu: Tensor, inv: Tensor, lo: Tensor, hi: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """Per component, the interior bins ``[lo_m, hi_m]`` ``[P, m]`` where it alone could lift a bin
    to the threshold ``L`` of :func:`_threshold`.

    A bin at distance ``D`` from ``mu_m`` has component mass ``<= (2d / s_m) exp(-D / s_m)`` (the
    logistic density is at most ``exp(-|z|) / s``). A bin beating ``L`` needs some component with
    ``w_m * mass_m >= L / M``, i.e. ``D <= R_m = s_m log(2 d M w_m / (s_m L))``. Windows are
    intersected with the dominance window ``[lo, hi]``; an empty one becomes ``[lo, lo]``.
    """
    d, half, m = 1.0 / (n - 1), (n - 1) / 2, mu.shape[1]
    limit = _threshold(w, mu, inv, n)[:, None] * (1.0 - 1e-9)  # slack for rounding
    reach = 2.0 * d * m * w * inv / limit
    radius = torch.where(reach > 1.0, torch.log(reach.clamp(min=1.0)) / inv, -1.0).clamp(max=4.0)
    centre = mu.clamp(-3.0, 3.0)
    c_lo = torch.maximum(torch.floor((centre - radius - d + 1.0) * half).long() - 1, lo[:, None])
    c_hi = torch.minimum(torch.ceil((centre + radius + d + 1.0) * half).long() + 1, hi[:, None])
    empty = (radius < 0) | (c_lo > c_hi)
    c_lo = torch.where(empty, lo[:, None], c_lo)
    return c_lo, torch.where(empty, lo[:, None], c_hi)


def _argmax_over_window(
    w: Tensor, mu: Tensor, inv: Tensor, start: Tensor, size: int, num_bins: int
) -> tuple[Tensor, Tensor]:
    """Most probable of the bins ``0``, ``start .. start + size - 1`` and ``N - 1`` per row, from
    float64 rows ``[P, m]`` of weights, means and inverse scales (mixture-CDF differences):
    returns its mass and its bin, each ``[P]``."""
    n, rows = num_bins, start.shape[0]
    span = start[:, None] + torch.arange(size + 1, device=start.device)  # edges e_start..
    one, last = start.new_ones(rows, 1), start.new_full((rows, 1), n - 1)
    edges = torch.cat([one, span, last], 1)  # edge k lies between bins k - 1 and k
    cdf = _edge_cdf(edges, w, mu, inv, n)  # [P, size + 3]
    total = w.sum(1, keepdim=True)
    mass = torch.cat([cdf[:, :1], cdf[:, 2:-1] - cdf[:, 1:-2], total - cdf[:, -1:]], 1)
    bins = torch.cat([one * 0, span[:, :-1], last], 1)  # 0, the window, N - 1: increasing
    best, at = mass.max(1, keepdim=True)
    return best.squeeze(1), bins.gather(1, at).squeeze(1)


def most_probable_bin(log_w: Tensor, mean: Tensor, log_scale: Tensor, num_bins: int) -> Tensor:
    """``argmax_v sum_m w_m mass_m(v)`` for log weights, means, log-scales ``[b, m, h, w]``.

    Exact, evaluating only bins that can win: the edge bins, and per component the bins of
    :func:`_component_windows` inside :func:`_candidate_windows`, one row per (position,
    component), rows grouped by window width (powers of two). Masses are differences of the
    float64 mixture CDF at bin edges; the largest mass is at least ``1/N``, far above the
    ``1e-16`` rounding of a difference, so the argmax is that of the exact masses except
    between bins whose masses agree to about ``1e-16`` (e.g. mirror-symmetric ties), which the
    rounding decides; equal computed masses go to the lowest bin. Returns long ``[b, h, w]``.
    """
    b, m, h, wd = mean.shape
    rows = "b m h w -> (b h w) m"
    w = rearrange(torch.softmax(log_w.double(), dim=1), rows)
    mu = rearrange(mean.double(), rows)
    inv = rearrange(torch.exp(-log_scale.double()), rows)
    if num_bins == 2:
        cdf0 = (torch.sigmoid(-mu * inv) * w).sum(1)
        return rearrange((w.sum(1) - cdf0 > cdf0).long(), "(b h w) -> b h w", b=b, h=h, w=wd)
    lo, hi = _candidate_windows(mu, num_bins)
    c_lo, c_hi = (t.flatten() for t in _component_windows(w, mu, inv, lo, hi, num_bins))
    owner = torch.arange(mu.shape[0], device=mu.device).repeat_interleave(m)  # row -> position
    masses = torch.zeros(owner.shape[0], dtype=torch.float64, device=mu.device)
    bins = torch.zeros_like(owner)
    interior, size = num_bins - 2, 1
    pending = torch.ones_like(owner, dtype=torch.bool)
    while bool(pending.any()):
        size = min(size, interior)
        fits = pending & (c_hi - c_lo < size) if size < interior else pending
        sel = fits.nonzero().squeeze(1)
        step = max(1, _MODE_CHUNK // (m * (size + 3)))
        for part in sel.split(step):
            start = c_lo[part].clamp(max=num_bins - 1 - size)
            pos = owner[part]
            masses[part], bins[part] = _argmax_over_window(
                w[pos], mu[pos], inv[pos], start, size, num_bins
            )
        pending[sel] = False
        size *= 2
    masses, bins = masses.view(-1, m), bins.view(-1, m)
    best = torch.where(masses == masses.amax(1, keepdim=True), bins, num_bins).amin(1)
    return rearrange(best, "(b h w) -> b h w", b=b, h=h, w=wd)
