"""Two-level VQ-VAE (levels=2): shapes, gradients, encode/decode invariant, dead codes, export.
The chain of priors over the levels: tests/test_levels.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from einops import rearrange

from vqprior.io import load_pretrained
from vqprior.models.hierarchy import VQVAE2
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
    for name, q in dict(zip(model.level_names, model.codebooks, strict=True)).items():
        with torch.no_grad():
            q.cluster_size.fill_(5.0)
            q.cluster_size[dead] = 0.0
            q.embed.data[dead] = 1e3  # far from every encoder output: never chosen
            if q.kind == "ema":
                q.embed_avg.copy_(q.embed * q.cluster_size[:, None])
        seen[name] = []
        _capture_inputs(q, seen[name])
    model(images(4, 3, 8, seed=3))
    for name, q in dict(zip(model.level_names, model.codebooks, strict=True)).items():
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
    for q in model.codebooks:
        q.reset_usage()
    x = images(4, 3, 8, seed=4)
    out = model(x)
    stats = {
        name: q.usage_stats() for name, q in zip(model.level_names, model.codebooks, strict=True)
    }
    assert set(stats) == {"top", "bottom"}
    for name, codes in (("top", out.top_codes), ("bottom", out.codes)):
        counts = torch.bincount(codes.flatten(), minlength=16).double()
        p = counts[counts > 0] / counts.sum()
        assert stats[name].codes_used == int((counts > 0).sum())
        assert stats[name].perplexity == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    model.codebooks[0].reset_usage()
    assert model.codebooks[0].usage_stats() == (0, 0.0)


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


def test_level_quantizers_and_reconstruct_cover_both_kinds() -> None:
    from vqprior.models.hierarchy import level_quantizers, reconstruct

    torch.manual_seed(11)
    two, one = vae2().eval(), VQVAE(tiny(levels=1)).eval()
    assert level_quantizers(two) == {"top": two.quantizer_top, "bottom": two.quantizer}
    assert level_quantizers(one) == {"": one.quantizer}
    x = images(2, 3, 8, seed=11)
    assert torch.equal(reconstruct(two, x), two(x).recon.detach())
    assert torch.equal(reconstruct(one, x), one.decode(one.encode(x)))
