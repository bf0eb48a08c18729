"""Discretized logistic mixture and grid: normalisation, brute force, extremes, sampling fit."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from vqprior.nn.grid import from_bins, snap_to_grid, to_bins
from vqprior.nn.mixture import (
    FLOOR_EPS,
    LOG_SCALE_MAX,
    DiscretizedLogisticMixture,
    MixtureRows,
    draw_mixture_noise,
    log_scale_min,
    logistic_noise,
    mixture_channel_log_probs,
    mixture_log_prob,
    mixture_mode,
    mixture_sample,
    num_mixture_params,
    split_mixture_params,
)

# ----------------------------------------------------------------------------- helpers


def chi2_quantile(p: float, dof: int) -> float:
    """Upper quantile of chi-square: scipy when importable, else Wilson-Hilferty."""
    try:
        from scipy.stats import chi2  # type: ignore[import-untyped]

        return float(chi2.ppf(p, dof))
    except ImportError:
        z = {0.999: 3.090232306167813, 0.99: 2.3263478740408408}[p]
        k = float(dof)
        return k * (1.0 - 2.0 / (9.0 * k) + z * math.sqrt(2.0 / (9.0 * k))) ** 3


def chi2_statistic(counts: Tensor, probs: Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson chi-square of counts vs probs; cells expected below ``min_expected`` are pooled."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    assert abs(float(probs.sum()) - 1.0) < 1e-6
    expected = probs * counts.sum()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    assert torch.all(obs[~keep] == 0), "a sample fell in a zero-probability cell"
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(obs.numel()) - 1


def assert_fits(counts: Tensor, probs: Tensor) -> None:
    stat, dof = chi2_statistic(counts, probs)
    assert stat < chi2_quantile(0.999, dof), f"chi2 {stat:.1f} with {dof} dof"


def random_params(
    b: int,
    c: int,
    m: int,
    h: int,
    w: int,
    *,
    log_scale: tuple[float, float] = (-6.0, 3.0),
    mean: tuple[float, float] = (-1.5, 1.5),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Tensor:
    """Raw params [b, P, h, w] with log-scales and means uniform in the given ranges."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(b, num_mixture_params(c, m), h, w, generator=g, dtype=torch.float64)
    lo, hi = mean
    p[:, m : m + c * m] = lo + (hi - lo) * torch.rand(b, c * m, h, w, generator=g, dtype=p.dtype)
    lo, hi = log_scale
    p[:, m + c * m : m + 2 * c * m] = lo + (hi - lo) * torch.rand(
        b, c * m, h, w, generator=g, dtype=p.dtype
    )
    return p.to(dtype)


def all_values(c: int, n: int) -> Tensor:
    """Every joint bin index of c channels, [n**c, c], channel 0 most significant."""
    grids = torch.meshgrid(*[torch.arange(n)] * c, indexing="ij")
    return torch.stack([g.flatten() for g in grids], dim=1)


def enumerate_log_prob(params: Tensor, c: int, m: int, n: int) -> Tensor:
    """lp for every joint value at every pixel of params [1, P, h, w] -> [n**c, c, h, w]."""
    idx = all_values(c, n)
    _, p, h, w = params.shape
    x = from_bins(idx, n, dtype=params.dtype)[:, :, None, None].expand(-1, -1, h, w)
    return mixture_log_prob(x, params.expand(idx.shape[0], -1, -1, -1), m, n)


def reference_log_prob(x: Tensor, params: Tensor, c: int, m: int, n: int) -> Tensor:
    """Independent float64 brute force: explicit loops, direct sigmoid differences."""
    pr, x = params.double(), x.double()
    half = 1.0 / (n - 1)
    logits = pr[:, :m]
    pi = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)  # [b, m, h, w]
    pair: dict[tuple[int, int], int] = {}
    for ci in range(c):
        for cj in range(ci):
            pair[(ci, cj)] = len(pair)
    joint = []  # joint[ci] = sum_m pi_m prod_{c' <= ci} mass
    prod = [torch.ones_like(x[:, 0]) for _ in range(m)]
    for ci in range(c):
        total = torch.zeros_like(x[:, 0])
        for mi in range(m):
            mu = pr[:, m + ci * m + mi]
            for cj in range(ci):
                raw = pr[:, m + 2 * c * m + pair[(ci, cj)] * m + mi]
                mu = mu + torch.tanh(raw) * x[:, cj]
            s = torch.exp(pr[:, m + c * m + ci * m + mi].clamp(log_scale_min(n), LOG_SCALE_MAX))
            xc = x[:, ci]
            up, lo = (xc + half - mu) / s, (xc - half - mu) / s
            cdf_up = torch.where(xc > 1 - half, torch.ones_like(up), torch.sigmoid(up))
            cdf_lo = torch.where(xc < -1 + half, torch.zeros_like(lo), torch.sigmoid(lo))
            sf_up = torch.where(xc > 1 - half, torch.zeros_like(up), torch.sigmoid(-up))
            sf_lo = torch.where(xc < -1 + half, torch.ones_like(lo), torch.sigmoid(-lo))
            # Take the difference on the tail side so it does not cancel to zero.
            mass = torch.where(xc > mu, sf_lo - sf_up, cdf_up - cdf_lo)
            prod[mi] = prod[mi] * mass
            total = total + pi[:, mi] * prod[mi]
        joint.append(torch.log(total))
    lp = [joint[0]] + [joint[i] - joint[i - 1] for i in range(1, c)]
    return torch.stack(lp, dim=1)


