"""Levels are data: a VQ-VAE with one or two levels and its chain of priors
(:class:`vqprior.models.levels.LevelModel`), tested with the same bodies for both."""

from __future__ import annotations

import math

import pytest
import torch

from vqprior.models.levels import LevelModel, check_levels, upsample_codes
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.models.vqvae import VQVAE, VQVAEConfig
from vqprior.sampling import sampling_generator

BASE = dict(in_channels=3, hidden_channels=8, res_channels=4, num_res_blocks=1, num_codes=16,
            code_dim=4, downsample=2)  # fmt: skip


def images(b: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 8, 8), generator=gen).float() * 2 / 255 - 1


def chain(levels: int, num_classes: int = 0, **vae: object) -> LevelModel:
    """A random VAE of ``levels`` levels on 8x8 RGB and one tiny prior per level."""
    torch.manual_seed(levels)
    model = VQVAE(VQVAEConfig.from_dict({**BASE, "levels": levels, **vae})).eval()
    with torch.no_grad():
        for q in model.codebooks:
            q.embed.copy_(torch.randn_like(q.embed))
    priors = []
    for i, (h, w) in enumerate(model.level_shapes(8, 8)):
        cfg = dict(data="codes", num_codes=16, height=h, width=w, channels=8, num_layers=2,
                   num_classes=num_classes, spatial_cond_channels=4 if i else 0)  # fmt: skip
        priors.append(PixelCNN(PixelCNNConfig.from_dict(cfg)).eval())
    return LevelModel(model, priors)


def test_vae_levels_are_one_structure() -> None:
    x = images(2)
    for levels, shapes in ((1, [(4, 4)]), (2, [(2, 2), (4, 4)])):
        vae = chain(levels).vae
        assert vae is not None and vae.config.levels == levels
        assert len(vae.level_names) == len(vae.codebooks) == levels
        codes = vae.encode_levels(x)
        assert [tuple(c.shape[1:]) for c in codes] == shapes == vae.level_shapes(8, 8)
        torch.testing.assert_close(vae.decode_levels(*codes), vae(x).recon)
    one = chain(1).vae
    assert one is not None
    (codes,) = one.encode_levels(x)
    assert torch.equal(one.encode(x), codes)
    assert torch.equal(one.decode(codes), one.decode_levels(codes))


def test_upsample_codes_is_the_repeated_codebook_vectors() -> None:
    embed = torch.randn(16, 4)
    top = torch.randint(0, 16, (2, 2, 3))
    cond = upsample_codes(embed, top, (4, 6))
    assert cond.shape == (2, 4, 4, 6)
    for r in range(4):
        for c in range(6):
            torch.testing.assert_close(cond[:, :, r, c], embed[top[:, r // 2, c // 2]])
    with pytest.raises(ValueError, match="multiple"):
        upsample_codes(embed, top, (5, 6))
    with pytest.raises(ValueError, match=r"lie in \[0, 16\)"):
        upsample_codes(embed, top + 16, (4, 6))


def test_the_level_below_depends_on_the_level_above() -> None:
    model = chain(2)
    bottom = torch.randint(0, 16, (1, 4, 4))
    tops = [torch.full((1, 2, 2), v, dtype=torch.long) for v in (0, 1)]
    lps = [model.level_log_probs([t, bottom])[1] for t in tops]
    assert not torch.allclose(lps[0], lps[1])
    assert model.condition(0, tops) is None


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_chain_sampler_is_exact_and_decodes(levels: int, num_classes: int) -> None:
    model = chain(levels, num_classes)
    cond = torch.tensor([0, 1, 2]) if num_classes else None
    fast, ref = (
        model.sample(3, cond=cond, generator=sampling_generator(9), method=method)
        for method in ("auto", "naive")
    )
    assert len(fast) == levels
    for a, b, prior in zip(fast, ref, model.priors, strict=True):
        assert a.shape == (3, prior.config.height, prior.config.width)
        assert torch.equal(a, b)
    assert model.decode(fast).shape == (3, 3, 8, 8)


@pytest.mark.parametrize("levels", [1, 2])
def test_bound_is_recomputed_from_each_levels_log_prob(levels: int) -> None:
    model = chain(levels, recon="mixture", num_mixtures=2)
    vae = model.vae
    assert vae is not None
    x = images(3, seed=10)
    nats = model.nats(x)
    with torch.no_grad():
        codes = vae.encode_levels(x)
        above = None
        for i, prior in enumerate(model.priors):
            spatial = None if above is None else upsample_codes(
                vae.codebooks[i - 1].embed, above, (prior.config.height, prior.config.width)
            )  # fmt: skip
            lp = prior.log_prob(codes[i], reduction="none", spatial_cond=spatial)
            torch.testing.assert_close(nats.levels[i], -lp.flatten(1).sum(1))
            above = codes[i]
        recon_loss = vae(x).recon_loss
    dims = 3 * 8 * 8
    torch.testing.assert_close(nats.decoder.mean() / dims, recon_loss)
    bits = nats.bits_per_dim(dims, model.names)
    total = (sum(nats.levels) + nats.decoder).mean() / (dims * math.log(2.0))
    assert bits["bits_per_dim"] == pytest.approx(float(total), rel=1e-5)
    assert set(bits) == {f"{n}_bits_per_dim" for n in model.names} | {
        "decoder_bits_per_dim", "bits_per_dim"}  # fmt: skip
    mse = chain(levels, recon="mse")
    assert math.isnan(mse.nats(x).bits_per_dim(dims, mse.names)["bits_per_dim"])


def test_completion_through_the_chain_keeps_the_known_codes() -> None:
    model = chain(2)
    known = model.encode(images(2, seed=4))
    masks = [torch.zeros_like(k, dtype=torch.bool) for k in known]
    for m in masks:
        m[:, : m.shape[1] // 2] = True  # the top half of every level is kept
    out = model.sample(2, known=known, mask=masks, generator=sampling_generator(1))
    for k, m, o in zip(known, masks, out, strict=True):
        assert torch.equal(o[m], k[m])


def test_mismatched_priors_are_refused() -> None:
    model = chain(2)
    vae, (top, bottom) = model.vae, model.priors
    assert vae is not None
    with pytest.raises(ValueError, match="spatial_cond_channels=4"):
        check_levels(vae, [top, top])
    with pytest.raises(ValueError, match="spatial_cond_channels=0"):
        check_levels(vae, [bottom, bottom])
    with pytest.raises(ValueError, match="one prior per level"):
        check_levels(vae, [top])
    coarse = PixelCNN(PixelCNNConfig(data="codes", num_codes=16, height=2, width=2, channels=8,
                                     spatial_cond_channels=4))  # fmt: skip
    with pytest.raises(ValueError, match="level grids"):
        check_levels(vae, [top, coarse])
    other = PixelCNN(PixelCNNConfig(data="codes", num_codes=8, height=2, width=2, channels=8))
    with pytest.raises(ValueError, match="16-code codebook"):
        check_levels(vae, [other, bottom])
    one = chain(1).vae
    with pytest.raises(ValueError, match="one prior per level"):
        check_levels(one, [top, bottom])
    pixels = PixelCNN(PixelCNNConfig(data="pixels", in_channels=3, height=8, width=8))
    check_levels(None, [pixels])
    with pytest.raises(ValueError, match="one prior on pixels"):
        check_levels(None, [top])
