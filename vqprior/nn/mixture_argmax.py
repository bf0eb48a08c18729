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


def _argmax_over_window(
    w: Tensor, mu: Tensor, inv: Tensor, start: Tensor, size: int, num_bins: int
) -> Tensor:
    """Most probable of the bins ``0``, ``start .. start + size - 1`` and ``N - 1`` per row, from
    float64 rows ``[P, m]`` of weights, means and inverse scales (mixture-CDF differences)."""
    n, rows = num_bins, start.shape[0]
    span = start[:, None] + torch.arange(size + 1, device=start.device)  # edges e_start..
    one, last = start.new_ones(rows, 1), start.new_full((rows, 1), n - 1)
    edges = torch.cat([one, span, last], 1)  # edge k lies between bins k - 1 and k
    x = (2 * edges - n).double() / (n - 1)  # [P, size + 3]
    cdf = (torch.sigmoid((x[:, None] - mu[:, :, None]) * inv[:, :, None]) * w[:, :, None]).sum(1)
    total = w.sum(1, keepdim=True)
    mass = torch.cat([cdf[:, :1], cdf[:, 2:-1] - cdf[:, 1:-2], total - cdf[:, -1:]], 1)
    bins = torch.cat([one * 0, span[:, :-1], last], 1)  # 0, the window, N - 1: increasing
    return bins.gather(1, mass.argmax(1, keepdim=True)).squeeze(1)


def most_probable_bin(log_w: Tensor, mean: Tensor, log_scale: Tensor, num_bins: int) -> Tensor:
    """``argmax_v sum_m w_m mass_m(v)`` for log weights, means, log-scales ``[b, m, h, w]``.

    Only the candidate bins of :func:`_candidate_windows` are evaluated, positions grouped by
    window width (powers of two). The masses are differences of the float64 mixture CDF at
    the bin edges; the largest mass is at least ``1/N``, far above the ``1e-16`` rounding of a
    difference, so the argmax is that of the exact masses up to ties, which go to the lowest
    bin. Returns long ``[b, h, w]``.
    """
    b, _, h, wd = mean.shape
    rows = "b m h w -> (b h w) m"
    w = rearrange(torch.softmax(log_w.double(), dim=1), rows)
    mu = rearrange(mean.double(), rows)
    inv = rearrange(torch.exp(-log_scale.double()), rows)
    best = torch.zeros(mu.shape[0], dtype=torch.long, device=mu.device)
    if num_bins == 2:
        cdf0 = (torch.sigmoid(-mu * inv) * w).sum(1)
        return rearrange((w.sum(1) - cdf0 > cdf0).long(), "(b h w) -> b h w", b=b, h=h, w=wd)
    lo, hi = _candidate_windows(mu, num_bins)
    interior, size = num_bins - 2, 1
    pending = torch.ones_like(best, dtype=torch.bool)
    while bool(pending.any()):
        size = min(size, interior)
        fits = pending & (hi - lo < size) if size < interior else pending
        sel = fits.nonzero().squeeze(1)
        step = max(1, _MODE_CHUNK // (mu.shape[1] * (size + 3)))
        for part in sel.split(step):
            start = lo[part].clamp(max=num_bins - 1 - size)
            best[part] = _argmax_over_window(w[part], mu[part], inv[part], start, size, num_bins)
        pending[sel] = False
        size *= 2
    return rearrange(best, "(b h w) -> b h w", b=b, h=h, w=wd)
