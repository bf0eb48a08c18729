"""Two-level VQ-VAE (levels=2): shapes, gradients, encode/decode invariant, dead codes, export,
the top condition of the bottom prior, two-level sampling and the two-level bound."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from einops import rearrange

from vqprior.io import load_pretrained
from vqprior.models.hierarchy import (
    VQVAE2,
    check_two_level,
    sample_two_level,
    top_condition,
    two_level_nats,
)
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.models.vqvae import VQVAE, VQVAEConfig
from vqprior.nn.quantize import VectorQuantizer


def tiny(**overrides: object) -> VQVAEConfig:
    base: dict[str, object] = dict(
        in_channels=3,
        hidden_channels=8,
        res_channels=4,
        num_res_blocks=1,
        num_codes=16,
        code_dim=4,
        levels=2,
        downsample=2,
    )
    return VQVAEConfig.from_dict({**base, **overrides})


def images(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random images on the 256-level grid in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), generator=gen).float() * 2 / 255 - 1


def vae2(**overrides: object) -> VQVAE2:
    model = VQVAE(tiny(**overrides))
    assert isinstance(model, VQVAE2)
    return model


@pytest.mark.parametrize(("downsample", "top_downsample"), [(2, 2), (4, 2), (2, 4)])
def test_levels_two_builds_the_hierarchy_with_these_shapes(
    downsample: int, top_downsample: int
) -> None:
    torch.manual_seed(0)
    model = vae2(downsample=downsample, top_downsample=top_downsample)
    assert isinstance(model, VQVAE) and type(VQVAE(tiny(levels=1))) is VQVAE
    x = images(2, 3, 16)
    hb, ht = 16 // downsample, 16 // downsample // top_downsample
    assert model.latent_shape(16, 16) == (hb, hb) and model.top_shape(16, 16) == (ht, ht)
    top, bottom = model.encode_levels(x)
    assert top.shape == (2, ht, ht) and bottom.shape == (2, hb, hb)
    assert top.dtype == bottom.dtype == torch.long
    assert model.decode_levels(top, bottom).shape == x.shape
    out = model(x)
    assert out.top_codes.shape == top.shape and out.codes.shape == bottom.shape
    assert out.recon.shape == x.shape
    torch.testing.assert_close(out.loss, out.recon_loss + out.commit_loss + out.codebook_loss)
    with pytest.raises(ValueError, match="downsample \\* top_downsample"):
        model.latent_shape(16 + downsample, 16)
    with pytest.raises(ValueError, match="encode_levels"):
        model.encode(x)
    with pytest.raises(ValueError, match="decode_levels"):
        model.decode(bottom)
    with pytest.raises(ValueError, match="do not fit top codes"):
        model.decode_levels(top, bottom[:, :-1])


@pytest.mark.parametrize("recon", ["mse", "mixture"])
def test_straight_through_gradients_reach_both_encoders(recon: str) -> None:
    torch.manual_seed(1)
    model = vae2(recon=recon, num_mixtures=2).train()
    out = model(images(2, 3, 8, seed=1))
    weight = torch.randn_like(out.recon)
    # Through the reconstruction alone (no commitment term): both quantizers pass gradient on.
    for name in ("encoder", "encoder_top", "decoder_top", "bottom_in", "upsample_top"):
        params = list(getattr(model, name).parameters())
        grads = torch.autograd.grad((out.recon * weight).sum(), params, retain_graph=True)
        assert all(torch.count_nonzero(g) > 0 for g in grads), name


@pytest.mark.parametrize("recon", ["mse", "mixture"])
@pytest.mark.parametrize("codebook", ["ema", "learned"])
def test_decode_levels_of_encode_levels_equals_forward_recon_in_eval(
    recon: str, codebook: str
) -> None:
    torch.manual_seed(2)
    model = vae2(recon=recon, codebook=codebook, num_mixtures=2)
    x = images(3, 3, 8, seed=2)
    model.train()
    model(x)  # a training step moves both codebooks
    model.eval()
    out = model(x)
    top, bottom = model.encode_levels(x)
    assert torch.equal(top, out.top_codes) and torch.equal(bottom, out.codes)
    assert torch.equal(model.decode_levels(top, bottom), out.recon.detach())
    if recon == "mixture":
        dims = x[0].numel()
        nats = model.decoder_nats(x, top, bottom)
        torch.testing.assert_close(nats.sum() / (len(x) * dims), out.recon_loss)
        torch.testing.assert_close(out.bits_per_dim, out.recon_loss / math.log(2.0))


def _capture_inputs(q: VectorQuantizer, store: list[torch.Tensor]) -> None:
    def hook(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        store.append(rearrange(args[0].detach(), "b d h w -> (b h w) d"))

    q.register_forward_pre_hook(hook)


@pytest.mark.parametrize("codebook", ["ema", "learned"])
def test_dead_code_restart_resets_forced_dead_codes_on_both_codebooks(codebook: str) -> None:
    torch.manual_seed(3)
    threshold = 0.5
    model = vae2(codebook=codebook, dead_code_threshold=threshold).train()
    dead = torch.tensor([0, 3, 7])
    seen: dict[str, list[torch.Tensor]] = {}
    for name, q in model.quantizers.items():
        with torch.no_grad():
            q.cluster_size.fill_(5.0)
            q.cluster_size[dead] = 0.0
            q.embed.data[dead] = 1e3  # far from every encoder output: never chosen
            if q.kind == "ema":
                q.embed_avg.copy_(q.embed * q.cluster_size[:, None])
        seen[name] = []
        _capture_inputs(q, seen[name])
    model(images(4, 3, 8, seed=3))
    for name, q in model.quantizers.items():
        z = seen[name][0]
        assert torch.all(q.cluster_size[dead] == threshold), name  # restarted ...
        for i in dead.tolist():  # ... to one of this level's encoder outputs
            assert torch.any(torch.all(z == q.embed[i], dim=1)), (name, i)
        live = torch.ones(q.num_codes, dtype=torch.bool)
        live[dead] = False
        assert torch.all(q.cluster_size[live] >= 5.0 * q.decay), name  # live codes kept


def test_usage_and_perplexity_per_level_count_the_codes() -> None:
    torch.manual_seed(4)
    model = vae2().eval()
    model.reset_usage()
    x = images(4, 3, 8, seed=4)
    out = model(x)
    stats = model.usage_stats()
    assert set(stats) == {"top", "bottom"}
    for name, codes in (("top", out.top_codes), ("bottom", out.codes)):
        counts = torch.bincount(codes.flatten(), minlength=16).double()
        p = counts[counts > 0] / counts.sum()
        assert stats[name].codes_used == int((counts > 0).sum())
        assert stats[name].perplexity == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    model.reset_usage()
    assert model.usage_stats()["top"] == (0, 0.0)


@pytest.mark.parametrize("codebook", ["ema", "learned"])
def test_save_and_load_pretrained_round_trip_two_levels(tmp_path: Path, codebook: str) -> None:
    torch.manual_seed(5)
    model = vae2(codebook=codebook, kmeans_init=True, recon="mixture", num_mixtures=2)
    x = images(4, 3, 8, seed=5)
    model.train()
    model(x)  # k-means init of both codebooks and an EMA step
    model.eval()
    model.save_pretrained(tmp_path / "vae2")
    loaded = load_pretrained(tmp_path / "vae2")
    assert isinstance(loaded, VQVAE2) and not loaded.training
    assert loaded.config == model.config and loaded.config.levels == 2
    assert isinstance(VQVAE.from_pretrained(tmp_path / "vae2"), VQVAE2)
    assert bool(loaded.quantizer_top.initted) and bool(loaded.quantizer.initted)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    top, bottom = model.encode_levels(x)
    got = loaded.encode_levels(x)
    assert torch.equal(got.top, top) and torch.equal(got.bottom, bottom)
    assert torch.equal(loaded.decode_levels(top, bottom), model.decode_levels(top, bottom))


def test_top_condition_is_the_upsampled_top_code_vectors() -> None:
    torch.manual_seed(6)
    model = vae2(top_downsample=2).eval()
    top = torch.randint(0, 16, (2, 2, 3))
    cond = top_condition(model, top, (4, 6))
    assert cond.shape == (2, 4, 4, 6)
    embed = model.quantizer_top.embed
    for r in range(4):
        for c in range(6):
            torch.testing.assert_close(cond[:, :, r, c], embed[top[:, r // 2, c // 2]])
    with pytest.raises(ValueError, match="multiple"):
        top_condition(model, top, (5, 6))
    with pytest.raises(ValueError, match="two-level"):
        top_condition(VQVAE(tiny(levels=1)), top, (4, 6))  # type: ignore[arg-type]


def _priors(model: VQVAE2, num_classes: int = 0) -> tuple[PixelCNN, PixelCNN]:
    base = dict(data="codes", num_codes=16, channels=8, num_layers=2, num_classes=num_classes)
    top = PixelCNN(PixelCNNConfig.from_dict({**base, "height": 2, "width": 2}))
    bottom = PixelCNN(
        PixelCNNConfig.from_dict(
            {**base, "height": 4, "width": 4, "spatial_cond_channels": model.config.code_dim}
        )
    )
    return top.eval(), bottom.eval()


def test_bottom_prior_depends_on_the_top_codes() -> None:
    torch.manual_seed(7)
    model = vae2().eval()
    with torch.no_grad():
        model.quantizer_top.embed.copy_(torch.randn(16, 4))
    _, bottom_prior = _priors(model)
    bottom = torch.randint(0, 16, (1, 4, 4))
    top_a, top_b = torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long)
    lp = [
        bottom_prior.log_prob(bottom, spatial_cond=top_condition(model, t, (4, 4)))
        for t in (top_a, top_b)
    ]
    assert not torch.allclose(lp[0], lp[1])


@pytest.mark.parametrize("num_classes", [0, 3])
def test_two_level_sampler_is_exact_and_decodes(num_classes: int) -> None:
    torch.manual_seed(8)
    model = vae2().eval()
    top_prior, bottom_prior = _priors(model, num_classes)
    cond = torch.tensor([0, 1, 2]) if num_classes else None
    runs = [
        sample_two_level(
            model,
            top_prior,
            bottom_prior,
            3,
            cond=cond,
            generator=torch.Generator().manual_seed(9),
            method=method,
        )
        for method in ("auto", "naive")
    ]
    fast, ref = runs
    assert fast.top.shape == (3, 2, 2) and fast.bottom.shape == (3, 4, 4)
    assert torch.equal(fast.top, ref.top) and torch.equal(fast.bottom, ref.bottom)
    assert torch.equal(fast.images, model.decode_levels(fast.top, fast.bottom))
    assert fast.images.shape == (3, 3, 8, 8)


def test_two_level_bound_recomputed_from_log_probs() -> None:
    torch.manual_seed(10)
    model = vae2(recon="mixture", num_mixtures=2).eval()
    top_prior, bottom_prior = _priors(model)
    x = images(3, 3, 8, seed=10)
    nats = two_level_nats(model, top_prior, bottom_prior, x)
    with torch.no_grad():
        out = model(x)
        spatial = top_condition(model, out.top_codes, (4, 4))
        top_lp = top_prior.log_prob(out.top_codes, reduction="none").flatten(1).sum(1)
        bottom_lp = bottom_prior.log_prob(out.codes, reduction="none", spatial_cond=spatial)
    torch.testing.assert_close(nats.top, -top_lp)
    torch.testing.assert_close(nats.bottom, -bottom_lp.flatten(1).sum(1))
    dims = 3 * 8 * 8
    torch.testing.assert_close(nats.decoder.mean() / dims, out.recon_loss)
    bits = nats.bits_per_dim(dims)
    total = (nats.top + nats.bottom + nats.decoder).mean() / (dims * math.log(2.0))
    assert bits["bits_per_dim"] == pytest.approx(float(total), rel=1e-5)
    assert bits["decoder_bits_per_dim"] == pytest.approx(float(out.bits_per_dim), rel=1e-5)
    mse_model = vae2(recon="mse").eval()
    assert math.isnan(
        two_level_nats(mse_model, top_prior, bottom_prior, x).bits_per_dim(dims)["bits_per_dim"]
    )


def test_mismatched_priors_are_refused() -> None:
    model = vae2()
    top_prior, bottom_prior = _priors(model)
    with pytest.raises(ValueError, match="spatial_cond_channels"):
        check_two_level(model, top_prior, top_prior)
    with pytest.raises(ValueError, match="takes no spatial condition"):
        check_two_level(model, bottom_prior, bottom_prior)
    coarse = PixelCNN(
        PixelCNNConfig(
            data="codes", num_codes=16, height=2, width=2, channels=8, spatial_cond_channels=4
        )
    )
    with pytest.raises(ValueError, match="top_downsample=2"):
        check_two_level(model, top_prior, coarse)
    other = PixelCNN(PixelCNNConfig(data="codes", num_codes=8, height=2, width=2, channels=8))
    with pytest.raises(ValueError, match="16-code codebook"):
        check_two_level(model, other, bottom_prior)
    with pytest.raises(ValueError, match="two-level"):
        check_two_level(VQVAE(tiny(levels=1)), top_prior, bottom_prior)


def test_level_quantizers_and_reconstruct_cover_both_kinds() -> None:
    from vqprior.models.hierarchy import level_quantizers, reconstruct

    torch.manual_seed(11)
    two, one = vae2().eval(), VQVAE(tiny(levels=1)).eval()
    assert level_quantizers(two) == {"top": two.quantizer_top, "bottom": two.quantizer}
    assert level_quantizers(one) == {"": one.quantizer}
    x = images(2, 3, 8, seed=11)
    assert torch.equal(reconstruct(two, x), two(x).recon.detach())
    assert torch.equal(reconstruct(one, x), one.decode(one.encode(x)))
