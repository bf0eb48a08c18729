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
from einops import rearrange
from torch import Tensor, nn

from vqprior.models.vqvae import (
    LEVEL_CLASSES,
    VQVAE,
    VQVAEConfig,
    build_decoder,
    build_encoder,
    build_quantizer,
)
from vqprior.nn.quantize import QuantizerOutput, VectorQuantizer

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

    def decoder_output(self, *codes: Tensor) -> Tensor:
        """Raw decoder output [b, out_channels, H, W] for the code maps (top, bottom)."""
        if len(codes) != 2:
            raise ValueError(
                f"a two-level VQ-VAE decodes (top, bottom) codes, got {len(codes)} maps"
            )
        top, bottom = codes
        self._check_levels(top, bottom)
        q_t = self.quantizer_top.lookup(top.long())
        q_b = self.quantizer.lookup(bottom.long())
        return self.decoder(torch.cat([self.upsample_top(q_t), q_b], dim=1))

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

    # ------------------------------------------------------------------------------ levels
    level_names = LEVEL_NAMES

    @property
    def codebooks(self) -> tuple[VectorQuantizer, ...]:
        return (self.quantizer_top, self.quantizer)

    def level_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        return [self.top_shape(height, width), self.latent_shape(height, width)]


LEVEL_CLASSES[2] = VQVAE2


def level_quantizers(vae: VQVAE) -> dict[str, VectorQuantizer]:
    """The codebooks by level name (``""`` for a one-level VAE, whose metrics carry no level)."""
    if vae.config.levels == 1:
        return {"": vae.quantizer}
    return dict(zip(vae.level_names, vae.codebooks, strict=True))


def reconstruct(vae: VQVAE, x: Tensor) -> Tensor:
    """decode(encode(x)) through every level: images [b, c, H, W] in [-1, 1] -> same."""
    return vae.decode_levels(*vae.encode_levels(x))
