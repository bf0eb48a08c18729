"""Samples follow the model: brute-force enumeration of tiny priors and chi-square tests.

Every state of a tiny model is enumerated, its probability is exp(log_prob), and the
sampler's state frequencies must fit those probabilities (fixed seeds, p > 1e-3).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from model_cases import chi_square_p, state_counts

from vqprior import PixelCNN, PixelCNNConfig
from vqprior.nn.grid import from_bins

N = 20_000


def tiny(sharpen: float = 3.0, **kw) -> PixelCNN:
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(channels=8, num_layers=2, **kw)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(sharpen)  # a random model far from uniform
    return model


def code_states(k: int, h: int, w: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(k), repeat=h * w))).view(-1, h, w)


def pixel_states(bins: int, c: int, h: int, w: int) -> torch.Tensor:
    idx = torch.tensor(list(itertools.product(range(bins), repeat=c * h * w))).view(-1, c, h, w)
    return from_bins(idx, bins, torch.float64)


def enumerated(model: PixelCNN) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    if cfg.data == "codes":
        states = code_states(cfg.num_codes, cfg.height, cfg.width)
    else:
        states = pixel_states(cfg.num_bins, cfg.in_channels, cfg.height, cfg.width)
    with torch.no_grad():
        probs = model.log_prob(states).exp()
    assert abs(float(probs.sum()) - 1.0) < 1e-9  # the enumeration is complete
    return states, probs


MODELS = {
    "codes-2x2-k3": dict(data="codes", num_codes=3, height=2, width=2),
    "pixels-1x2-categorical": dict(
        data="pixels", in_channels=1, head="categorical", num_bins=4, height=1, width=2
    ),
    "pixels-1x2-mixture": dict(
        data="pixels", in_channels=1, num_mixtures=2, num_bins=4, height=1, width=2
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_reference_samples_follow_exp_log_prob(name: str) -> None:
    model = tiny(**MODELS[name])
    states, probs = enumerated(model)
    assert float(probs.max()) > 3.0 / len(states)  # not uniform: the test has power
    x = model.sample(N, generator=torch.Generator().manual_seed(0), method="naive")
    p = chi_square_p(state_counts(x, states), probs)
    assert p > 1e-3, f"samples do not follow the model (chi-square p = {p:.2e})"


def test_the_test_rejects_a_wrong_distribution() -> None:
    """Same samples, another model's probabilities: the chi-square test must fail."""
    model = tiny(**MODELS["codes-2x2-k3"])
    states, _ = enumerated(model)
    _, other = enumerated(tiny(sharpen=2.0, **MODELS["codes-2x2-k3"]))
    x = model.sample(N, generator=torch.Generator().manual_seed(0), method="naive")
    assert chi_square_p(state_counts(x, states), other) < 1e-6


def test_completions_follow_the_conditional_distribution() -> None:
    """Top row known: the bottom row's completions follow p(bottom | top) from log_prob."""
    model = tiny(**MODELS["codes-2x2-k3"])
    states, probs = enumerated(model)
    top = torch.tensor([2, 0])
    rows = states[:, 0].eq(top).all(1)
    cond_states, cond_probs = states[rows], probs[rows] / probs[rows].sum()
    known = torch.zeros(2, 2, dtype=torch.long)
    known[0] = top
    mask = torch.zeros(2, 2, dtype=torch.bool)
    mask[0] = True
    gen = torch.Generator().manual_seed(3)
    x = model.sample(N, generator=gen, known=known, mask=mask)
    assert torch.equal(x[:, 0], top.expand(N, 2))  # known elements come back unchanged
    p = chi_square_p(state_counts(x, cond_states), cond_probs)
    assert p > 1e-3, f"completions do not follow p(bottom | top) (chi-square p = {p:.2e})"