# ----------------------------------------------------------------------------- grid


def test_grid_round_trip_and_8bit_mapping() -> None:
    for n in (2, 8, 16, 256):
        idx = torch.arange(n)
        assert torch.equal(to_bins(from_bins(idx, n), n), idx)
        assert torch.equal(to_bins(from_bins(idx, n, torch.float64), n), idx)
    v = torch.arange(256)
    assert torch.allclose(from_bins(v, 256, torch.float64), 2 * v.double() / 255 - 1, atol=1e-15)
    assert from_bins(torch.tensor([0, 255]), 256).tolist() == [-1.0, 1.0]
    # torchvision ToTensor output u = v / 255 maps as 2u - 1; bf16 keeps the 256 levels apart.
    assert torch.equal(to_bins((v.float() / 255) * 2 - 1, 256), v)
    assert torch.equal(to_bins(from_bins(v, 256).bfloat16(), 256), v)


def test_grid_rounds_to_nearest_and_clamps() -> None:
    n = 5  # levels -1, -0.5, 0, 0.5, 1
    x = torch.tensor([-3.0, -1.0, -0.74, -0.76, 0.2, 0.26, 0.99, 7.0])
    assert to_bins(x, n).tolist() == [0, 0, 1, 0, 2, 3, 4, 4]
    assert to_bins(x, n).dtype == torch.long
    with pytest.raises(ValueError):
        to_bins(x, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 5, 16, 256])
def test_snap_to_grid_equals_the_integer_route(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.cat(
        [
            torch.randn(20000, generator=g, dtype=dtype) * 1.5,
            torch.linspace(-1.2, 1.2, 9999, dtype=dtype),
        ]
    )
    halfway = (torch.arange(n - 1, dtype=dtype) + 0.5) * (2.0 / (n - 1)) - 1.0  # ties
    x = torch.cat([x, halfway, from_bins(torch.arange(n), n, dtype)])
    got = snap_to_grid(x, n)
    assert got.dtype == dtype
    assert torch.equal(got, from_bins(to_bins(x, n), n, dtype))
    with pytest.raises(ValueError):
        snap_to_grid(x.half(), n)


# ----------------------------------------------------------------------------- layout


def test_num_mixture_params() -> None:
    assert num_mixture_params(3, 10) == 100  # PixelCNN++'s 10 * 10
    assert num_mixture_params(1, 5) == 15
    assert num_mixture_params(4, 2) == 2 + 16 + 12
    with pytest.raises(ValueError):
        num_mixture_params(0, 3)


def test_split_layout() -> None:
    c, m = 3, 2
    p = num_mixture_params(c, m)
    params = torch.arange(p, dtype=torch.float32).view(1, p, 1, 1) / 100
    out = split_mixture_params(params, c, m)
    assert out.logits.shape == (1, m, 1, 1)
    assert out.means.shape == out.log_scales.shape == (1, m, c, 1, 1)
    assert out.coeffs.shape == (1, m, 3, 1, 1)
    for mi in range(m):
        assert out.logits[0, mi, 0, 0] == params[0, mi, 0, 0]
        for ci in range(c):
            assert out.means[0, mi, ci, 0, 0] == params[0, m + ci * m + mi, 0, 0]
            assert out.log_scales[0, mi, ci, 0, 0] == params[0, m + c * m + ci * m + mi, 0, 0]
        for k in range(3):
            raw = params[0, m + 2 * c * m + k * m + mi, 0, 0]
            assert torch.allclose(out.coeffs[0, mi, k, 0, 0], torch.tanh(raw))
    big = torch.full((1, p, 1, 1), 100.0)
    assert split_mixture_params(big, c, m).log_scales.max() == LOG_SCALE_MAX == 40.0
    assert split_mixture_params(-big, c, m).log_scales.min() == pytest.approx(log_scale_min(256))
    floor16 = split_mixture_params(-big, c, m, num_bins=16).log_scales.min()
    assert floor16 == pytest.approx(log_scale_min(16))
    with pytest.raises(ValueError):
        split_mixture_params(torch.zeros(1, p + 1, 1, 1), c, m)


# ----------------------------------------------------------------------------- likelihood


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_normalises_one_channel(dtype: torch.dtype, tol: float) -> None:
    m, n = 5, 256
    params = random_params(1, 1, m, 3, 4, dtype=dtype)
    lp = enumerate_log_prob(params, 1, m, n)  # [256, 1, 3, 4]
    assert lp.dtype == dtype
    total = lp.exp().sum(dim=0)
    assert torch.allclose(total, torch.ones_like(total), atol=tol, rtol=0), total


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_normalises_three_channels_joint_and_conditionals(dtype: torch.dtype, tol: float) -> None:
    c, m, n = 3, 4, 8
    params = random_params(1, c, m, 2, 3, dtype=dtype, seed=1)
    params[:, m + 2 * c * m :] *= 3  # strong channel coupling
    lp = enumerate_log_prob(params, c, m, n).view(n, n, n, c, 2, 3)
    joint = lp.sum(dim=3).exp().sum(dim=(0, 1, 2))
    assert torch.allclose(joint, torch.ones_like(joint), atol=tol, rtol=0)
    # Each conditional p(x_c | x_<c) sums to one over x_c, for every fixed earlier channel.
    for ci in range(c):
        cond = lp[..., ci, :, :].exp().sum(dim=ci)
        assert torch.allclose(cond, torch.ones_like(cond), atol=tol, rtol=0), ci
    # lp[c] does not depend on later channels of the same pixel.
    assert torch.equal(lp[..., 0, :, :], lp[:, :1, :1, 0].expand_as(lp[..., 0, :, :]))
    assert torch.equal(lp[..., 1, :, :], lp[:, :, :1, 1].expand_as(lp[..., 1, :, :]))


def test_matches_float64_brute_force() -> None:
    c, m, n = 3, 4, 256
    params = random_params(6, c, m, 3, 3, log_scale=(-3.0, 1.0), mean=(-1.2, 1.2), seed=2)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, n, (6, c, 3, 3), generator=g)
    idx[0, :, 0, 0] = 0
    idx[1, :, 0, 0] = n - 1  # both edges in every channel
    x = from_bins(idx, n, torch.float64)
    ref = reference_log_prob(x, params, c, m, n)
    assert torch.isfinite(ref).all()
    got64 = mixture_log_prob(x, params.double(), m, n)
    assert torch.allclose(got64, ref, rtol=1e-9, atol=1e-9)
    got32 = mixture_log_prob(x.float(), params.float(), m, n)
    assert got32.dtype == torch.float32
    assert torch.allclose(got32.double(), ref, rtol=1e-5, atol=2e-4)


