"""Exact samplers for :class:`vqprior.PixelCNN`: the reference loop and two fast ones.

All samplers draw every random number up front, in one fixed order, from the caller's
generator (:func:`draw_noise`), and map noise to a sample deterministically element by element
in raster order (row, column, channel group). They therefore return the *same* samples:

- ``naive``: one full forward pass per sequential step (the reference).
- ``cached`` (gated backbone): vertical-stack features of a row depend only on rows above, so
  they are computed once per row; the horizontal stack and head are evaluated only at the
  current pixel from per-layer row caches. Each step costs O(layers) tiny matmuls instead of a
  full pass.
- ``fixed_point`` (any causal backbone): iterate ``x <- sample(model(x), frozen noise)`` until
  nothing changes. After ``t`` iterations the first ``t`` elements are final, so it converges
  to the reference sample in at most ``steps + 1`` passes, usually far fewer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vqprior.nn.categorical import categorical_sample
from vqprior.nn.gated import GatedStack, gate
from vqprior.nn.grid import from_bins
from vqprior.nn.mixture import draw_mixture_noise, mixture_sample

if TYPE_CHECKING:
    from vqprior.models.pixelcnn import PixelCNN

METHODS = ("auto", "naive", "cached", "fixed_point")


class Noise(NamedTuple):
    """Pre-drawn uniforms: ``u`` [n, C, H, W] for categorical heads (codes: C = 1); ``u_comp``
    [n, H, W] and ``u_val`` [n, C, H, W] for the mixture head."""

    u: Tensor | None
    u_comp: Tensor | None
    u_val: Tensor | None

    @property
    def device(self) -> torch.device:
        return next(t for t in self if t is not None).device

    def at(self, r: int, c: int) -> Noise:
        """The noise of pixel (r, c), keeping 4-d/3-d layouts with 1x1 spatial extent."""
        return Noise(*(None if t is None else t[..., r : r + 1, c : c + 1] for t in self))


def draw_noise(
    model: PixelCNN, n: int, generator: torch.Generator | None, device: torch.device
) -> Noise:
    cfg = model.config
    gen_device = generator.device if generator is not None else device
    if cfg.mixture:
        u_comp, u_val = draw_mixture_noise(
            (n, cfg.in_channels, cfg.height, cfg.width), generator, gen_device
        )
        return Noise(None, u_comp.to(device), u_val.to(device))
    c = 1 if cfg.data == "codes" else cfg.in_channels
    u = torch.rand((n, c, cfg.height, cfg.width), generator=generator, device=gen_device)
    return Noise(u.to(device), None, None)


def values_from_output(model: PixelCNN, out: Tensor, noise: Noise, temperature: float) -> Tensor:
    """Map head output [n, P, h, w] and matching noise to values: codes [n, h, w] (long) or
    pixels [n, C, h, w] on the grid."""
    cfg = model.config
    if cfg.mixture:
        assert noise.u_comp is not None and noise.u_val is not None
        return mixture_sample(
            out,
            cfg.in_channels,
            cfg.num_mixtures,
            cfg.num_bins,
            noise.u_comp,
            noise.u_val,
            temperature,
        )
    assert noise.u is not None
    if cfg.data == "codes":
        return categorical_sample(out, noise.u[:, 0], temperature)
    logits = rearrange(out, "b (c n) h w -> b n c h w", c=cfg.in_channels)
    return from_bins(categorical_sample(logits, noise.u, temperature), cfg.num_bins, out.dtype)


def _empty(model: PixelCNN, n: int, device: torch.device) -> Tensor:
    if model.config.data == "codes":
        return torch.zeros((n, *model.data_shape), dtype=torch.long, device=device)
    return torch.zeros((n, *model.data_shape), dtype=model.head_dtype(), device=device)


def _write(model: PixelCNN, x: Tensor, vals: Tensor, r: int, c: int, group: int | None) -> None:
    """Store the sampled value(s) of pixel (r, c): all channels, or channel ``group`` only."""
    if model.config.data == "codes":
        x[:, r, c] = vals[:, 0, 0]
    elif group is None:
        x[:, :, r, c] = vals[:, :, 0, 0]
    else:
        x[:, group, r, c] = vals[:, group, 0, 0]


def _steps_per_pixel(model: PixelCNN) -> list[int | None]:
    """Channel groups sampled one after another at each pixel (None: all at once)."""
    cfg = model.config
    return [None] if cfg.groups == 1 else list(range(cfg.groups))


def sample_naive(
    model: PixelCNN,
    n: int,
    cond: Tensor | None,
    temperature: float,
    noise: Noise,
    spatial: Tensor | None,
    max_steps: int | None = None,
) -> Tensor:
    """The reference loop: one full forward pass per sequential step.

    ``max_steps`` stops early (the rest stays zero); the benchmark times such a prefix.
    """
    x = _empty(model, n, noise.device)
    cfg = model.config
    step = 0
    for r in range(cfg.height):
        for c in range(cfg.width):
            for group in _steps_per_pixel(model):
                if max_steps is not None and step >= max_steps:
                    return x
                out = model(x, cond, spatial)[:, :, r : r + 1, c : c + 1]
                _write(
                    model,
                    x,
                    values_from_output(model, out, noise.at(r, c), temperature),
                    r,
                    c,
                    group,
                )
                step += 1
    return x


def num_steps(model: PixelCNN) -> int:
    """Sequential steps of the reference loop (forward passes it makes)."""
    cfg = model.config
    return cfg.height * cfg.width * cfg.groups


def sample_fixed_point(
    model: PixelCNN,
    n: int,
    cond: Tensor | None,
    temperature: float,
    noise: Noise,
    spatial: Tensor | None,
    max_iters: int | None = None,
) -> Tensor:
    """Iterate whole-image sampling with frozen noise until it stops changing."""
    x = _empty(model, n, noise.device)
    limit = max_iters or num_steps(model) + 1
    for _ in range(limit):
        x_new = values_from_output(model, model(x, cond, spatial), noise, temperature)
        if torch.equal(x_new, x):
            return x
        x = x_new
    return x


def sample(
    model: PixelCNN,
    n: int,
    cond: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    method: str = "auto",
    spatial: Tensor | None = None,
) -> Tensor:
    """Entry point behind :meth:`PixelCNN.sample`."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    device = next(model.parameters()).device
    cfg = model.config
    if cfg.num_classes:
        if cond is None:
            raise ValueError(
                f"this prior is class-conditional ({cfg.num_classes} classes): pass cond"
            )
        cond = (
            torch.as_tensor(cond, device=device).long().expand(n)
            if torch.as_tensor(cond).dim() == 0
            else cond.to(device)
        )
        model.validate_input(_empty(model, n, device), cond)
    elif cond is not None:
        raise ValueError("this prior is unconditional (num_classes=0): cond must be None")
    if method == "auto":
        method = "cached" if cfg.backbone == "gated" else "fixed_point"
    if method == "cached" and cfg.backbone != "gated":
        raise ValueError("method='cached' needs backbone='gated'; use 'fixed_point' or 'auto'")
    noise = draw_noise(model, n, generator, device)
    was_training = model.training
    model.eval()
    try:
        if method == "naive":
            return sample_naive(model, n, cond, temperature, noise, spatial)
        if method == "fixed_point":
            return sample_fixed_point(model, n, cond, temperature, noise, spatial)
        return sample_cached(model, n, cond, temperature, noise, spatial)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------ cached
