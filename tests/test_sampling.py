"""The fast samplers return exactly the reference loop's samples for the same generator.

Models run in float64 so that different (but mathematically equal) evaluation orders cannot
split a near tie between two bins; in float32 the samplers agree except at such ties.
"""

from __future__ import annotations

import math

import pytest
import torch
from model_cases import CASES, build

from vqprior import PixelCNN, PixelCNNConfig
from vqprior.nn.step import supports_steps


def draw(model, cond, spatial, method: str, temperature: float, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return model.sample(
        3, cond=cond, temperature=temperature, generator=gen, method=method, spatial_cond=spatial
    )


@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("name", list(CASES))
def test_fast_samplers_equal_the_reference_loop(name: str, temperature: float) -> None:
    model, cond, spatial = build(name, 3, sharpen=True)
    ref = draw(model, cond, spatial, "naive", temperature)
    methods = ["auto", "fixed_point"] + (["cached"] if supports_steps(model.backbone) else [])
    for method in methods:
        got = draw(model, cond, spatial, method, temperature)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got, ref), f"{method} differs from the reference loop"
    if temperature > 0:  # the noise matters: another seed gives other samples
        assert not torch.equal(draw(model, cond, spatial, "auto", temperature, seed=8), ref)


def test_fast_sampler_matches_after_training_steps() -> None:
    """A trained (non-random) model: the cached sampler still equals the reference."""
    torch.manual_seed(0)
    model = PixelCNN(
        PixelCNNConfig(data="codes", num_codes=4, height=5, width=5, channels=8, num_layers=2)
    ).double()
    data = (torch.arange(25).view(1, 5, 5) % 4).repeat(8, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = -model.log_prob(data, reduction="mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = model.sample(4, generator=torch.Generator().manual_seed(1), method="naive")
    assert torch.equal(model.sample(4, generator=torch.Generator().manual_seed(1)), ref)
    assert float(loss) < 0.5 * math.log(4)  # it learned the pattern: not a random model


def test_sample_arguments_are_checked() -> None:
    model, cond, _ = build("codes-cond-k5", 2)
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(2)
    with pytest.raises(ValueError, match="method"):
        model.sample(2, cond=cond, method="magic")
    scalar = model.sample(2, cond=torch.tensor(1), generator=torch.Generator().manual_seed(0))
    assert scalar.shape == (2, 4, 5)


class NoSteps(torch.nn.Module):
    """A backbone without the step interface (it only forwards)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def test_a_backbone_without_steps_falls_back_to_full_passes() -> None:
    model, _, _ = build("rgb-pixelcnnpp", 2, sharpen=True)
    model.backbone = NoSteps(model.backbone)
    with pytest.raises(ValueError, match="cached"):
        model.sample(1, method="cached")
    ref = draw(model, None, None, "naive", 1.0)
    assert torch.equal(draw(model, None, None, "auto", 1.0), ref)  # auto: fixed_point