def test_gradients_match_finite_differences() -> None:
    c, m, n = 3, 2, 16
    params = random_params(2, c, m, 2, 2, log_scale=(-2.0, 0.5), seed=4).double()
    idx = torch.randint(0, n, (2, c, 2, 2), generator=torch.Generator().manual_seed(5))
    idx[0, 0, 0, 0], idx[0, 1, 0, 1] = 0, n - 1
    x = from_bins(idx, n, torch.float64)
    params.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p: mixture_log_prob(x, p, m, n), (params,), fast_mode=True
    )


def extreme_case(
    log_scales: Sequence[float] = (-20.0, -7.0, 0.0, 7.0, 20.0),
    means: Sequence[float] = (-50.0, -1.0, 0.0, 0.5, 50.0),
) -> tuple[Tensor, Tensor, int]:
    """Params and targets over all combos of extreme log-scales, means and edge targets."""
    c, m = 3, 2
    combos = list(itertools.product(log_scales, means, [0, 77, 255]))
    w = len(combos)
    params = torch.zeros(1, num_mixture_params(c, m), 1, w)
    idx = torch.zeros(1, c, 1, w, dtype=torch.long)
    for j, (ls, mu, target) in enumerate(combos):
        for ci in range(c):
            idx[0, ci, 0, j] = [target, 255 - target, 128][ci]
            for mi in range(m):
                sign = 1.0 if (ci + mi) % 2 == 0 else -1.0
                params[0, m + ci * m + mi, 0, j] = sign * mu
                params[0, m + c * m + ci * m + mi, 0, j] = ls if mi == 0 else -ls
    params[0, :m] = torch.tensor([3.0, -2.0])[:, None, None]
    params[0, m + 2 * c * m :] = 3.0 * torch.tensor([1.0, -1.0] * 3)[:, None, None]
    return params, from_bins(idx, 256), m


def gradient_bounds(params: Tensor, c: int, m: int, n: int) -> Tensor:
    """Per-parameter bounds on |d sum(lp) / d params| from the module docstring."""
    inv, d = math.exp(-log_scale_min(n)), 1.0 / (n - 1)
    bound = torch.ones_like(params, dtype=torch.float64)  # logits: <= 1
    bound[:, m : m + c * m] = inv  # means
    mu = params[:, m : m + c * m].double().abs()
    bound[:, m + c * m : m + 2 * c * m] = (mu + c + d) * inv + 2  # log-scales
    bound[:, m + 2 * c * m :] = inv  # coefficients
    return bound


EXTREME_LOG_SCALES = (-60.0, -20.0, -9.0, -8.2, -7.0, -3.0, 0.0, 7.0, 20.0, 45.0)
EXTREME_MEANS = (-1e3, -50.0, -1.5, -1.0, 0.0, 0.4, 1.0, 50.0, 1e3)


