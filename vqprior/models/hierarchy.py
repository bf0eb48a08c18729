"""Two-level VQ-VAE (VQ-VAE-2, Razavi et al. 2019) and the hierarchy's prior helpers.

``VQVAE(VQVAEConfig(levels=2))`` builds :class:`VQVAE2`::

    x ──encoder──▶ z_b [d, hb, wb] ──encoder_top──▶ z_t [d, ht, wt] ──quantizer_top──▶ q_t
    q_t ──decoder_top──▶ [d, hb, wb];  cat(z_b, that) ──bottom_in (1x1)──▶ quantizer ──▶ q_b
    cat(upsample_top(q_t), q_b) ──decoder──▶ x_hat

with ``hb = H / downsample`` and ``ht = hb / top_downsample``. Both codebooks take the
config's codebook options (EMA or learned, dead-code restart, k-means init). The bottom
codes are quantised *given* the top codes, so a prior factorises as p(top) p(bottom | top):
the bottom prior is a generic :class:`~vqprior.models.pixelcnn.PixelCNN` whose spatial
condition is :func:`top_condition`, the top codes' codebook vectors nearest-upsampled to the
bottom grid (``spatial_cond_channels = code_dim``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from vqprior.models.pixelcnn import PixelCNN
from vqprior.models.vqvae import (
    VQVAE,
    VQVAEConfig,
    build_decoder,
    build_encoder,
    build_quantizer,
)
from vqprior.nn.mixture import mixture_log_prob
from vqprior.nn.quantize import QuantizerOutput, UsageStats, VectorQuantizer

LN2 = math.log(2.0)
LEVEL_NAMES = ("top", "bottom")


class Levels(NamedTuple):
    """The two code maps of one batch: ``top`` long [b, ht, wt], ``bottom`` long [b, hb, wb]."""

    top: Tensor
    bottom: Tensor


class VQVAE2Output(NamedTuple):
    """One forward pass of :class:`VQVAE2`; the first eight fields mean what they mean in
    :class:`~vqprior.models.vqvae.VQVAEOutput` (``codes``/``perplexity``: the bottom level,
    ``commit_loss``/``codebook_loss``: summed over both levels)."""

    recon: Tensor  # [b, c, H, W] in [-1, 1], what decode_levels(top, bottom) returns
    codes: Tensor  # long [b, hb, wb]: bottom codes
    loss: Tensor
    recon_loss: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor
    bits_per_dim: Tensor
    perplexity: Tensor  # bottom batch perplexity
    top_codes: Tensor  # long [b, ht, wt]
    top_perplexity: Tensor


def _upsampler(code_dim: int, factor: int) -> nn.Sequential:
    """[b, d, h, w] -> [b, d, h*factor, w*factor] by stride-2 transposed convolutions."""
    layers: list[nn.Module] = []
    for i in range(int(math.log2(factor))):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.ConvTranspose2d(code_dim, code_dim, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


class VQVAE2(VQVAE):
    """Two-level VQ-VAE; ``encoder``/``quantizer`` are the bottom level's (see module doc).

    The single-level ``encode``/``decode`` refuse: use :meth:`encode_levels` and
    :meth:`decode_levels`.
    """

    def __init__(self, config: VQVAEConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        if cfg.levels != 2:
            raise ValueError(f"VQVAE2 needs levels=2, got levels={cfg.levels}")
        d, tds = cfg.code_dim, cfg.top_downsample
        top_cfg = dataclasses.replace(cfg, in_channels=d, downsample=tds)
        self.encoder_top = build_encoder(top_cfg)  # [b, d, hb, wb] -> [b, d, ht, wt]
        self.quantizer_top = build_quantizer(cfg)
        self.decoder_top = build_decoder(top_cfg, d)  # [b, d, ht, wt] -> [b, d, hb, wb]
        self.bottom_in = nn.Conv2d(2 * d, d, 1)  # cat(z_b, decoder_top(q_t)) -> bottom z
        self.upsample_top = _upsampler(d, tds)  # q_t -> [b, d, hb, wb]
        self.decoder = build_decoder(cfg, self.out_channels, in_channels=2 * d)

    # ------------------------------------------------------------------------------ shapes
    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """Bottom code-map size (hb, wb); the image must divide by downsample * top_downsample."""
        ds, tds = self.config.downsample, self.config.top_downsample
        total = ds * tds
        if height % total or width % total or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {height}x{width} must be positive and divisible by "
                f"downsample * top_downsample = {ds} * {tds} = {total}"
            )
        return height // ds, width // ds

    def top_shape(self, height: int, width: int) -> tuple[int, int]:
        """Top code-map size (ht, wt) for images of size (height, width)."""
        hb, wb = self.latent_shape(height, width)
        return hb // self.config.top_downsample, wb // self.config.top_downsample

    def _check_levels(self, top: Tensor, bottom: Tensor) -> None:
        self._check_codes(top)
        self._check_codes(bottom)
        tds = self.config.top_downsample
        b, ht, wt = top.shape
        if tuple(bottom.shape) != (b, ht * tds, wt * tds):
            raise ValueError(
                f"bottom codes of shape {tuple(bottom.shape)} do not fit top codes of shape "
                f"{tuple(top.shape)}: expected {(b, ht * tds, wt * tds)} (top_downsample={tds})"
            )

    # ---------------------------------------------------------------------- encode / decode
    def encode(self, x: Tensor) -> Tensor:
        raise ValueError(
            "this VQ-VAE has two levels: use encode_levels(x) -> (top, bottom) "
            "and decode_levels(top, bottom)"
        )

    def decode(self, codes: Tensor) -> Tensor:
        raise ValueError(
            "this VQ-VAE has two levels: decode_levels(top, bottom) needs both code maps"
        )

    def _bottom_input(self, z_b: Tensor, q_top: Tensor) -> Tensor:
        """What the bottom quantizer sees: [b, d, hb, wb] from z_b and the top's code vectors."""
        return self.bottom_in(torch.cat([z_b, self.decoder_top(q_top)], dim=1))

    def _nearest(self, quantizer: VectorQuantizer, z: Tensor) -> Tensor:
        b, _, h, w = z.shape
        codes = quantizer.nearest(rearrange(z, "b d h w -> (b h w) d"))
        return rearrange(codes, "(b h w) -> b h w", b=b, h=h, w=w)

    def encode_levels(self, x: Tensor) -> Levels:
        """Images float [b, c, H, W] in [-1, 1] -> :class:`Levels` (top [b, ht, wt], bottom
        [b, hb, wb], long); never touches the codebooks."""
        self._check_images(x)
        z_b = self.encoder(x)
        top = self._nearest(self.quantizer_top, self.encoder_top(z_b))
        bottom = self._nearest(
            self.quantizer, self._bottom_input(z_b, self.quantizer_top.lookup(top))
        )
        return Levels(top, bottom)

    def decoder_output(self, top: Tensor, bottom: Tensor) -> Tensor:
        """Raw decoder output [b, out_channels, H, W] for the two code maps."""
        self._check_levels(top, bottom)
        q_t = self.quantizer_top.lookup(top.long())
        q_b = self.quantizer.lookup(bottom.long())
        return self.decoder(torch.cat([self.upsample_top(q_t), q_b], dim=1))

    def decode_levels(self, top: Tensor, bottom: Tensor) -> Tensor:
        """Code maps top long [b, ht, wt] and bottom long [b, hb, wb] -> images [b, c, H, W]."""
        return self._output_to_image(self.decoder_output(top, bottom))

    def forward(self, x: Tensor) -> VQVAE2Output:  # type: ignore[override]
        """Images [b, c, H, W] in [-1, 1] -> :class:`VQVAE2Output` (updates both codebooks)."""
        self._check_images(x)
        z_b = self.encoder(x)
        q_t: QuantizerOutput = self.quantizer_top(self.encoder_top(z_b))
        q_b: QuantizerOutput = self.quantizer(self._bottom_input(z_b, q_t.quantized))
        out = self.decoder(torch.cat([self.upsample_top(q_t.quantized), q_b.quantized], dim=1))
        recon_loss = self.recon_loss(out, x)
        if self.config.recon == "mixture":
            bits_per_dim = recon_loss.detach() / LN2
        else:
            bits_per_dim = torch.full((), float("nan"), device=x.device)
        commit = q_t.commit_loss + q_b.commit_loss
        codebook = q_t.codebook_loss + q_b.codebook_loss
        return VQVAE2Output(
            recon=self._output_to_image(out),
            codes=q_b.codes,
            loss=recon_loss + commit + codebook,
            recon_loss=recon_loss,
            commit_loss=commit,
            codebook_loss=codebook,
            bits_per_dim=bits_per_dim,
            perplexity=q_b.perplexity,
            top_codes=q_t.codes,
            top_perplexity=q_t.perplexity,
        )

    # ------------------------------------------------------------------------------ health
    @property
    def quantizers(self) -> dict[str, VectorQuantizer]:
        """The codebooks by level name: ``{"top": ..., "bottom": ...}``."""
        return {"top": self.quantizer_top, "bottom": self.quantizer}

    def reset_usage(self) -> None:
        """Zero both codebooks' usage counters."""
        for q in self.quantizers.values():
            q.reset_usage()

    def usage_stats(self) -> dict[str, UsageStats]:
        """Codes used and usage perplexity per level since the last reset (summed over ranks)."""
        return {name: q.usage_stats() for name, q in self.quantizers.items()}

    def decoder_nats(self, x: Tensor, top: Tensor, bottom: Tensor) -> Tensor:
        """-log p(x | top, bottom) in nats per example [b] (``recon="mixture"`` only)."""
        cfg = self.config
        if cfg.recon != "mixture":
            raise ValueError("decoder bits need recon=mixture (recon=mse has no likelihood)")
        self._check_images(x)
        out = self.decoder_output(top, bottom)
        with torch.autocast(device_type=x.device.type, enabled=False):
            lp = mixture_log_prob(x.float(), out.float(), cfg.num_mixtures, cfg.num_bins)
        return -lp.flatten(1).sum(1)


