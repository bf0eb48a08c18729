"""Categorical head: log-likelihood vs brute force, inverse-CDF sampling fit, temperature."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from vqprior.nn.categorical import CategoricalHead, categorical_log_prob, categorical_sample


def chi2_quantile(p: float, dof: int) -> float:
    """Upper quantile of chi-square: scipy when importable, else Wilson-Hilferty."""
    try:
        from scipy.stats import chi2  # type: ignore[import-untyped]

        return float(chi2.ppf(p, dof))
    except ImportError:
        z = {0.999: 3.090232306167813}[p]
        k = float(dof)
        return k * (1.0 - 2.0 / (9.0 * k) + z * math.sqrt(2.0 / (9.0 * k))) ** 3


def chi2_statistic(counts: Tensor, probs: Tensor) -> tuple[float, int]:
    """Pearson chi-square; zero-probability cells must be empty and are dropped."""
    counts, probs = counts.double(), probs.double()
    zero = probs == 0
    assert torch.all(counts[zero] == 0), "a sample fell in a zero-probability class"
    expected = probs[~zero] * counts.sum()
    assert expected.min() >= 5
    return float(((counts[~zero] - expected) ** 2 / expected).sum()), int((~zero).sum()) - 1


def assert_fits(counts: Tensor, probs: Tensor) -> None:
    stat, dof = chi2_statistic(counts, probs)
    assert stat < chi2_quantile(0.999, dof), f"chi2 {stat:.1f} with {dof} dof"


LOGITS = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.5, 0.0])


def draw(logits: Tensor, temperature: float, seed: int, n: int = 20000) -> Tensor:
    """Histogram of n samples of a fixed class distribution, drawn as a [n/100, k, 10, 10] map."""
    head = CategoricalHead(logits.numel())
    grid = logits.view(1, -1, 1, 1).expand(n // 100, -1, 10, 10)
    s = head.sample(grid, generator=torch.Generator().manual_seed(seed), temperature=temperature)
    assert s.shape == (n // 100, 10, 10) and s.dtype == torch.long
    return torch.bincount(s.flatten(), minlength=logits.numel())


def test_log_prob_matches_brute_force_and_normalises() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 4, 5, generator=g) * 3
    target = torch.randint(0, 7, (3, 4, 5), generator=g)
    lp = categorical_log_prob(logits, target)
    assert lp.shape == (3, 4, 5) and lp.dtype == torch.float32
    ref = torch.empty(3, 4, 5, dtype=torch.float64)
    for b in range(3):
        for i in range(4):
            for j in range(5):
                z = logits[b, :, i, j].double()
                ref[b, i, j] = z[target[b, i, j]] - math.log(float(torch.exp(z).sum()))
    assert torch.allclose(lp.double(), ref, atol=1e-5)
    every = torch.stack(
        [categorical_log_prob(logits, torch.full_like(target, k)) for k in range(7)]
    )
    total = every.exp().sum(dim=0)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    # No rest dims: logits [b, n], target [b].
    flat = categorical_log_prob(logits[:, :, 0, 0], target[:, 0, 0])
    assert torch.equal(flat, lp[:, 0, 0])


def test_log_prob_fp32_under_bf16_autocast_and_extremes() -> None:
    logits = (
        torch.tensor([[8192.0, -8192.0, 0.0], [-60.0, 60.0, 0.0]]).bfloat16().requires_grad_(True)
    )
    target = torch.tensor([1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = categorical_log_prob(logits, target)
    assert lp.dtype == torch.float32
    assert torch.allclose(lp, torch.tensor([-16384.0, -120.0]), rtol=1e-6)
    lp.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError):
        categorical_log_prob(logits, target[:1])


def test_sample_fits_distribution() -> None:
    assert_fits(draw(LOGITS, 1.0, seed=1), torch.softmax(LOGITS.double(), 0))


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_sample_temperature_fits_tempered_softmax(t: float) -> None:
    counts = draw(LOGITS, t, seed=2)
    assert_fits(counts, torch.softmax(LOGITS.double() / t, 0))
    base = draw(LOGITS, 1.0, seed=3)
    top = int(LOGITS.argmax())
    assert (counts[top] > base[top]) == (t < 1)  # T < 1 sharpens, T > 1 flattens


def test_chi2_check_has_power() -> None:
    """The check rejects samples drawn at a slightly wrong temperature."""
    stat, dof = chi2_statistic(draw(LOGITS, 1.15, seed=4), torch.softmax(LOGITS.double(), 0))
    assert stat > chi2_quantile(0.999, dof)


def test_temperature_zero_is_argmax() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 9, 3, 3, generator=g)
    u = torch.rand(4, 3, 3, generator=g)
    assert torch.equal(categorical_sample(logits, u, 0.0), logits.argmax(dim=1))
    head = CategoricalHead(9)
    assert torch.equal(head.sample(logits, temperature=0.0), logits.argmax(dim=1))
    # A vanishing temperature converges to the argmax without overflowing.
    assert torch.equal(categorical_sample(logits, u, 1e-30), logits.argmax(dim=1))
    with pytest.raises(ValueError):
        categorical_sample(logits, u, -0.1)


def test_inverse_cdf_is_exact_and_skips_empty_classes() -> None:
    probs = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0])
    logits = probs.log().view(1, 6).expand(7, 6)
    u = torch.tensor([0.0, 0.1, 0.25 + 1e-6, 0.5, 0.75 - 1e-6, 0.75 + 1e-6, 1.0])
    assert categorical_sample(logits, u).tolist() == [1, 1, 3, 3, 3, 4, 4]
    # bf16 logits under autocast: the same classes as fp32 math on the upcast logits.
    u = torch.rand(7, generator=torch.Generator().manual_seed(6))
    noisy = logits + torch.randn(7, 6, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = categorical_sample(noisy.bfloat16(), u)
    assert torch.equal(got, categorical_sample(noisy.bfloat16().float(), u))


def test_sample_is_deterministic_given_generator() -> None:
    logits = torch.randn(5, 4, 3)
    head = CategoricalHead(4)
    a = head.sample(logits, generator=torch.Generator().manual_seed(7))
    u = torch.rand((5, 3), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, categorical_sample(logits, u))
    assert torch.equal(a, head.sample(logits, generator=torch.Generator().manual_seed(7)))
    assert head.num_params == 4 and list(head.parameters()) == []
    target = torch.randint(0, 4, (5, 3))
    assert torch.equal(head.log_prob(logits, target), categorical_log_prob(logits, target))
    with pytest.raises(ValueError):
        head.log_prob(torch.randn(5, 3, 3), target)


# ----------------------------------------------------------------------------- truncation


def reference_truncated(
    row: list[float], t: float, top_k: int | None, top_p: float | None
) -> list[float]:
    """Brute force: tempered probabilities, rank by logit (ties by index), keep, renormalise."""
    z = [v / t for v in row]
    top = max(z)
    p = [math.exp(v - top) for v in z]
    total = sum(p)
    p = [v / total for v in p]
    ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))
    kept, mass = [], 0.0
    for r, i in enumerate(ranked):
        if top_k is not None and r >= top_k:
            break
        if top_p is not None and top_p < 1 and mass >= top_p:
            break
        kept.append(i)
        mass += p[i]
    kept_mass = sum(p[i] for i in kept)
    return [p[i] / kept_mass if i in kept else 0.0 for i in range(len(row))]


TRUNCATIONS = [(1, None), (3, None), (None, 0.5), (None, 0.9), (4, 0.8), (100, None), (None, 1.0)]


@pytest.mark.parametrize(("top_k", "top_p"), TRUNCATIONS)
@pytest.mark.parametrize("t", [1.0, 0.6, 2.5])
def test_truncated_inverse_cdf_is_exact(top_k: int | None, top_p: float | None, t: float) -> None:
    """On a fine grid of u the sampler is the inverse CDF of the brute-force distribution."""
    g = torch.Generator().manual_seed(30)
    rows = torch.randn(5, 8, generator=g, dtype=torch.float64).mul(2).round().div(2)  # with ties
    u = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
    for row in rows:
        probs = torch.tensor(
            reference_truncated(row.tolist(), t, top_k, top_p), dtype=torch.float64
        )
        cdf = probs.cumsum(0)
        want = torch.searchsorted(cdf / cdf[-1], u).clamp(max=7)  # first class with cdf >= u
        got = categorical_sample(row.expand(4000, -1), u, t, top_k, top_p)
        mismatch = (got != want).sum()
        assert mismatch <= 2, (row, got[got != want], want[got != want])  # u on a boundary only
        assert (probs[got] > 0).all()  # never a dropped class
        freq = torch.bincount(got, minlength=8).double() / 4000
        assert torch.allclose(freq, probs, atol=2 / 4000)


def test_truncated_sampling_fits_distribution() -> None:
    for top_k, top_p, t in [(3, None, 1.0), (None, 0.7, 1.0), (2, 0.95, 0.5)]:
        head = CategoricalHead(LOGITS.numel())
        grid = LOGITS.view(1, -1, 1, 1).expand(200, -1, 10, 10)
        g = torch.Generator().manual_seed(31)
        s = head.sample(grid, generator=g, temperature=t, top_k=top_k, top_p=top_p)
        probs = torch.tensor(reference_truncated(LOGITS.tolist(), t, top_k, top_p))
        assert_fits(torch.bincount(s.flatten(), minlength=6), probs)
        u = torch.rand((200, 10, 10), generator=torch.Generator().manual_seed(31))
        assert torch.equal(s, categorical_sample(grid, u, t, top_k, top_p))  # same draw order


def test_top_k_one_is_temperature_zero_with_ties() -> None:
    g = torch.Generator().manual_seed(32)
    logits = torch.randint(-2, 3, (50, 7, 3, 3), generator=g).float()  # many tied maxima
    u = torch.rand(50, 3, 3, generator=g)
    argmax = categorical_sample(logits, u, 0.0)
    assert torch.equal(argmax, logits.argmax(dim=1))
    for t in (1e-3, 1.0, 10.0):
        assert torch.equal(categorical_sample(logits, u, t, top_k=1), argmax)
        assert torch.equal(categorical_sample(logits, u, t, top_p=1e-9), argmax)
        # top_k >= n and top_p = 1 are no truncation at all.
        plain = categorical_sample(logits, u, t)
        assert torch.equal(categorical_sample(logits, u, t, top_k=7), plain)
        assert torch.equal(categorical_sample(logits, u, t, top_k=70, top_p=1.0), plain)
    assert torch.equal(categorical_sample(logits, u, 0.0, top_k=3, top_p=0.5), argmax)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = categorical_sample(logits.bfloat16(), u, 0.7, top_k=2, top_p=0.9)
    assert torch.equal(got, categorical_sample(logits, u, 0.7, top_k=2, top_p=0.9))


@pytest.mark.parametrize(
    "bad", [dict(top_k=0), dict(top_k=-2), dict(top_k=2.0), dict(top_k=True), dict(top_p=0.0),
            dict(top_p=1.01), dict(top_p=-0.5), dict(top_p=float("nan")), dict(top_p="0.5")]
)  # fmt: skip
def test_truncation_arguments_are_validated(bad: dict[str, object]) -> None:
    logits, u = torch.randn(2, 5), torch.rand(2)
    with pytest.raises(ValueError, match="top_"):
        categorical_sample(logits, u, 1.0, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_"):
        CategoricalHead(5).sample(logits, temperature=0.0, **bad)  # type: ignore[arg-type]