@pytest.mark.parametrize("bf16", [False, True])
def test_gradients_bounded_at_extremes(bf16: bool) -> None:
    """|grad| <= the documented per-parameter bound (1, 1/s_min = 3700, (|mu| + C + d)/s_min + 2)
    at log-scales far below and above the clamp range and means far outside the grid."""
    params, x, m = extreme_case(EXTREME_LOG_SCALES, EXTREME_MEANS)
    c = 3
    leaf = (params.bfloat16() if bf16 else params).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        lp = mixture_log_prob(x.to(leaf.dtype), leaf, m)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    lp.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    bound = gradient_bounds(leaf.detach(), c, m, 256)
    excess = leaf.grad.double().abs() / bound
    assert excess.max() <= 1.01, f"gradient {excess.max():.3f} x its bound"
    assert math.exp(-log_scale_min(256)) == pytest.approx(3700, rel=1e-3)
    # The old floor (-40) let the mean gradient reach ~e^40; now it stays at most 1/s_min.
    assert leaf.grad[:, m : m + c * m].abs().max() <= 3700 * 1.01
    # One component, far mean, log-scale below the floor: the mean bound is attained.
    one = torch.tensor([0.0, 50.0, -20.0]).view(1, 3, 1, 1).requires_grad_(True)
    mixture_log_prob(torch.full((1, 1, 1, 1), -1.0), one, 1).sum().backward()
    assert one.grad is not None
    assert one.grad[0, 1].item() == pytest.approx(-3700, rel=1e-3)
    assert one.grad[0, 2].item() == 0.0  # below the floor: the clamp passes no gradient


def test_extreme_params_finite_fp32() -> None:
    params, x, m = extreme_case()
    params.requires_grad_(True)
    lp = mixture_log_prob(x, params, m)
    assert torch.isfinite(lp).all()
    assert (lp <= 1e-6).all()
    (-lp.sum()).backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()
    assert params.grad.abs().sum() > 0


def test_extreme_params_finite_bf16_autocast() -> None:
    params, x, m = extreme_case()
    p16 = params.bfloat16().requires_grad_(True)
    x16 = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = mixture_log_prob(x16, p16, m)
    assert lp.dtype == torch.float32
    assert torch.isfinite(lp).all()
    (-lp.sum()).backward()
    assert p16.grad is not None and torch.isfinite(p16.grad).all()
    # Inside, the math is plain fp32 on the upcast inputs.
    assert torch.equal(lp, mixture_log_prob(x16.float(), p16.detach().float(), m))


def test_extreme_params_match_asymptotics() -> None:
    """One channel, one component: closed forms of the tails for tiny and huge scales."""
    n, d = 256, 1.0 / 255
    inv = 1.0 / math.exp(log_scale_min(n))  # -20 clamps to the floor
    cases = [  # (log_scale, mean, bin, expected lp)
        (-20.0, 50.0, 0, (-1 + d - 50) * inv),  # lower tail, far: ~ a
        (-20.0, 50.0, 255, 0.0),  # upper edge holds all the mass
        (-20.0, -50.0, 255, -(1 - d + 50) * inv),  # upper tail, far: ~ -b
        (-20.0, -50.0, 128, -(0 + 50) * inv),  # interior, lower edge of bin 128 is 0
        (-20.0, 50.0, 127, (0 - 50) * inv),  # interior, upper edge of bin 127 is 0
        (-20.0, 1 / 255, 128, math.log((2 / FLOOR_EPS - 1) / (2 / FLOOR_EPS + 1))),  # the floor
        (-20.0, 0.0, 128, math.log(0.5)),  # mean exactly on the bin edge
        (20.0, 0.0, 128, math.log(d / 2) - 20.0),  # huge scale: mass ~ 2d * pdf(0)
        (20.0, 50.0, 0, math.log(0.5)),  # huge scale: half the mass below -1
    ]
    p = torch.tensor([[0.0, mu, ls] for ls, mu, _, _ in cases]).view(-1, 3, 1, 1)
    x = from_bins(torch.tensor([b for _, _, b, _ in cases]), n).view(-1, 1, 1, 1)
    lp = mixture_log_prob(x, p, 1, n).flatten().double()
    want = torch.tensor([e for *_, e in cases], dtype=torch.float64)
    assert torch.allclose(lp, want, rtol=1e-5, atol=1e-5), (lp, want)


