"""A generative model of images as data: a VQ-VAE's levels and a chain of priors over them.

A :class:`LevelModel` holds one :class:`~vqprior.models.pixelcnn.PixelCNN` per level of a
VQ-VAE, top first, and the VAE that decodes them; a prior on raw pixels is a chain of one with
no VAE. Level ``i > 0`` is conditioned on the level above it: its prior's spatial condition is
:func:`upsample_codes` of the codes of level ``i - 1`` through that level's codebook, so
``p(codes) = p(level 0) p(level 1 | level 0) ...`` Sampling, the bound in bits per dimension,
scoring, completion and lossless coding walk this chain, so one code path serves one, two (or
more) levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor

from vqprior.models.pixelcnn import PixelCNN
from vqprior.models.vqvae import VQVAE

LN2 = math.log(2.0)


def upsample_codes(
    embed: Tensor, codes: Tensor, grid: tuple[int, int], check: bool = True
) -> Tensor:
    """The spatial condition of the level below: codebook ``embed`` [K, d] and the codes of the
    level above long [b, h, w] -> each code's vector repeated over its (H/h) x (W/w) cell of
    ``grid`` (H, W) -> [b, d, H, W], detached. Shapes are always checked; the codes' range
    [0, K) only when ``check`` and not compiling (a host sync)."""
    k = embed.shape[0]
    if (
        codes.dim() != 3
        or codes.is_floating_point()
        or codes.is_complex()
        or codes.dtype == torch.bool
    ):
        raise ValueError(
            f"top codes must be integers [b, ht, wt], got {codes.dtype} {list(codes.shape)}"
        )
    (hb, wb), (ht, wt) = grid, codes.shape[1:]
    if hb % ht or wb % wt:
        raise ValueError(f"bottom grid {hb}x{wb} is not a multiple of the top grid {ht}x{wt}")
    if check and not torch.compiler.is_compiling() and codes.numel():
        lo, hi = (int(v) for v in codes.aminmax())
        if lo < 0 or hi >= k:
            raise ValueError(f"top codes must lie in [0, {k}), got values in [{lo}, {hi}]")
    vectors = F.embedding(codes.long(), embed.detach())  # [b, h, w, d]
    return repeat(vectors, "b h w d -> b d (h sh) (w sw)", sh=hb // ht, sw=wb // wt)


class LevelNats(NamedTuple):
    """-log p per example [b] in nats: ``levels`` (each level's codes given the levels above,
    top first; for a pixel prior, the pixels) and ``decoder`` (the image given every level;
    zero for a pixel prior, NaN for ``recon="mse"``). Their sum bounds -log p(x)."""

    levels: tuple[Tensor, ...]
    decoder: Tensor

    def bits_per_dim(self, dims: int, names: Sequence[str]) -> dict[str, float]:
        """Batch means in bits per image dimension: ``<name>_bits_per_dim`` per level,
        ``decoder_bits_per_dim`` and ``bits_per_dim`` (the bound; NaN without a likelihood)."""
        n = len(self.decoder)
        scale = 1.0 / (n * dims * LN2)
        parts = {
            f"{name}_bits_per_dim": float(v.sum()) * scale
            for name, v in zip(names, self.levels, strict=True)
        }
        parts["decoder_bits_per_dim"] = float(self.decoder.sum()) * scale
        return {**parts, "bits_per_dim": sum(parts.values())}


def check_levels(vae: VQVAE | None, priors: Sequence[PixelCNN]) -> None:
    """ValueError (one line) unless ``priors`` model this VAE's levels, top first, each given
    the level above; without a VAE, one prior on pixels."""
    if vae is None:
        if len(priors) != 1 or priors[0].config.data != "pixels":
            raise ValueError("a model without a VAE is one prior on pixels")
        return
    if len(priors) != vae.config.levels:
        names = "/".join(vae.level_names)
        raise ValueError(
            f"this VQ-VAE has {vae.config.levels} levels ({names}): give one prior per level, "
            f"got {len(priors)}"
        )
    k, d = vae.config.num_codes, vae.config.code_dim
    grids = [(p.config.height, p.config.width) for p in priors]
    for i, (name, prior) in enumerate(zip(vae.level_names, priors, strict=True)):
        cfg = prior.config
        if cfg.data != "codes" or cfg.num_codes != k:
            raise ValueError(
                f"the {name} prior must model codes of the VAE's {k}-code codebook "
                f"(data={cfg.data}, num_codes={cfg.num_codes})"
            )
        want = d if i else 0
        if cfg.spatial_cond_channels != want:
            raise ValueError(
                f"the {name} prior needs spatial_cond_channels={want} "
                f"({'the level above' if i else 'no level above'}), got {cfg.spatial_cond_channels}"
            )
    ds = vae.config.downsample
    shapes = vae.level_shapes(grids[-1][0] * ds, grids[-1][1] * ds)
    if [tuple(g) for g in shapes] != grids:
        shown = ", ".join(f"{h}x{w}" for h, w in shapes)
        raise ValueError(
            f"the priors' grids {', '.join(f'{h}x{w}' for h, w in grids)} are not the VAE's "
            f"level grids {shown} (downsample={ds}, top_downsample={vae.config.top_downsample})"
        )


class LevelModel:
    """A VQ-VAE (or None: pixels) and its chain of priors, top first (see the module doc)."""

    def __init__(self, vae: VQVAE | None, priors: Sequence[PixelCNN]) -> None:
        check_levels(vae, priors)
        self.vae, self.priors = vae, list(priors)

    @property
    def names(self) -> tuple[str, ...]:
        """The level names, top first (``("pixels",)`` for a pixel prior)."""
        return ("pixels",) if self.vae is None else tuple(self.vae.level_names)

    @property
    def num_classes(self) -> int:
        """The classes of the class-conditional priors (0 when none is conditional)."""
        return max(p.config.num_classes for p in self.priors)

    def to(self, device: torch.device | str) -> LevelModel:
        self.priors = [p.to(device) for p in self.priors]
        self.vae = None if self.vae is None else self.vae.to(device)
        return self

    def eval(self) -> LevelModel:
        for p in self.priors:
            p.eval()
        if self.vae is not None:
            self.vae.eval()
        return self

    def condition(self, i: int, above: Sequence[Tensor], check: bool = True) -> Tensor | None:
        """The spatial condition of level ``i`` given the codes of the levels above it."""
        if i == 0:
            return None
        assert self.vae is not None
        cfg = self.priors[i].config
        embed = self.vae.codebooks[i - 1].embed
        return upsample_codes(embed, above[i - 1], (cfg.height, cfg.width), check).to(
            self.priors[i].param_dtype()
        )

    def labels(self, i: int, cond: Tensor | None) -> Tensor | None:
        """Class labels for level ``i``'s prior (None when that prior is unconditional)."""
        return cond if self.priors[i].config.num_classes else None

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        """Images [b, c, H, W] -> what the priors model, top first (a pixel prior: the pixels)."""
        return (x,) if self.vae is None else tuple(self.vae.encode_levels(x))

    def decode(self, levels: Sequence[Tensor]) -> Tensor:
        """What the priors model (top first) -> images [b, c, H, W] in [-1, 1]."""
        return levels[0] if self.vae is None else self.vae.decode_levels(*levels)

    def level_log_probs(
        self,
        levels: Sequence[Tensor],
        cond: Tensor | None = None,
        reduction: Literal["none", "sum"] = "sum",
    ) -> list[Tensor]:
        """log p of every level given the levels above, top first: nats per example [b]
        (``reduction="sum"``) or per element (``"none"``)."""
        return [
            prior.log_prob(levels[i], self.labels(i, cond), reduction, self.condition(i, levels))
            for i, prior in enumerate(self.priors)
        ]

    @torch.no_grad()
    def nats(self, x: Tensor, cond: Tensor | None = None) -> LevelNats:
        """Images [b, c, H, W] -> :class:`LevelNats` of the code length (levels + decoder)."""
        levels = self.encode(x)
        parts = tuple(-lp.float() for lp in self.level_log_probs(levels, cond))
        if self.vae is None:
            dec = torch.zeros_like(parts[0])
        elif self.vae.config.recon == "mixture":
            dec = self.vae.decoder_nats(x, *levels).float()
        else:
            dec = torch.full_like(parts[0], float("nan"))
        return LevelNats(parts, dec)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: Tensor | None = None,
        known: Sequence[Tensor] | None = None,
        mask: Sequence[Tensor] | None = None,
        **options: Any,
    ) -> tuple[Tensor, ...]:
        """Sample every level top first, each given the ones above (``options``: those of
        :meth:`PixelCNN.sample`: temperature, generator, method, top_k, ...); ``known`` /
        ``mask`` (one per level) complete instead. Decode with :meth:`decode`."""
        levels: list[Tensor] = []
        for i, prior in enumerate(self.priors):
            levels.append(
                prior.sample(
                    n,
                    cond=self.labels(i, cond),
                    spatial_cond=self.condition(i, levels),
                    known=None if known is None else known[i],
                    mask=None if mask is None else mask[i],
                    **options,
                )
            )
        return tuple(levels)