class _LayerCache(NamedTuple):
    w_h: Tensor  # [2F, Cin * (p + 1)] masked horizontal kernel, flattened
    b_h: Tensor | None
    w_res: Tensor | None  # [F, F]; None in the last layer (its residual output is unused)
    b_res: Tensor | None
    w_skip: Tensor
    b_skip: Tensor | None
    bv: Tensor | float  # conditioning bias of the vertical pre-activation
    bh: Tensor | float


def _layer_caches(
    stack: GatedStack, cvec: Tensor | None, spatial: Tensor | None
) -> list[_LayerCache]:
    caches = []
    for layer in stack.gated_layers:
        bv, bh = layer.biases(cvec, spatial)
        caches.append(
            _LayerCache(
                rearrange(layer.h_conv.masked_weight(), "o i 1 k -> o (i k)"),
                layer.h_conv.bias,
                None if layer.h_res is None else layer.h_res.masked_weight()[:, :, 0, 0],
                None if layer.h_res is None else layer.h_res.bias,
                layer.h_skip.masked_weight()[:, :, 0, 0],
                layer.h_skip.bias,
                bv,
                bh,
            )
        )
    return caches


def _row(b: Tensor | float, r: int) -> Tensor | float:
    """Slice row r of a spatial bias [n, C, H, W]; class biases [n, C, 1, 1] broadcast."""
    if isinstance(b, Tensor) and b.shape[-2] > 1:
        return b[:, :, r : r + 1]
    return b