def test_log_scale_floor_is_where_nothing_is_gained() -> None:
    """At the floor the bin centred on the mean holds 1 - FLOOR_EPS; below it values are equal."""
    for n in (2, 16, 256, 1024):
        s_min, d = math.exp(log_scale_min(n)), 1.0 / (n - 1)
        assert math.tanh(d / (2 * s_min)) >= 1 - FLOOR_EPS
        assert math.tanh(d / (2 * s_min * 1.5)) < 1 - FLOOR_EPS  # a larger floor would lose more
    assert log_scale_min(256) == pytest.approx(-8.216, abs=1e-3)
    assert math.tanh((1 / 255) / (2 * math.exp(-7.0))) < 0.98  # PixelCNN++'s -7 costs 0.027 nats
    params, x, m = extreme_case()
    ls = slice(m + 3 * m, m + 6 * m)  # the log-scales of 3 channels
    lower = params.clone()
    lower[:, ls] = lower[:, ls].clamp(max=log_scale_min(256))
    deeper = lower.clone()
    deeper[:, ls] -= 30.0
    assert torch.equal(mixture_log_prob(x, lower, m), mixture_log_prob(x, deeper, m))
    with pytest.raises(ValueError):
        log_scale_min(1)


def test_off_grid_inputs_snap_and_bad_shapes_raise() -> None:
    c, m, n = 3, 2, 256
    params = random_params(2, c, m, 2, 2, seed=6)
    idx = torch.randint(0, n, (2, c, 2, 2), generator=torch.Generator().manual_seed(7))
    x = from_bins(idx, n)
    jitter = (torch.rand(x.shape, generator=torch.Generator().manual_seed(8)) - 0.5) * 0.6 / 255
    assert torch.equal(mixture_log_prob(x + jitter, params, m), mixture_log_prob(x, params, m))
    with pytest.raises(ValueError):
        mixture_log_prob(x[:, :2], params, m)
    with pytest.raises(ValueError):
        mixture_log_prob(x[:1], params, m)


# ----------------------------------------------------------------------------- sampling


def fixed_one_channel_params() -> Tensor:
    logits = [0.5, -0.3, 0.1]
    means = [-0.6, 0.1, 0.7]
    log_scales = [-1.5, -2.5, -1.0]
    return torch.tensor(logits + means + log_scales, dtype=torch.float64).view(1, 9, 1, 1)


def fixed_three_channel_params() -> Tensor:
    c, m = 3, 2
    p = torch.zeros(1, num_mixture_params(c, m), 1, 1, dtype=torch.float64)
    p[0, :, 0, 0] = torch.tensor(
        [0.3, -0.2]  # logits
        + [-0.4, 0.5, 0.2, -0.3, 0.0, 0.1]  # means (c m)
        + [-1.0, -0.7, -1.3, -0.8, -0.9, -1.2]  # log-scales (c m)
        + [1.0, -0.8, 0.5, 0.6, -1.2, 0.9],  # raw coeffs (k m)
        dtype=torch.float64,
    )
    return p


def tempered(params: Tensor, c: int, m: int, t: float) -> Tensor:
    """Params of the distribution that sampling at temperature t draws from."""
    p = params.clone()
    p[:, :m] /= t
    p[:, m + c * m : m + 2 * c * m] += math.log(t)
    return p


def sample_counts(params: Tensor, c: int, m: int, n: int, t: float, seed: int) -> Tensor:
    """Histogram over joint bins (channel 0 most significant) of 20000 samples."""
    head = DiscretizedLogisticMixture(c, m, n)
    g = torch.Generator().manual_seed(seed)
    x = head.sample(params.float().expand(20000, -1, -1, -1), generator=g, temperature=t)
    assert x.shape == (20000, c, 1, 1) and x.dtype == torch.float32
    idx = to_bins(x, n)
    assert torch.equal(from_bins(idx, n), x)  # on the grid
    flat = torch.zeros(20000, dtype=torch.long)
    for ci in range(c):
        flat = flat * n + idx[:, ci, 0, 0]
    return torch.bincount(flat, minlength=n**c)


def exact_probs(params: Tensor, c: int, m: int, n: int) -> Tensor:
    return enumerate_log_prob(params, c, m, n).sum(dim=1).exp().flatten()


def test_sample_fits_one_channel() -> None:
    params, m, n = fixed_one_channel_params(), 3, 16
    assert_fits(sample_counts(params, 1, m, n, 1.0, seed=10), exact_probs(params, 1, m, n))


def test_sample_fits_three_channel_joint() -> None:
    params, c, m, n = fixed_three_channel_params(), 3, 2, 4
    probs = exact_probs(params, c, m, n)
    assert_fits(sample_counts(params, c, m, n, 1.0, seed=11), probs)


@pytest.mark.parametrize("t", [0.5, 1.5])
def test_sample_temperature_fits_tempered_distribution(t: float) -> None:
    params, c, m, n = fixed_three_channel_params(), 3, 2, 4
    counts = sample_counts(params, c, m, n, t, seed=12)
    assert_fits(counts, exact_probs(tempered(params, c, m, t), c, m, n))
    # Below one the samples concentrate: fewer distinct values, more on the top cell.
    base = sample_counts(params, c, m, n, 1.0, seed=13)
    if t < 1:
        assert counts.max() > base.max() and (counts > 0).sum() <= (base > 0).sum()


def test_chi2_check_has_power() -> None:
    """The goodness-of-fit check rejects a sampler whose scale is off by 30 percent."""
    params, m, n = fixed_one_channel_params(), 3, 16
    counts = sample_counts(params, 1, m, n, 1.3, seed=14)
    stat, dof = chi2_statistic(counts, exact_probs(params, 1, m, n))
    assert stat > chi2_quantile(0.999, dof)


