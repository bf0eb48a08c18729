"""VQ-VAE (van den Oord et al. 2017): conv encoder, vector quantizer, conv decoder.

``encode`` maps images [b, c, H, W] in [-1, 1] to code maps long [b, h, w] with
``h = H / downsample``; ``decode`` maps code maps back to images in [-1, 1]. The decoder either
regresses pixels (``recon="mse"``) or outputs a discretized logistic mixture
(``recon="mixture"``), whose mode is the reconstruction and whose NLL gives bits per dim.
The reconstruction carries gradient to the decoder and, straight through the quantizer, to the
encoder (for the mixture head through the mixture's mean), so extra losses can be put on it.

Levels are data: every VQ-VAE has ``levels`` code maps (``level_names``, ``codebooks``, top
first); ``encode_levels`` returns them as one tuple and ``decode_levels``, ``decoder_output``
and ``decoder_nats`` take them, for one level as for two. ``levels=2`` builds the two-level
hierarchy of VQ-VAE-2 (:mod:`vqprior.models.hierarchy`): ``VQVAE(VQVAEConfig(levels=2))``
returns the class registered for that level count in :data:`LEVEL_CLASSES`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vqprior.config import Config, ConfigError, check_choice, check_range
from vqprior.io import PretrainedMixin
from vqprior.nn.grid import from_bins, to_bins
from vqprior.nn.mixture import (
    mixture_log_prob,
    mixture_sample,
    num_mixture_params,
    split_mixture_params,
)
from vqprior.nn.precision import full_precision
from vqprior.nn.quantize import VectorQuantizer

DOWNSAMPLES = (2, 4, 8)
LEVELS = (1, 2)
TOP_DOWNSAMPLES = (2, 4)
RANGE_TOL = 1e-5  # images may exceed [-1, 1] by this much (float rounding), no more


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    check_range(name, value, low, None)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VQVAEConfig(Config):
    """VQ-VAE architecture, codebook and reconstruction settings (every field has a default)."""

    in_channels: int = 3
    hidden_channels: int = 128
    res_channels: int = 64
    num_res_blocks: int = 2
    downsample: int = 4
    num_codes: int = 512
    code_dim: int = 64
    beta: float = 0.25
    codebook: str = "ema"
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0
    restart_dead_codes: bool = True
    kmeans_init: bool = False
    kmeans_iters: int = 10
    recon: str = "mse"
    num_mixtures: int = 5
    num_bins: int = 256
    levels: int = 1  # 2: VQ-VAE-2 (top and bottom code maps), see vqprior.models.hierarchy
    top_downsample: int = 2  # levels=2: the top map is this much coarser than the bottom

    def __post_init__(self) -> None:
        for name, low in (
            ("in_channels", 1),
            ("hidden_channels", 2),
            ("res_channels", 1),
            ("num_res_blocks", 0),
            ("num_codes", 2),
            ("code_dim", 1),
            ("kmeans_iters", 1),
            ("num_mixtures", 1),
            ("num_bins", 2),
            ("levels", 1),
            ("top_downsample", 1),
        ):
            _check_int(name, getattr(self, name), low)
        check_choice("downsample", self.downsample, DOWNSAMPLES)
        check_choice("levels", self.levels, LEVELS)
        check_choice("top_downsample", self.top_downsample, TOP_DOWNSAMPLES)
        check_choice("codebook", self.codebook, ("ema", "learned"))
        check_choice("recon", self.recon, ("mse", "mixture"))
        for name in ("restart_dead_codes", "kmeans_init"):
            _check_bool(name, getattr(self, name))
        for name in ("beta", "ema_decay", "dead_code_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{name}={value!r} must be finite")
        check_range("beta", self.beta, 0.0, None)
        check_range("dead_code_threshold", self.dead_code_threshold, 0.0, None)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay!r} must lie in [0, 1)")


class VQVAEOutput(NamedTuple):
    """Everything one forward pass produces; losses are scalars, ``bits_per_dim`` NaN for mse."""

    recon: torch.Tensor  # [b, c, H, W] in [-1, 1], what decode(codes) returns
    codes: torch.Tensor  # long [b, h, w]
    loss: torch.Tensor  # recon_loss + commit_loss + codebook_loss
    recon_loss: torch.Tensor  # mse: mean squared error; mixture: NLL nats per dim
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    bits_per_dim: torch.Tensor
    perplexity: torch.Tensor


class ResidualBlock(nn.Module):
    """x + 1x1conv(ReLU(3x3conv(ReLU(x)))): [b, hidden, h, w] -> same."""

    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _stride_channels(cfg: VQVAEConfig, downsample: int | None = None) -> list[int]:
    """Channels after each stride-2 stage: hidden/2 for all but the last, hidden for the last."""
    n = int(math.log2(downsample or cfg.downsample))
    half = max(cfg.hidden_channels // 2, 1)
    return [half] * (n - 1) + [cfg.hidden_channels]


def build_quantizer(cfg: VQVAEConfig) -> VectorQuantizer:
    """The codebook a config asks for (each level of a hierarchy gets one)."""
    return VectorQuantizer(
        cfg.num_codes,
        cfg.code_dim,
        beta=cfg.beta,
        kind=cfg.codebook,
        decay=cfg.ema_decay,
        dead_code_threshold=cfg.dead_code_threshold,
        restart_dead_codes=cfg.restart_dead_codes,
        kmeans_init=cfg.kmeans_init,
        kmeans_iters=cfg.kmeans_iters,
    )


def build_encoder(cfg: VQVAEConfig) -> nn.Sequential:
    """[b, in, H, W] -> [b, code_dim, H/ds, W/ds]."""
    layers: list[nn.Module] = []
    ch = cfg.in_channels
    for out in _stride_channels(cfg):
        layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.ReLU()]
        ch = out
    layers.append(nn.Conv2d(ch, cfg.hidden_channels, 3, padding=1))
    layers += [
        ResidualBlock(cfg.hidden_channels, cfg.res_channels) for _ in range(cfg.num_res_blocks)
    ]
    layers += [nn.ReLU(), nn.Conv2d(cfg.hidden_channels, cfg.code_dim, 1)]
    return nn.Sequential(*layers)


def build_decoder(
    cfg: VQVAEConfig, out_channels: int, in_channels: int | None = None
) -> nn.Sequential:
    """[b, in_channels (code_dim), h, w] -> [b, out_channels, h*ds, w*ds]; mirrors
    :func:`build_encoder`."""
    first = nn.Conv2d(in_channels or cfg.code_dim, cfg.hidden_channels, 3, padding=1)
    layers: list[nn.Module] = [first]
    layers += [
        ResidualBlock(cfg.hidden_channels, cfg.res_channels) for _ in range(cfg.num_res_blocks)
    ]
    layers.append(nn.ReLU())
    chans = list(reversed(_stride_channels(cfg)))  # hidden, hidden/2, ...
    for i, ch in enumerate(chans):
        last = i == len(chans) - 1
        out = out_channels if last else chans[i + 1]
        layers.append(nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VQVAE(nn.Module, PretrainedMixin):
    """Encoder -> VectorQuantizer -> decoder; see the module docstring."""

    model_type = "VQVAE"
    config_class = VQVAEConfig
    config: VQVAEConfig

    def __new__(cls, config: VQVAEConfig | None = None) -> VQVAE:
        """``levels=n`` builds the class registered in :data:`LEVEL_CLASSES` for ``n``."""
        if cls is VQVAE and config is not None and config.levels != 1:
            return super().__new__(LEVEL_CLASSES[config.levels])
        return super().__new__(cls)

    def __init__(self, config: VQVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VQVAEConfig()
        cfg = self.config
        self.out_channels = (
            cfg.in_channels
            if cfg.recon == "mse"
            else num_mixture_params(cfg.in_channels, cfg.num_mixtures)
        )
        self.encoder = build_encoder(cfg)
        self.quantizer = build_quantizer(cfg)
        self.decoder = build_decoder(cfg, self.out_channels)

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """Code-map size (h, w) for images of size (height, width)."""
        ds = self.config.downsample
        if height % ds or width % ds or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {height}x{width} must be positive and divisible by downsample={ds}"
            )
        return height // ds, width // ds

    def _check_images(self, x: torch.Tensor) -> None:
        c = self.config.in_channels
        if x.dim() != 4:
            raise ValueError(f"images must have shape [b, {c}, H, W], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"images must be floats in [-1, 1], got dtype {x.dtype}")
        if x.shape[1] != c:
            raise ValueError(f"images have {x.shape[1]} channels but the model expects {c}")
        self.latent_shape(x.shape[2], x.shape[3])
        check_image_range(x)

    def _check_codes(self, codes: torch.Tensor) -> None:
        k = self.config.num_codes
        if codes.dim() != 3:
            raise ValueError(f"codes must have shape [b, h, w], got {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise ValueError(
                f"codes must lie in [0, {k}), got values in [{int(codes.min())}, {int(codes.max())}]"
            )

    # ------------------------------------------------------------------ levels (top first)
    level_names: tuple[str, ...] = ("codes",)

    @property
    def codebooks(self) -> tuple[VectorQuantizer, ...]:
        """One codebook per level, top first."""
        return (self.quantizer,)

    def level_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The code-map size (h, w) of every level, top first, for images (height, width)."""
        return [self.latent_shape(height, width)]

    def encode_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Images float [b, c, H, W] in [-1, 1] -> every level's codes long [b, h, w], top
        first; never touches the codebooks."""
        return (self.encode(x),)

    def decoder_output(self, *codes: torch.Tensor) -> torch.Tensor:
        """Raw decoder output [b, out_channels, H, W] for every level's codes (top first)."""
        (flat,) = codes
        self._check_codes(flat)
        return self.decoder(self.quantizer.lookup(flat.long()))

    def decode_levels(self, *codes: torch.Tensor) -> torch.Tensor:
        """Every level's codes (top first) -> images float [b, c, H, W] in [-1, 1]."""
        return self._output_to_image(self.decoder_output(*codes))

    def decoder_nats(self, x: torch.Tensor, *codes: torch.Tensor) -> torch.Tensor:
        """-log p(x | codes) in nats per example [b] (``recon="mixture"`` only)."""
        cfg = self.config
        if cfg.recon != "mixture":
            raise ValueError("decoder bits need recon=mixture (recon=mse has no likelihood)")
        self._check_images(x)
        out = self.decoder_output(*codes)
        with full_precision(x.device.type):
            lp = mixture_log_prob(x.float(), out.float(), cfg.num_mixtures, cfg.num_bins)
        return -lp.flatten(1).sum(1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images float [b, c, H, W] in [-1, 1] -> codes long [b, H/ds, W/ds]."""
        self._check_images(x)
        z = self.encoder(x)
        b, _, h, w = z.shape
        codes = self.quantizer.nearest(rearrange(z, "b d h w -> (b h w) d"))
        return rearrange(codes, "(b h w) -> b h w", b=b, h=h, w=w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes long [b, h, w] -> images float [b, c, h*ds, w*ds] in [-1, 1]."""
        return self.decode_levels(codes)

    def _output_to_image(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output [b, out_channels, H, W] -> reconstruction in [-1, 1] (differentiable).

        mixture: in eval mode the value is the mode (on the pixel grid); in training mode it is
        the mixture's mean snapped to the grid channel by channel (the exact mode search costs
        more than the rest of a training step, and training only logs this value or feeds it
        to extra losses). The gradient is that of the mixture's mean given the value's earlier
        channels (straight-through).
        """
        cfg = self.config
        if cfg.recon == "mse":
            return out.clamp(-1.0, 1.0)
        if self.training:
            mode = _snapped_mean(out.detach(), cfg.in_channels, cfg.num_mixtures, cfg.num_bins)
        else:
            b, _, h, w = out.shape
            u_comp = torch.full((b, h, w), 0.5, device=out.device)
            u_val = torch.full((b, cfg.in_channels, h, w), 0.5, device=out.device)
            mode = mixture_sample(
                out.detach(), cfg.in_channels, cfg.num_mixtures, cfg.num_bins, u_comp, u_val, 0.0
            )
        if not out.requires_grad:
            return mode
        mean = mixture_mean(out, mode, cfg.num_mixtures)
        return mode + (mean - mean.detach())  # value: exactly the mode

    def recon_loss(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """mse: mean squared error; mixture: NLL in nats per dimension (fp32)."""
        cfg = self.config
        with full_precision(x.device.type):
            if cfg.recon == "mse":
                return F.mse_loss(out.float(), x.float())
            lp = mixture_log_prob(x.float(), out.float(), cfg.num_mixtures, cfg.num_bins)
            return -lp.mean()

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Images [b, c, H, W] in [-1, 1] -> :class:`VQVAEOutput` (updates the EMA codebook)."""
        self._check_images(x)
        q = self.quantizer(self.encoder(x))
        out = self.decoder(q.quantized)
        recon_loss = self.recon_loss(out, x)
        if self.config.recon == "mixture":
            bits_per_dim = recon_loss.detach() / math.log(2.0)
        else:
            bits_per_dim = torch.full((), float("nan"), device=x.device)
        return VQVAEOutput(
            recon=self._output_to_image(out),
            codes=q.codes,
            loss=recon_loss + q.commit_loss + q.codebook_loss,
            recon_loss=recon_loss,
            commit_loss=q.commit_loss,
            codebook_loss=q.codebook_loss,
            bits_per_dim=bits_per_dim,
            perplexity=q.perplexity,
        )


LEVEL_CLASSES: dict[int, type[VQVAE]] = {1: VQVAE}  # more levels: vqprior.models.hierarchy


def check_image_range(x: torch.Tensor) -> None:
    """ValueError unless every value of ``x`` lies in [-1, 1] (skipped under torch.compile)."""
    if torch.compiler.is_compiling() or x.numel() == 0:
        return
    low, high = float(x.detach().min()), float(x.detach().max())
    if low < -1.0 - RANGE_TOL or high > 1.0 + RANGE_TOL:
        raise ValueError(
            f"images must lie in [-1, 1] but range over [{low:.4g}, {high:.4g}]: map 8-bit "
            "values v by 2v/255 - 1 (torchvision ToTensor output u by 2u - 1)"
        )


def _snapped_mean(
    out: torch.Tensor, channels: int, num_mixtures: int, num_bins: int
) -> torch.Tensor:
    """The mixture's mean snapped to the ``num_bins`` grid, channel by channel (each channel's
    mean given the earlier channels' snapped values): [b, P, H, W] -> [b, c, H, W]."""
    b, _, h, w = out.shape
    value = torch.zeros((b, channels, h, w), device=out.device, dtype=torch.float32)
    for ch in range(channels):
        mean = mixture_mean(out, value, num_mixtures)[:, ch]
        value[:, ch] = from_bins(to_bins(mean, num_bins), num_bins, dtype=value.dtype)
    return value


def mixture_mean(out: torch.Tensor, earlier: torch.Tensor, num_mixtures: int) -> torch.Tensor:
    """Mean of the discretized logistic mixture given by ``out`` [b, P, H, W], clamped to [-1, 1]:
    sum_m pi_m (mu_mc + sum_{c'<c} coeff_m(c, c') earlier_c') -> [b, c, H, W], with ``earlier``
    [b, c, H, W] the values taken for the earlier channels (the mode)."""
    c = earlier.shape[1]
    p = split_mixture_params(out, c, num_mixtures)
    weights = rearrange(torch.softmax(p.logits, dim=1), "b m h w -> b m 1 h w")
    means = []
    for ch in range(c):
        mean = p.means[:, :, ch]  # [b, m, H, W]
        for prev in range(ch):
            mean = mean + p.coeffs[:, :, ch * (ch - 1) // 2 + prev] * earlier[:, None, prev]
        means.append(mean)
    mixed = (weights * torch.stack(means, dim=2)).sum(1)  # [b, c, H, W]
    return mixed.clamp(-1.0, 1.0).to(earlier.dtype)
