"""Tiny PixelCNN configurations shared by the causality and sampler tests.

Together they cover both data kinds, the mixture and categorical heads, kernel sizes 3/5/7,
both backbones, class conditioning, the spatial-condition hook and attention blocks.
"""

from __future__ import annotations

import torch

from vqprior import PixelCNN, PixelCNNConfig
from vqprior.nn.grid import from_bins

SMALL = dict(height=4, width=4, channels=8)
PP = dict(backbone="pixelcnnpp", nr_resnet=1, num_scales=2)

CASES: dict[str, dict] = {
    "codes-k3": dict(data="codes", num_codes=9, **SMALL, num_layers=3) | dict(height=5),
    "codes-cond-k5": dict(
        data="codes", num_codes=5, **SMALL, num_layers=2, kernel_size=5, num_classes=3
    )
    | dict(width=5),
    "codes-k7-spatial": dict(
        data="codes", num_codes=6, **SMALL, num_layers=2, kernel_size=7, spatial_cond_channels=2
    ),
    "codes-cond-attention": dict(
        data="codes", num_codes=5, **SMALL, num_layers=3, num_classes=2, attention_every=1
    )
    | dict(attention_heads=2),
    "rgb-mixture": dict(data="pixels", in_channels=3, **SMALL, num_layers=2, num_mixtures=2)
    | dict(height=3),
    "rgb-mixture-cond": dict(
        data="pixels", in_channels=3, **SMALL, num_layers=3, num_mixtures=2, num_classes=2
    ),
    "gray-mixture-cond": dict(data="pixels", in_channels=1, **SMALL, num_layers=3, num_classes=2),
    "rgb-categorical": dict(
        data="pixels", in_channels=3, head="categorical", num_bins=16, **SMALL, num_layers=2
    )
    | dict(height=3, channels=12),
    "rgb-categorical-k5": dict(
        data="pixels",
        in_channels=3,
        head="categorical",
        num_bins=8,
        **SMALL,
        num_layers=3,
        kernel_size=5,
    )
    | dict(width=3, channels=6),
    "rgb-pixelcnnpp": dict(data="pixels", in_channels=3, **SMALL, **PP, num_mixtures=2),
    "gray-pixelcnnpp-cond": dict(data="pixels", in_channels=1, **SMALL, **PP, num_classes=2),
    "gray-pixelcnnpp-cond-categorical": dict(
        data="pixels", in_channels=1, head="categorical", num_bins=32, **SMALL, **PP, num_classes=2
    ),
}


def build(
    name: str, n: int, sharpen: bool = False, dtype: torch.dtype = torch.float64
) -> tuple[PixelCNN, torch.Tensor | None, torch.Tensor | None]:
    """A float64 (or ``dtype``) model in eval mode, with class labels and a spatial map for
    ``n`` examples when the configuration takes them. ``sharpen`` doubles the weights so that
    a random model's samples are structured rather than near uniform."""
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(**CASES[name])).to(dtype).eval()
    if sharpen:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)
    cfg = model.config
    cond = torch.arange(n) % cfg.num_classes if cfg.num_classes else None
    gen = torch.Generator().manual_seed(1)
    spatial = (
        torch.randn(n, cfg.spatial_cond_channels, cfg.height, cfg.width, generator=gen, dtype=dtype)
        if cfg.spatial_cond_channels
        else None
    )
    return model, cond, spatial


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness-of-fit p-value of ``counts`` against ``probs`` (states
    whose expected count is below ``min_expected`` are pooled into one bin)."""
    total = float(counts.sum())
    expected = probs.double() * total
    small = expected < min_expected
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


def state_counts(samples: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """How often each row of ``states`` [S, ...] occurs among ``samples`` [N, ...]."""
    flat_s = samples.flatten(1).double()
    flat_t = states.flatten(1).double()
    match = (flat_s[:, None, :] == flat_t[None, :, :]).all(-1)  # [N, S]
    assert bool(match.any(1).all()), "a sample is not one of the enumerated states"
    return match.sum(0)


def random_data(model: PixelCNN, n: int, gen: torch.Generator) -> torch.Tensor:
    """Random codes, or random pixels on the model's grid (float64)."""
    cfg = model.config
    if cfg.data == "codes":
        return torch.randint(cfg.num_codes, (n, *model.data_shape), generator=gen)
    idx = torch.randint(cfg.num_bins, (n, *model.data_shape), generator=gen)
    return from_bins(idx, cfg.num_bins, torch.float64)