def test_channel_log_probs_normalise_and_match_log_prob() -> None:
    c, m, n = 3, 3, 256
    params = random_params(2, c, m, 2, 3, seed=19, dtype=torch.float64)
    params[:, m + 2 * c * m :] *= 2
    idx = torch.randint(0, n, (2, c, 2, 3), generator=torch.Generator().manual_seed(20))
    x = from_bins(idx, n, torch.float64)
    for ci in range(c):
        lp = mixture_channel_log_probs(params, x, ci, m, n)  # [2, 256, 2, 3]
        assert lp.shape == (2, n, 2, 3) and lp.dtype == torch.float64
        assert torch.allclose(
            torch.logsumexp(lp, 1), torch.zeros(2, 2, 3, dtype=lp.dtype), atol=1e-12
        )
        # Entry v is mixture_log_prob at channel ci with x_ci = bin v (later channels ignored).
        xs = x[None].expand(n, -1, -1, -1, -1).clone()  # [256, 2, c, 2, 3]
        xs[:, :, ci] = from_bins(torch.arange(n), n, torch.float64)[:, None, None, None]
        xs[:, :, ci + 1 :] = 0.3  # anything
        full = mixture_log_prob(xs.flatten(0, 1), params.repeat(n, 1, 1, 1), m, n)
        want = full.view(n, 2, c, 2, 3)[:, :, ci].transpose(0, 1)
        assert torch.allclose(lp, want, rtol=1e-12, atol=1e-10)
        ref = reference_log_prob(xs.flatten(0, 1), params.repeat(n, 1, 1, 1), c, m, n)
        assert torch.allclose(lp, ref.view(n, 2, c, 2, 3)[:, :, ci].transpose(0, 1), atol=1e-8)
    assert torch.equal(
        mixture_channel_log_probs(params, None, 0, m, n),
        mixture_channel_log_probs(params, x, 0, m, n),
    )
    # fp32 and extreme params: still normalised and finite.
    ext, xe, me = extreme_case(EXTREME_LOG_SCALES, EXTREME_MEANS)
    for ci in range(3):
        lp32 = mixture_channel_log_probs(ext, xe, ci, me)
        assert lp32.dtype == torch.float32 and torch.isfinite(lp32).all()
        assert torch.allclose(torch.logsumexp(lp32, 1), torch.zeros(1, 1, ext.shape[-1]), atol=1e-5)
    for bad in (
        dict(channel=3),
        dict(channel=-1),
        dict(channel=1, x=None),
        dict(channel=2, x=x[:, :1]),
    ):
        args = dict(params=params, x=x, num_mixtures=m, num_bins=n) | bad
        with pytest.raises(ValueError):
            mixture_channel_log_probs(**args)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mixture_channel_log_probs(params[:, 1:], x, 0, m, n)


def reference_mode(params: Tensor, c: int, m: int, n: int) -> Tensor:
    """Greedy mode by brute force: for each channel enumerate all n bins with the independent
    float64 reference and take the most probable one given the earlier chosen values."""
    b, _, h, w = params.shape
    x = torch.zeros(b, c, h, w, dtype=torch.float64)
    grid = from_bins(torch.arange(n), n, torch.float64)
    for ci in range(c):
        xs = x[None].repeat(n, 1, 1, 1, 1)
        xs[:, :, ci] = grid[:, None, None, None]
        lp = reference_log_prob(xs.flatten(0, 1), params.repeat(n, 1, 1, 1), c, m, n)
        best = lp.view(n, b, c, h, w)[:, :, ci].argmax(0)  # [b, h, w]
        x[:, ci] = grid[best]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mode_is_greedy_most_probable_bin(dtype: torch.dtype) -> None:
    c, m, n = 3, 3, 256
    params = random_params(2, c, m, 3, 3, mean=(-1.3, 1.3), seed=15, dtype=dtype)
    params[:, m + 2 * c * m :] *= 2
    head = DiscretizedLogisticMixture(c, m, n)
    mode = head.mode(params)
    assert mode.dtype == dtype
    assert torch.equal(to_bins(mode, n), to_bins(reference_mode(params.double(), c, m, n), n))
    for ci in range(c):  # each channel maximises its conditional given the chosen earlier ones
        lp = mixture_channel_log_probs(params.double(), mode.double(), ci, m, n)
        chosen = lp.gather(1, to_bins(mode[:, ci : ci + 1], n))
        assert (chosen >= lp.amax(1, keepdim=True) - 1e-12).all()
    u_comp, u_val = draw_mixture_noise((2, c, 3, 3), torch.Generator().manual_seed(0))
    assert torch.equal(mixture_sample(params, c, m, n, u_comp, u_val, 0.0), mode)
    assert torch.equal(mixture_sample(params, c, m, n, u_comp, u_val, 0.0, top_k=1), mode)
    assert torch.equal(head.sample(params, temperature=0.0), mode)
    assert torch.equal(mixture_mode(params, c, m, n), mode)


