"""PixelCNN(config): one autoregressive prior for code maps and for pixels.

- codes: long [b, h, w] in [0, K); an embedding, one channel group, a K-way categorical head.
- pixels: float [b, c, H, W] in [-1, 1] on the ``num_bins`` grid; the discretized logistic
  mixture head (pixel-level masks, channels coupled by the mixture's coefficients) or a
  ``num_bins``-way categorical head per channel (``c`` channel groups in the masks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from vqprior.config import Config, ConfigError, check_choice
from vqprior.io import PretrainedMixin
from vqprior.models.checks import check_cond, check_data, check_spatial
from vqprior.models.steps import (
    ModelSteps,
    model_step_output,
    model_step_write,
    start_model_steps,
)
from vqprior.nn.categorical import categorical_log_prob
from vqprior.nn.gated import CausalHead, GatedStack, HeadStep, conv1x1_fp32, last_1x1_step
from vqprior.nn.grid import to_bins
from vqprior.nn.masked import channel_groups
from vqprior.nn.mixture import mixture_log_prob, num_mixture_params
from vqprior.nn.precision import wide_dtype
from vqprior.sampling import sample as run_sampler

Reduction = Literal["none", "sum", "mean"]


@dataclass(frozen=True, kw_only=True)
class PixelCNNConfig(Config):
    """Every field has a default; ``data`` picks codes or pixels."""

    data: str = "pixels"  # "pixels" | "codes"
    in_channels: int = 3  # pixels only
    num_codes: int = 512  # codes only
    height: int = 32
    width: int = 32
    num_classes: int = 0  # 0: unconditional; else class-conditional (Conditional PixelCNN)
    backbone: str = "gated"  # "gated" | "pixelcnnpp" (pixels)
    head: str = "mixture"  # pixels: "mixture" | "categorical"; codes are always categorical
    channels: int = 64
    num_layers: int = 4  # gated backbone (4: lowest held-out bits/dim per CPU second, README)
    kernel_size: int = 3  # gated backbone, odd >= 3
    num_mixtures: int = 5
    num_bins: int = 256
    nr_resnet: int = 5  # pixelcnnpp backbone: blocks per scale
    num_scales: int = 3  # pixelcnnpp backbone
    dropout: float = 0.0  # pixelcnnpp backbone
    cond_dim: int = 32  # class embedding width (when num_classes > 0)
    spatial_cond_channels: int = 0  # hook: a [b, s, H, W] map given to every gated layer
    attention_every: int = 0  # gated backbone: a causal self-attention block every k layers
    attention_heads: int = 4
    class_dropout: float = 0.0  # > 0: a learned null class for classifier-free guidance

    def __post_init__(self) -> None:
        check_choice("data", self.data, ("pixels", "codes"))
        check_choice("backbone", self.backbone, ("gated", "pixelcnnpp"))
        check_choice("head", self.head, ("mixture", "categorical"))
        for name in (
            "in_channels",
            "num_codes",
            "height",
            "width",
            "channels",
            "num_layers",
            "num_mixtures",
            "nr_resnet",
            "num_scales",
            "cond_dim",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_bins < 2:
            raise ConfigError(f"num_bins={self.num_bins} must be >= 2")
        if self.num_classes < 0 or self.spatial_cond_channels < 0:
            raise ConfigError("num_classes and spatial_cond_channels must be >= 0")
        self._check_attention()
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"class_dropout={self.class_dropout} must lie in [0, 1)")
        if self.class_dropout and not self.num_classes:
            raise ConfigError("class_dropout > 0 needs a class-conditional prior (num_classes > 0)")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size={self.kernel_size} must be odd and >= 3")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must lie in [0, 1)")
        if self.backbone == "pixelcnnpp":
            if self.data != "pixels":
                raise ConfigError(
                    "backbone=pixelcnnpp models pixels only; use backbone=gated for codes"
                )
            if self.head == "categorical" and self.in_channels > 1:
                raise ConfigError("backbone=pixelcnnpp with several channels needs head=mixture")
            if self.spatial_cond_channels:
                raise ConfigError("spatial_cond_channels is supported by backbone=gated only")
        if self.channels % self.channel_groups:
            raise ConfigError(
                f"channels={self.channels} must be divisible by {self.channel_groups} channel groups"
            )

    def _check_attention(self) -> None:
        if self.attention_every < 0 or self.attention_heads < 1:
            raise ConfigError(
                f"attention_every={self.attention_every} must be >= 0 and "
                f"attention_heads={self.attention_heads} >= 1"
            )
        if not self.attention_every:
            return
        if self.backbone != "gated":
            raise ConfigError("attention_every > 0 is supported by backbone=gated only")
        if self.attention_every >= self.num_layers:  # blocks follow every k layers but the last
            raise ConfigError(
                f"attention_every={self.attention_every} builds no attention block with "
                f"num_layers={self.num_layers} (a block follows every k gated layers, never the "
                f"last): use attention_every in [1, {self.num_layers - 1}] or 0 for none"
            )
        if self.channel_groups > 1:  # attention (vqprior.nn.attention) mixes channel groups
            raise ConfigError(
                "attention_every > 0 needs one channel group: use head=mixture for RGB pixels"
            )
        if self.channels % self.attention_heads:
            raise ConfigError(
                f"channels={self.channels} must be divisible by attention_heads={self.attention_heads}"
            )

    @property
    def has_null_class(self) -> bool:
        """A learned null class (label ``num_classes``) for classifier-free guidance."""
        return self.class_dropout > 0

    @property
    def channel_groups(self) -> int:
        """Channel groups in the masks: one per channel for a categorical pixel head."""
        return self.in_channels if self.data == "pixels" and self.head == "categorical" else 1

    @property
    def mixture(self) -> bool:
        return self.data == "pixels" and self.head == "mixture"


class PixelCNN(nn.Module, PretrainedMixin):
    """Autoregressive prior over code maps or pixels; see :class:`PixelCNNConfig`."""

    model_type = "PixelCNN"
    config_class = PixelCNNConfig
    config: PixelCNNConfig

    def __init__(self, config: PixelCNNConfig | None = None) -> None:
        super().__init__()
        cfg = config or PixelCNNConfig()
        self.config = cfg
        f = cfg.channels
        self.embed = nn.Embedding(cfg.num_codes, f) if cfg.data == "codes" else None
        in_ch = f if cfg.data == "codes" else cfg.in_channels
        cond_dim = cfg.cond_dim if cfg.num_classes else 0
        rows = cfg.num_classes + int(cfg.has_null_class)  # the null class is the last row
        self.class_embed = nn.Embedding(rows, cond_dim) if cfg.num_classes else None
        out_ch, out_groups = self._head_layout()
        self.backbone: nn.Module
        if cfg.backbone == "gated":
            self.backbone = GatedStack(
                in_ch,
                f,
                cfg.num_layers,
                cfg.kernel_size,
                cfg.channel_groups,
                cond_dim,
                cfg.spatial_cond_channels,
                cfg.attention_every,
                cfg.attention_heads,
            )
            self.head: nn.Module = CausalHead(f, out_ch, cfg.channel_groups, out_groups)
        else:
            from vqprior.nn.pixelcnnpp import PixelCNNPPBackbone

            self.backbone = PixelCNNPPBackbone(
                in_ch, f, cfg.nr_resnet, cfg.num_scales, cfg.dropout, cond_dim
            )
            self.head = Conv1x1Head(f, out_ch)  # the backbone already returns elu(features)

    def _head_layout(self) -> tuple[int, Tensor]:
        cfg = self.config
        if cfg.data == "codes":
            return cfg.num_codes, torch.zeros(cfg.num_codes, dtype=torch.long)
        if cfg.head == "mixture":
            n = num_mixture_params(cfg.in_channels, cfg.num_mixtures)
            return n, torch.zeros(n, dtype=torch.long)
        # "(c n)" layout: logits of channel c form group c
        return cfg.in_channels * cfg.num_bins, channel_groups(
            cfg.in_channels * cfg.num_bins, cfg.in_channels
        )

    # ----------------------------------------------------------------------------- shapes
    @property
    def data_shape(self) -> tuple[int, ...]:
        cfg = self.config
        if cfg.data == "codes":
            return (cfg.height, cfg.width)
        return (cfg.in_channels, cfg.height, cfg.width)

    @property
    def num_dims(self) -> int:
        """Elements per example (codes, or pixel values)."""
        return math.prod(self.data_shape)

    @property
    def null_class(self) -> int | None:
        """The label of the learned null class (classifier-free guidance), or None."""
        return self.config.num_classes if self.config.has_null_class else None

    def validate_input(
        self,
        x: Tensor,
        cond: Tensor | None = None,
        spatial_cond: Tensor | None = None,
        *,
        values: bool = True,
    ) -> None:
        """Raise ValueError with one clear line if ``x``, ``cond`` or ``spatial_cond`` does not
        fit this model. ``values=False``: shapes and dtypes only (no host sync)."""
        check_data(self.config, x, self.data_shape, values)
        check_cond(self.config, cond, x.shape[0], values)
        check_spatial(self.config, spatial_cond, x.shape[0])

    # --------------------------------------------------------------------------- network
    def embed_input(self, x: Tensor) -> Tensor:
        """Network input: code embeddings [b, F, h, w] or pixels [b, c, H, W]."""
        if self.embed is not None:
            return rearrange(self.embed(x), "b h w f -> b f h w")
        return x.to(self.param_dtype())

    @property
    def device(self) -> torch.device:
        """The device of the weights: where inputs, labels and sampling noise must go."""
        return next(self.parameters()).device

    def param_dtype(self) -> torch.dtype:
        """The dtype of the weights (and of the network input and step caches)."""
        return next(self.parameters()).dtype

    def head_dtype(self) -> torch.dtype:
        """The dtype of the head output, likelihoods and pixel samples: fp32 (fp64 for an
        fp64 model), whatever the weights or autocast use."""
        return wide_dtype(self.param_dtype())

    def class_vector(self, cond: Tensor | None) -> Tensor | None:
        return None if self.class_embed is None or cond is None else self.class_embed(cond)

    def forward(
        self, x: Tensor, cond: Tensor | None = None, spatial_cond: Tensor | None = None
    ) -> Tensor:
        """Raw head output [b, P, H, W]: logits or mixture parameters at every position."""
        check_spatial(self.config, spatial_cond, x.shape[0])
        h = self.embed_input(x)
        c = self.class_vector(cond)
        feats = (
            self.backbone(h, c, spatial_cond)
            if self.config.backbone == "gated"
            else self.backbone(h, c)
        )
        return self.head(feats)

    def element_log_prob(self, x: Tensor, out: Tensor) -> Tensor:
        """Per-element log-probabilities (nats) of ``x`` under head output ``out``."""
        cfg = self.config
        if cfg.data == "codes":
            return categorical_log_prob(out, x)
        if cfg.head == "mixture":
            return mixture_log_prob(x, out, cfg.num_mixtures, cfg.num_bins)
        logits = rearrange(out, "b (c n) h w -> b n c h w", c=cfg.in_channels)
        return categorical_log_prob(logits, to_bins(x, cfg.num_bins))

    def log_prob(
        self,
        x: Tensor,
        cond: Tensor | None = None,
        reduction: Reduction = "sum",
        spatial_cond: Tensor | None = None,
        *,
        check: bool = True,
    ) -> Tensor:
        """Log-likelihood in nats: "none" per element (shape of x), "sum" per example [b],
        "mean" the mean per element (a scalar).

        ``check=False`` skips the value checks (codes, pixel and label ranges: host syncs) for
        inputs known to be in range, as in training loops; shapes and dtypes are always checked.
        """
        check_choice("reduction", reduction, ("none", "sum", "mean"))
        self.validate_input(x, cond, spatial_cond, values=check)
        lp = self.element_log_prob(x, self(x, cond, spatial_cond))
        if reduction == "none":
            return lp
        per_example = lp.flatten(1).sum(1)
        return per_example if reduction == "sum" else per_example.mean() / self.num_dims

    # ------------------------------------------------------------------------ step interface
    def start_steps(
        self,
        n: int,
        cond: Tensor | None = None,
        spatial_cond: Tensor | None = None,
        *,
        naive: bool = False,
    ) -> ModelSteps:
        """Caches for stepping a batch of ``n`` through raster order (see :mod:`vqprior.nn.step`).

        ``naive=True`` (or a backbone without the step protocol) makes every
        :meth:`step_output` a full forward pass over the values written so far: the reference.
        """
        return start_model_steps(self, n, cond, spatial_cond, naive)

    def step_output(self, state: ModelSteps, r: int, c: int) -> Tensor:
        """Head output [n, P] at element (r, c) given every value written so far."""
        return model_step_output(self, state, r, c)

    def step_write(
        self, state: ModelSteps, r: int, c: int, values: Tensor, group: int | None = None
    ) -> None:
        """Commit values at (r, c): codes long [n]; pixels [n, C] (group None: all channels;
        else only channel ``group``, from [n, C] or [n])."""
        model_step_write(self, state, r, c, values, group)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        method: str = "auto",
        spatial_cond: Tensor | None = None,
        *,
        known: Tensor | None = None,
        mask: Tensor | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """Draw ``n`` samples; see :func:`vqprior.sampling.sample` for every argument.

        ``method`` "auto" (fast and exact), "cached", "fixed_point" or "naive" (the reference
        loop); for the same generator every method returns the same samples. ``known`` and
        ``mask`` (True: keep ``known`` there) complete partial inputs.
        """
        return run_sampler(
            self,
            n,
            cond,
            temperature,
            generator,
            method,
            spatial_cond,
            known=known,
            mask=mask,
            top_k=top_k,
            top_p=top_p,
            guidance=guidance,
        )


class Conv1x1Head(nn.Module):
    """A 1x1 convolution run in fp32 with autocast off (the PixelCNN++ output layer)."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return conv1x1_fp32(self.conv, x)

    def start_steps(self, dtype: torch.dtype) -> HeadStep:
        """Features [n, F] -> output [n, P] at one element (one matrix product)."""
        return last_1x1_step(self.conv, dtype)
