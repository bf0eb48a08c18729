"""VQVAE: shapes, encode/decode invariant, validation, export round trip, a short fit on digits."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vqprior.config import ConfigError
from vqprior.models.vqvae import VQVAE, VQVAEConfig


def tiny(**overrides: object) -> VQVAEConfig:
    base: dict[str, object] = dict(
        in_channels=3, hidden_channels=8, res_channels=4, num_res_blocks=1, num_codes=16, code_dim=4
    )
    return VQVAEConfig.from_dict({**base, **overrides})


def images(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random images on the 256-level grid in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), generator=gen).float() * 2 / 255 - 1


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny convs run fastest (and without oversubscription) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("downsample", [2, 4, 8])
@pytest.mark.parametrize("recon", ["mse", "mixture"])
def test_shapes(downsample: int, recon: str) -> None:
    torch.manual_seed(0)
    model = VQVAE(tiny(downsample=downsample, recon=recon, num_mixtures=2))
    x = images(2, 3, 16)
    h = 16 // downsample
    assert model.latent_shape(16, 16) == (h, h)
    out = model(x)
    assert out.codes.shape == (2, h, h) and out.codes.dtype == torch.long
    assert out.recon.shape == x.shape
    assert float(out.recon.detach().min()) >= -1.0 and float(out.recon.detach().max()) <= 1.0
    codes = model.encode(x)
    assert codes.shape == (2, h, h) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert model.decode(codes).shape == x.shape
    for name in ("loss", "recon_loss", "commit_loss", "codebook_loss", "bits_per_dim"):
        assert getattr(out, name).shape == (), name
    torch.testing.assert_close(out.loss, out.recon_loss + out.commit_loss + out.codebook_loss)


def test_defaults_build_and_config_round_trip() -> None:
    model = VQVAE()
    assert model.config == VQVAEConfig()
    cfg = tiny(codebook="learned", recon="mixture")
    assert VQVAEConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.parametrize("recon", ["mse", "mixture"])
@pytest.mark.parametrize("codebook", ["ema", "learned"])
def test_decode_of_encode_equals_forward_recon_in_eval(recon: str, codebook: str) -> None:
    torch.manual_seed(1)
    model = VQVAE(tiny(recon=recon, codebook=codebook, num_mixtures=3))
    x = images(3, 3, 8, seed=1)
    model.train()
    model(x)  # one training step moves the EMA codebook / restarts codes
    model.eval()
    out = model(x)
    codes = model.encode(x)
    assert torch.equal(codes, out.codes)
    assert torch.equal(model.decode(codes), out.recon)
    if recon == "mixture":
        # The mode lies on the pixel grid, and bits/dim is the per-dim NLL in base 2.
        grid = (out.recon + 1) * 255 / 2
        torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.bits_per_dim, out.recon_loss / math.log(2.0))
        assert torch.isfinite(out.bits_per_dim)
    else:
        assert torch.isnan(out.bits_per_dim)
        raw = model.decoder(model.quantizer.lookup(codes))
        torch.testing.assert_close(out.recon_loss, torch.mean((raw - x) ** 2))


def test_bad_inputs_raise_value_error() -> None:
    model = VQVAE(tiny(downsample=4)).eval()
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        model.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.zeros(1, 3, 8, 6))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 3, 10, 8))
    with pytest.raises(ValueError, match="divisible"):
        model.latent_shape(9, 8)
    with pytest.raises(ValueError, match="floats"):
        model.encode(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode(torch.full((1, 2, 2), 16))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode(torch.full((1, 2, 2), -1))
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        model.decode(torch.zeros(1, 2, 2))


@pytest.mark.parametrize("recon", ["mse", "mixture"])
def test_forward_reconstruction_carries_gradient_to_the_encoder(recon: str) -> None:
    torch.manual_seed(3)
    model = VQVAE(tiny(recon=recon, num_mixtures=2)).train()
    x = images(2, 3, 8, seed=3)
    out = model(x)
    assert out.recon.requires_grad
    weight = torch.randn_like(out.recon)
    grads = torch.autograd.grad((out.recon * weight).sum(), list(model.encoder.parameters()))
    assert all(torch.count_nonzero(g) > 0 for g in grads)  # every encoder tensor gets gradient
    # decode stays differentiable in the decoder's parameters
    (model.decode(out.codes) * weight).sum().backward()
    assert all(
        p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.decoder.parameters()
    )


def test_mixture_reconstruction_gradient_is_the_mixture_mean_gradient() -> None:
    """One channel: value = the mode, d recon / d params = d/d params of sum_m pi_m mu_m."""
    torch.manual_seed(4)
    m = 3
    model = VQVAE(tiny(in_channels=1, recon="mixture", num_mixtures=m))
    params = (0.3 * torch.randn(2, model.out_channels, 4, 4)).requires_grad_()
    recon = model._output_to_image(params)
    torch.testing.assert_close(recon.detach(), model._output_to_image(params.detach()))
    weight = torch.randn_like(recon)
    (got,) = torch.autograd.grad((recon * weight).sum(), params)
    logits, means = params[:, :m], params[:, m : 2 * m]  # layout [logits | means | log_scales]
    mean = (torch.softmax(logits, 1) * means).sum(1, keepdim=True)
    inside = (mean.abs() < 1).float()  # the mean is clamped to [-1, 1]
    (want,) = torch.autograd.grad((mean * weight * inside).sum(), params)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("scale", ["0-255", "slightly-over"])
def test_images_outside_minus_one_one_raise_one_clear_error(scale: str) -> None:
    model = VQVAE(tiny()).eval()
    x = images(1, 3, 8) if scale == "slightly-over" else torch.randint(0, 256, (1, 3, 8, 8)).float()
    if scale == "slightly-over":
        x[0, 0, 0, 0] = 1.01
    for call in (model.encode, model):
        with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*2v/255 - 1"):
            call(x)
    edge = torch.ones(1, 3, 8, 8)
    edge[0, 1] = -1.0
    assert model.encode(edge).shape == (1, 2, 2)  # the range's ends are fine


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("downsample", 3, "downsample"),
        ("codebook", "kmeans", "codebook"),
        ("recon", "l1", "recon"),
        ("ema_decay", 1.0, "ema_decay"),
        ("num_codes", 0, "num_codes"),
        ("beta", -0.1, "beta"),
        ("dead_code_threshold", -1.0, "dead_code_threshold"),
        ("num_bins", 1, "num_bins"),
        ("kmeans_iters", 0, "kmeans_iters"),
        ("restart_dead_codes", 2, "restart_dead_codes"),
        ("in_channels", True, "in_channels"),
        ("levels", 3, "levels"),
        ("levels", True, "levels"),
        ("top_downsample", 8, "top_downsample"),
    ],
)
def test_config_validation_names_the_field(key: str, value: object, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        VQVAEConfig(**{key: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown config key"):
        VQVAEConfig.from_dict({"num_code": 3})


@pytest.mark.parametrize("codebook", ["ema", "learned"])
def test_save_and_load_pretrained_round_trip(tmp_path: Path, codebook: str) -> None:
    io = pytest.importorskip("vqprior.io")
    torch.manual_seed(2)
    model = VQVAE(tiny(codebook=codebook, kmeans_init=True, recon="mixture", num_mixtures=2))
    x = images(4, 3, 8, seed=2)
    model.train()
    model(x)  # k-means init and an EMA step: buffers differ from a fresh model
    model.eval()
    model.save_pretrained(tmp_path / "vae")
    loaded = io.load_pretrained(tmp_path / "vae")
    assert isinstance(loaded, VQVAE) and not loaded.training
    assert loaded.config == model.config
    assert bool(loaded.quantizer.initted)
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert torch.equal(loaded.quantizer.cluster_size, model.quantizer.cluster_size)
    assert isinstance(VQVAE.from_pretrained(tmp_path / "vae"), VQVAE)


def _digits() -> torch.Tensor:
    """scikit-learn's 1,797 8x8 digits (levels 0..16) on the 256-level grid in [-1, 1]."""
    datasets = pytest.importorskip("sklearn.datasets")
    raw = torch.tensor(datasets.load_digits().images, dtype=torch.float32)
    return (torch.round(raw / 16 * 255) * 2 / 255 - 1)[:, None]  # [n, 1, 8, 8]


def test_short_training_run_on_digits_learns(one_thread: None) -> None:
    x = _digits()
    torch.manual_seed(0)
    cfg = tiny(in_channels=1, hidden_channels=16, res_channels=8, downsample=2, num_codes=32)
    model = VQVAE(cfg)
    model.eval()
    with torch.no_grad():
        before = model(x).recon_loss.item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        out = model(x[torch.randint(0, x.shape[0], (64,))])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    model.quantizer.reset_usage()
    with torch.no_grad():
        after = model(x).recon_loss.item()
    stats = model.quantizer.usage_stats()
    assert after < 0.25 * before
    assert stats.codes_used >= 0.6 * cfg.num_codes
    assert stats.perplexity > 0.3 * cfg.num_codes