def test_mode_is_not_the_heaviest_components_mean() -> None:
    """A broad heavy component and a sharp lighter one: the mode is the sharp one's bin, not the
    heavy component's mean (the old "argmax component, quantised mean" answer, bin 128)."""
    n, centre = 256, 2 * 191 / 255 - 1
    params = torch.tensor([0.2, 0.0, 0.0, centre, 0.0, -7.0]).view(1, 6, 1, 1)  # weights .55/.45
    assert mixture_mode(params, 1, 2, n).item() == pytest.approx(centre)
    lp = mixture_channel_log_probs(params, None, 0, 2, n)[0, :, 0, 0]
    assert int(lp.argmax()) == 191 and lp[191] > lp[128] + 3


def test_mixture_truncation_acts_on_components() -> None:
    """top_k / top_p keep the most probable components of softmax(logits / T), renormalised."""
    params, c, m, n = fixed_three_channel_params(), 3, 2, 4
    for top_k, top_p, keep in [(1, None, [0]), (None, 0.5, [0]), (None, 0.7, [0, 1])]:
        trunc = params.clone()
        drop = [k for k in range(m) if k not in keep]
        trunc[:, drop] = -1e4  # the dropped components get no mass
        head = DiscretizedLogisticMixture(c, m, n)
        g = torch.Generator().manual_seed(21)
        x = head.sample(
            params.float().expand(20000, -1, -1, -1), g, temperature=1.0, top_k=top_k, top_p=top_p
        )
        idx = to_bins(x, n)
        flat = (idx[:, 0] * n + idx[:, 1]) * n + idx[:, 2]
        assert_fits(torch.bincount(flat.flatten(), minlength=n**c), exact_probs(trunc, c, m, n))
    # With T the truncation uses the tempered weights: softmax([.3, -.2] / 0.2) keeps only 0.
    u_comp, u_val = draw_mixture_noise((500, c, 1, 1), torch.Generator().manual_seed(22))
    a = mixture_sample(params.expand(500, -1, -1, -1), c, m, n, u_comp, u_val, 0.2, top_p=0.9)
    b = mixture_sample(params.expand(500, -1, -1, -1), c, m, n, u_comp, u_val, 0.2, top_k=1)
    assert torch.equal(a, b)
    for bad in (dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=1.5)):
        with pytest.raises(ValueError):
            mixture_sample(params, c, m, n, u_comp[:1], u_val[:1], **bad)  # type: ignore[arg-type]