def sample_cached(
    model: PixelCNN,
    n: int,
    cond: Tensor | None,
    temperature: float,
    noise: Noise,
    spatial: Tensor | None,
) -> Tensor:
    """Row-cached exact sampler for the gated backbone (see the module docstring)."""
    cfg, stack = model.config, model.backbone
    assert isinstance(stack, GatedStack)
    H, W, p, f = cfg.height, cfg.width, cfg.kernel_size // 2, cfg.channels
    device, dtype = next(model.parameters()).device, model.head_dtype()
    x = _empty(model, n, device)
    in_ch = stack.gated_layers[0].h_conv.in_channels
    xpad = torch.zeros(n, in_ch, H + p, W + 2 * p, device=device, dtype=dtype)  # input, padded
    vpad = [torch.zeros(n, f, H + p, W + 2 * p, device=device, dtype=dtype) for _ in stack.layers]
    hpad = [torch.zeros(n, f, W + p, device=device, dtype=dtype) for _ in stack.layers]
    caches = _layer_caches(stack, model.class_vector(cond), spatial)
    for r in range(H):
        hrow = _vertical_row(stack, caches, xpad, vpad, r, p, W)
        for c in range(W):
            for group in _steps_per_pixel(model):
                skips = _horizontal_step(stack, caches, xpad, hpad, hrow, r, c, p)
                out = model.head(skips[:, :, None, None])
                vals = values_from_output(model, out, noise.at(r, c), temperature)
                _write(model, x, vals, r, c, group)
                _write_input(model, xpad, vals, r + p, c + p, group)
    return x


def _vertical_row(
    stack: GatedStack,
    caches: list[_LayerCache],
    xpad: Tensor,
    vpad: list[Tensor],
    r: int,
    p: int,
    W: int,
) -> list[Tensor]:
    """Vertical features of row r for every layer; returns each layer's horizontal bias row
    (link from the vertical pre-activation plus conditioning), [n, 2F, W]."""
    hrows = []
    for i, (layer, cache) in enumerate(zip(stack.gated_layers, caches, strict=True)):
        rows = xpad[:, :, r : r + p] if i == 0 else vpad[i - 1][:, :, r : r + p + 1]
        v_pre = F.conv2d(rows, layer.v_conv.masked_weight(), layer.v_conv.bias) + _row(cache.bv, r)
        vpad[i][:, :, r + p, p : p + W] = gate(v_pre)[:, :, 0]
        hrow = layer.v_to_h(v_pre) + _row(cache.bh, r)  # [n, 2F, 1, W]
        hrows.append(hrow[:, :, 0])
    return hrows


def _horizontal_step(
    stack: GatedStack,
    caches: list[_LayerCache],
    xpad: Tensor,
    hpad: list[Tensor],
    hrow: list[Tensor],
    r: int,
    c: int,
    p: int,
) -> Tensor:
    """Horizontal stack at pixel (r, c) from the row caches; returns summed skips [n, F]."""
    skips: Tensor | float = 0.0
    for i, cache in enumerate(caches):
        window = xpad[:, :, r + p, c : c + p + 1] if i == 0 else hpad[i - 1][:, :, c : c + p + 1]
        h_pre = (
            F.linear(rearrange(window, "n i k -> n (i k)"), cache.w_h, cache.b_h) + hrow[i][:, :, c]
        )
        hg = gate(h_pre)
        if cache.w_res is not None:
            h_out = F.linear(hg, cache.w_res, cache.b_res)
            if i > 0:
                h_out = h_out + hpad[i - 1][:, :, c + p]
            hpad[i][:, :, c + p] = h_out
        skips = skips + F.linear(hg, cache.w_skip, cache.b_skip)
    assert isinstance(skips, Tensor) and len(caches) == len(stack.layers)
    return skips


def _write_input(
    model: PixelCNN, xpad: Tensor, vals: Tensor, rp: int, cp: int, group: int | None
) -> None:
    """Write sampled values into the padded network input at padded position (rp, cp)."""
    if model.embed is not None:
        xpad[:, :, rp, cp] = model.embed(vals[:, 0, 0])
    elif group is None:
        xpad[:, :, rp, cp] = vals[:, :, 0, 0].to(xpad.dtype)
    else:
        xpad[:, group, rp, cp] = vals[:, group, 0, 0].to(xpad.dtype)