def level_quantizers(vae: VQVAE) -> dict[str, VectorQuantizer]:
    """The codebooks by level: ``{"": quantizer}`` for one level, ``{"top", "bottom"}`` for two."""
    return vae.quantizers if isinstance(vae, VQVAE2) else {"": vae.quantizer}


def reconstruct(vae: VQVAE, x: Tensor) -> Tensor:
    """decode(encode(x)) through every level: images [b, c, H, W] in [-1, 1] -> same."""
    if isinstance(vae, VQVAE2):
        return vae.decode_levels(*vae.encode_levels(x))
    return vae.decode(vae.encode(x))


# ------------------------------------------------------------------------- priors over levels
def upsample_top_codes(
    embed: Tensor, top: Tensor, bottom_hw: tuple[int, int], check: bool = True
) -> Tensor:
    """The bottom prior's spatial condition from a top codebook ``embed`` [K, d] and top codes
    long [b, ht, wt]: each code's vector repeated over its (hb/ht) x (wb/wt) cell -> [b, d, hb,
    wb], detached. Shapes are always checked; the codes' range [0, K) only when ``check`` and
    not compiling (a host sync)."""
    k = embed.shape[0]
    if top.dim() != 3 or top.is_floating_point() or top.is_complex() or top.dtype == torch.bool:
        raise ValueError(
            f"top codes must be integers [b, ht, wt], got {top.dtype} {list(top.shape)}"
        )
    (hb, wb), (ht, wt) = bottom_hw, top.shape[1:]
    if hb % ht or wb % wt:
        raise ValueError(f"bottom grid {hb}x{wb} is not a multiple of the top grid {ht}x{wt}")
    if check and not torch.compiler.is_compiling() and top.numel():
        lo, hi = (int(v) for v in top.aminmax())
        if lo < 0 or hi >= k:
            raise ValueError(f"top codes must lie in [0, {k}), got values in [{lo}, {hi}]")
    vectors = F.embedding(top.long(), embed.detach())  # [b, ht, wt, d]
    return repeat(vectors, "b h w d -> b d (h sh) (w sw)", sh=hb // ht, sw=wb // wt)


def top_condition(vae: VQVAE2, top: Tensor, bottom_hw: tuple[int, int]) -> Tensor:
    """The bottom prior's spatial condition: :func:`upsample_top_codes` with the VAE's top
    codebook, top codes long [b, ht, wt] -> [b, d, hb, wb]."""
    if not isinstance(vae, VQVAE2):
        raise ValueError("top_condition needs a two-level VQ-VAE (levels=2)")
    return upsample_top_codes(vae.quantizer_top.embed, top, bottom_hw)


class TwoLevelSample(NamedTuple):
    """``images`` [n, c, H, W] in [-1, 1], ``top`` long [n, ht, wt], ``bottom`` long [n, hb, wb]."""

    images: Tensor
    top: Tensor
    bottom: Tensor


class TwoLevelNats(NamedTuple):
    """-log p per example [b] in nats: top prior, bottom prior given top, decoder given both
    (NaN for ``recon="mse"``). Their sum bounds -log p(x) (the codes are deterministic)."""

    top: Tensor
    bottom: Tensor
    decoder: Tensor

    def bits_per_dim(self, dims: int) -> dict[str, float]:
        """Batch means in bits per image dimension; ``bits_per_dim`` is the two-level bound."""
        scale = 1.0 / (len(self.top) * dims * LN2)
        parts = {name: float(v.sum()) * scale for name, v in self._asdict().items()}
        result = {f"{name}_bits_per_dim": v for name, v in parts.items()}
        result["bits_per_dim"] = sum(parts.values())  # NaN when the decoder has no likelihood
        return result


def check_two_level(vae: VQVAE, top_prior: PixelCNN, bottom_prior: PixelCNN) -> None:
    """ValueError unless the priors model this VAE's top codes and bottom codes given top."""
    if not isinstance(vae, VQVAE2):
        raise ValueError("a two-level prior needs a two-level VQ-VAE (levels=2)")
    cfg, tds = vae.config, vae.config.top_downsample
    t, b = top_prior.config, bottom_prior.config
    for name, p in (("top", t), ("bottom", b)):
        if p.data != "codes" or p.num_codes != cfg.num_codes:
            raise ValueError(
                f"the {name} prior must model codes of the VAE's {cfg.num_codes}-code codebook "
                f"(data={p.data}, num_codes={p.num_codes})"
            )
    if b.spatial_cond_channels != cfg.code_dim:
        raise ValueError(
            f"the bottom prior needs spatial_cond_channels = code_dim = {cfg.code_dim} "
            f"(the top condition), got {b.spatial_cond_channels}"
        )
    if t.spatial_cond_channels:
        raise ValueError("the top prior takes no spatial condition (spatial_cond_channels=0)")
    if (b.height, b.width) != (t.height * tds, t.width * tds):
        raise ValueError(
            f"the bottom prior's grid {b.height}x{b.width} must be the top prior's "
            f"{t.height}x{t.width} times top_downsample={tds}"
        )


def _cond(prior: PixelCNN, cond: Tensor | None) -> Tensor | None:
    """Class labels for a class-conditional prior; an unconditional one gets None."""
    return cond if prior.config.num_classes else None


@torch.no_grad()
def sample_two_level(
    vae: VQVAE,
    top_prior: PixelCNN,
    bottom_prior: PixelCNN,
    n: int,
    cond: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    method: str = "auto",
) -> TwoLevelSample:
    """Sample top codes, then bottom codes given them (spatial condition), then decode.

    ``cond`` (class labels [n]) goes to whichever prior is class-conditional.
    """
    check_two_level(vae, top_prior, bottom_prior)
    assert isinstance(vae, VQVAE2)
    top = top_prior.sample(
        n, cond=_cond(top_prior, cond), temperature=temperature, generator=generator, method=method
    )
    grid = (bottom_prior.config.height, bottom_prior.config.width)
    bottom = bottom_prior.sample(
        n,
        cond=_cond(bottom_prior, cond),
        temperature=temperature,
        generator=generator,
        method=method,
        spatial_cond=top_condition(vae, top, grid),
    )
    return TwoLevelSample(vae.decode_levels(top, bottom), top, bottom)


@torch.no_grad()
def two_level_nats(
    vae: VQVAE, top_prior: PixelCNN, bottom_prior: PixelCNN, x: Tensor, cond: Tensor | None = None
) -> TwoLevelNats:
    """Images [b, c, H, W] -> :class:`TwoLevelNats` of the three-part code length."""
    check_two_level(vae, top_prior, bottom_prior)
    assert isinstance(vae, VQVAE2)
    top, bottom = vae.encode_levels(x)
    spatial = top_condition(vae, top, tuple(bottom.shape[1:]))  # type: ignore[arg-type]
    top_nats = -top_prior.log_prob(top, _cond(top_prior, cond))
    bottom_nats = -bottom_prior.log_prob(bottom, _cond(bottom_prior, cond), spatial_cond=spatial)
    if vae.config.recon == "mixture":
        dec = vae.decoder_nats(x, top, bottom)
    else:
        dec = torch.full_like(top_nats, float("nan"))
    return TwoLevelNats(top_nats.float(), bottom_nats.float(), dec.float())
