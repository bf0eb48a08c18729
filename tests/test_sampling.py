"""The fast samplers return exactly the reference loop's samples for the same generator.

Models run in float64 so that different (but mathematically equal) evaluation orders cannot
split a near tie between two bins; in float32 the samplers agree except at such ties.
"""

from __future__ import annotations

import math

import pytest
import torch

from vqprior import PixelCNN, PixelCNNConfig

CASES = {
    "codes-k3": dict(data="codes", num_codes=9, height=5, width=4, channels=8, num_layers=3),
    "codes-k5-cond": dict(
        data="codes",
        num_codes=6,
        height=4,
        width=6,
        channels=8,
        num_layers=2,
        kernel_size=5,
        num_classes=3,
    ),
    "codes-k7-spatial": dict(
        data="codes",
        num_codes=6,
        height=4,
        width=4,
        channels=8,
        num_layers=2,
        kernel_size=7,
        spatial_cond_channels=2,
    ),
    "gray-mixture": dict(
        data="pixels", in_channels=1, height=4, width=5, channels=8, num_layers=2, num_mixtures=3
    ),
    "rgb-mixture-cond": dict(
        data="pixels",
        in_channels=3,
        height=4,
        width=4,
        channels=8,
        num_layers=3,
        num_mixtures=2,
        num_classes=2,
    ),
    "rgb-categorical": dict(
        data="pixels",
        in_channels=3,
        head="categorical",
        num_bins=16,
        height=3,
        width=4,
        channels=12,
        num_layers=2,
    ),
    "rgb-categorical-k5": dict(
        data="pixels",
        in_channels=3,
        head="categorical",
        num_bins=8,
        height=4,
        width=3,
        channels=6,
        num_layers=3,
        kernel_size=5,
    ),
    "rgb-pixelcnnpp": dict(
        data="pixels",
        in_channels=3,
        height=4,
        width=4,
        channels=8,
        backbone="pixelcnnpp",
        nr_resnet=1,
        num_scales=2,
        num_mixtures=2,
    ),
    "gray-pixelcnnpp-cond-categorical": dict(
        data="pixels",
        in_channels=1,
        head="categorical",
        num_bins=32,
        height=4,
        width=4,
        channels=8,
        backbone="pixelcnnpp",
        nr_resnet=1,
        num_scales=2,
        num_classes=2,
    ),
}


def build(name: str) -> tuple[PixelCNN, torch.Tensor | None, torch.Tensor | None]:
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(**CASES[name])).double()
    # sharpen the random model so samples are structured, not uniform noise
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    cfg = model.config
    cond = torch.tensor([0, 1, cfg.num_classes - 1]) if cfg.num_classes else None
    spatial = (
        torch.randn(3, cfg.spatial_cond_channels, cfg.height, cfg.width, dtype=torch.float64)
        if cfg.spatial_cond_channels
        else None
    )
    return model, cond, spatial


def draw(model, cond, spatial, method: str, temperature: float, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return model.sample(
        3, cond=cond, temperature=temperature, generator=gen, method=method, spatial_cond=spatial
    )


@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("name", list(CASES))
def test_fast_samplers_equal_the_reference_loop(name: str, temperature: float) -> None:
    model, cond, spatial = build(name)
    ref = draw(model, cond, spatial, "naive", temperature)
    methods = ["auto", "fixed_point"] + (["cached"] if model.config.backbone == "gated" else [])
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
    model, cond, _ = build("codes-k5-cond")
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(2)
    with pytest.raises(ValueError, match="method"):
        model.sample(2, cond=cond[:2], method="magic")
    pp, _, _ = build("rgb-pixelcnnpp")
    with pytest.raises(ValueError, match="cached"):
        pp.sample(1, method="cached")
    scalar = model.sample(2, cond=torch.tensor(1), generator=torch.Generator().manual_seed(0))
    assert scalar.shape == (2, 4, 6)