def test_sample_is_deterministic_given_noise_and_draw_order() -> None:
    c, m, n = 3, 2, 256
    params = random_params(4, c, m, 2, 3, seed=16)
    head = DiscretizedLogisticMixture(c, m, n)
    a = head.sample(params, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    u_comp = torch.rand((4, 2, 3), generator=g)  # the component uniforms come first
    u_val = torch.rand((4, c, 2, 3), generator=g)
    assert torch.equal(a, mixture_sample(params, c, m, n, u_comp, u_val))
    uc2, uv2 = draw_mixture_noise((4, c, 2, 3), torch.Generator().manual_seed(5))
    assert torch.equal(uc2, u_comp) and torch.equal(uv2, u_val) and uc2.dtype == torch.float32
    assert not torch.equal(a, head.sample(params, generator=torch.Generator().manual_seed(6)))


def test_sample_of_params_that_require_grad_is_the_same_draw_without_a_graph() -> None:
    """Sampling from a training forward's output (params requiring grad) works, and one
    draw object called twice (its buffers reused) gives the same values as fresh calls."""
    c, m, n = 3, 2, 256
    params = random_params(3, c, m, 2, 2, seed=18)
    u_comp, u_val = draw_mixture_noise((3, c, 2, 2), torch.Generator().manual_seed(8))
    plain = mixture_sample(params, c, m, n, u_comp, u_val)
    graded = mixture_sample(params.clone().requires_grad_(), c, m, n, u_comp, u_val)
    assert torch.equal(graded, plain) and not graded.requires_grad
    rows = params.movedim(1, -1).reshape(-1, params.shape[1])
    draw = MixtureRows(c, m, n, rows.dtype, rows.device)
    noise = logistic_noise(u_val.movedim(1, -1).reshape(-1, c), rows.dtype)
    first = draw(rows, u_comp.reshape(-1), noise)
    other = draw(rows.flip(0), u_comp.reshape(-1), noise)  # the same buffers, other values
    assert torch.equal(draw(rows, u_comp.reshape(-1), noise), first)
    assert torch.equal(first.view(3, 2, 2, c).movedim(-1, 1), plain)
    assert not torch.equal(other, first)


def test_sample_extreme_uniforms_and_bf16_params() -> None:
    c, m, n = 3, 2, 256
    params = random_params(2, c, m, 2, 2, seed=17)
    shape = (2, c, 2, 2)
    for value in (0.0, 1.0):
        u_comp = torch.full((2, 2, 2), value)
        x = mixture_sample(params, c, m, n, u_comp, torch.full(shape, value))
        assert torch.isfinite(x).all() and torch.equal(from_bins(to_bins(x, n), n), x)
    # u = 0 / 1 are clamped to the extreme logistic quantiles, not +-inf: the result is the edge.
    wide = params.clone()
    wide[:, m + c * m : m + 2 * c * m] = 2.0
    x = mixture_sample(wide, c, m, n, torch.full((2, 2, 2), 0.5), torch.ones(shape))
    assert (x == 1.0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x16 = mixture_sample(
            params.bfloat16(), c, m, n, torch.full((2, 2, 2), 0.3), torch.rand(shape)
        )
    assert x16.dtype == torch.float32
    with pytest.raises(ValueError):
        mixture_sample(params, c, m, n, torch.rand(2, 2, 2), torch.rand(shape), temperature=-1.0)
    with pytest.raises(ValueError):
        mixture_sample(params, c, m, n, torch.rand(2, 2), torch.rand(shape))


def test_head_wrapper() -> None:
    c, m, n = 3, 4, 16
    head = DiscretizedLogisticMixture(c, m, n)
    assert head.num_params == num_mixture_params(c, m) == 4 + 24 + 12
    assert list(head.parameters()) == []
    params = random_params(2, c, m, 2, 2, seed=18)
    x = from_bins(torch.randint(0, n, (2, c, 2, 2)), n)
    assert torch.equal(head.log_prob(x, params), mixture_log_prob(x, params, m, n))
    assert torch.equal(head(x, params), mixture_log_prob(x, params, m, n))
    with pytest.raises(ValueError):
        head.log_prob(x[:, :1], params)


@pytest.mark.parametrize("n", [3, 16, 256])
def test_mode_search_prunes_exactly(n: int) -> None:
    """The pruned mode search (dominance and per-component reach windows) finds the argmax of
    the dense float64 conditional over all bins, for broad, sharp and far components."""
    m = 5
    params = random_params(4, 1, m, 8, 8, log_scale=(-9.0, 2.5), mean=(-1.6, 1.6), seed=23)
    params[:, :m] *= 3  # uneven weights
    params = params.double()
    dense = mixture_channel_log_probs(params, None, 0, m, n).argmax(1)  # [4, 8, 8]
    assert torch.equal(to_bins(mixture_mode(params, 1, m, n)[:, 0], n), dense)
    # Two equal broad components: the mode can sit between them, far from both means.
    seps = torch.linspace(0.05, 0.4, 16, dtype=torch.float64)
    two = torch.zeros(16, 6, 1, 1, dtype=torch.float64)
    two[:, 2, 0, 0], two[:, 3, 0, 0], two[:, 4:] = (
        0.013 - seps / 2,
        0.013 + seps / 2,
        math.log(0.08),
    )
    two[:, 0] = 0.1  # no exact (mirror) ties
    dense = mixture_channel_log_probs(two, None, 0, 2, n).argmax(1)[:, 0, 0]
    assert torch.equal(to_bins(mixture_mode(two, 1, 2, n), n)[:, 0, 0, 0], dense)
    if n == 256:
        centre = 1.013 * (n - 1) / 2  # the mode between the two means, > 10 bins from both
        between = (dense.double() - centre).abs() < 3
        assert (between & (seps * (n - 1) / 2 > 10)).any()


def test_log_prob_is_the_same_for_a_channels_last_map() -> None:
    gen = torch.Generator().manual_seed(3)
    params = torch.randn(2, num_mixture_params(3, 4), 5, 6, generator=gen, dtype=torch.float64)
    x = torch.randint(0, 256, (2, 3, 5, 6), generator=gen).double() * (2 / 255) - 1
    want = mixture_log_prob(x, params, 4)
    cl = torch.channels_last
    p_cl = params.contiguous(memory_format=cl).requires_grad_(True)
    got = mixture_log_prob(x.contiguous(memory_format=cl), p_cl, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), p_cl)
    p_ref = params.clone().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(mixture_log_prob(x, p_ref, 4).sum(), p_ref)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12)


def test_constants_are_made_once_per_key_and_serve_outside_inference_mode() -> None:
    from vqprior.nn.precision import constants

    key = (0.5, -7.25, 255.0)
    with torch.inference_mode():  # a sampler may be the first to ask
        made = constants(key, torch.float64, torch.device("cpu"))
    assert [t.item() for t in made] == list(key) and all(t.dim() == 0 for t in made)
    assert all(t.dtype == torch.float64 and not t.is_inference() for t in made)
    again = constants(key, torch.float64, torch.device("cpu"))
    assert all(a is b for a, b in zip(made, again, strict=True))
    assert constants(key, torch.float32, torch.device("cpu"))[0].dtype == torch.float32
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    (x * made[2]).sum().backward()  # usable in a recorded op
    assert torch.equal(x.grad, torch.full((3,), 255.0, dtype=torch.float64))
