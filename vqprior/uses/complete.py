"""Image completion: keep part of each image (or of its code map), sample the rest.

Keep specs: ``top:N`` keeps the top N rows, ``left:N`` the left N columns, and
``box:r0,c0,r1,c1`` *removes* the box (rows r0..r1-1, columns c0..c1-1) and keeps the rest.
Coordinates are in image pixels. A spec must keep something and remove something: N lies in
``[1, H-1]`` (``[1, W-1]`` for left), the box is non-empty, inside the image and not the whole
image (to sample whole images use ``vqprior generate``); anything else is refused.

Only the masked input (removed pixels mid-gray, value 128, the grid's second column) reaches
the model, so nothing of the removed region leaks into the completions. Elements are sampled in
raster order, each given everything before it (:meth:`PixelCNN.sample` with
``known``/``mask``): exact for a kept prefix (top, or left on the first rows); a kept element
after a removed one cannot condition it.

Through a VAE (one level or more: :class:`~vqprior.models.levels.LevelModel`) the *masked
input* is encoded into every level, and a level's code is kept when its whole pixel footprint
is kept (a top code of a two-level VAE covers ``downsample * top_downsample`` pixels a side);
the levels are completed top first, each given the (completed) levels above, then decoded. A
spec that keeps no whole code of any level is refused. The encoder sees only kept pixels, but
its receptive field is wider than one footprint: kept codes near the removed region encode the
mid-gray there too, so they may differ from the codes of the full image. The decoded kept
region is not copied from the input: it carries the VAE's reconstruction error, which can be
larger next to the removed region.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vqprior.artifacts import save_image_grid
from vqprior.data import float_to_uint8, uint8_to_float
from vqprior.sampling.noise import sampling_generator
from vqprior.uses.images import fit_images, read_images
from vqprior.uses.models import Models, check_label, class_labels, load_models


def _line_mask(kind: str, n: int, height: int, width: int) -> Tensor:
    size, what = (height, "rows") if kind == "top" else (width, "columns")
    if not 1 <= n < size:
        raise ValueError(
            f"--keep {kind}:{n}: N must lie in [1, {size - 1}] for a {height}x{width} image "
            f"(keep some {what}, complete the rest)"
        )
    mask = torch.zeros(height, width, dtype=torch.bool)
    if kind == "top":
        mask[:n] = True
    else:
        mask[:, :n] = True
    return mask


def keep_mask(spec: str, height: int, width: int) -> Tensor:
    """Parse a keep spec (see the module doc) -> bool [height, width], True = kept."""
    kind, _, arg = spec.partition(":")
    try:
        nums = [int(v) for v in arg.split(",")] if arg else []
    except ValueError:
        nums = []
    if kind in ("top", "left") and len(nums) == 1:
        return _line_mask(kind, nums[0], height, width)
    if kind == "box" and len(nums) == 4:
        r0, c0, r1, c1 = nums
        if not (0 <= r0 < r1 <= height and 0 <= c0 < c1 <= width):
            raise ValueError(f"--keep {spec}: the box must lie inside the {height}x{width} image")
        if (r1 - r0, c1 - c0) == (height, width):
            raise ValueError(
                f"--keep {spec} removes the whole {height}x{width} image: keep some of it "
                "(vqprior generate samples whole images)"
            )
        mask = torch.ones(height, width, dtype=torch.bool)
        mask[r0:r1, c0:c1] = False
        return mask
    raise ValueError(
        f"--keep {spec!r} is not top:N, left:N or box:r0,c0,r1,c1 (box = the removed part)"
    )


def code_mask(pixel_mask: Tensor, downsample: int | tuple[int, int]) -> Tensor:
    """Pixel keep mask [H, W] -> code keep mask [H/ds, W/ds] of a level whose code covers
    ``downsample`` pixels (a side, or (rows, columns)): kept when all its pixels are."""
    m = pixel_mask[None, None].float()
    return (-F.max_pool2d(-m, downsample))[0, 0] > 0.5


def level_masks(keep: str, pixel_mask: Tensor, grids: list[tuple[int, int]]) -> list[Tensor]:
    """The keep mask of every level (grid (h, w) each, top first; a pixel prior's is the pixel
    mask); refuses a spec that keeps no whole code of any level."""
    height, width = pixel_mask.shape
    factors = [(height // h, width // w) for h, w in grids]
    masks = [code_mask(pixel_mask, f) for f in factors]
    if not any(m.any() for m in masks):
        fh, fw = min(factors)
        raise ValueError(
            f"--keep {keep} keeps no whole code of this codes prior (a code covers "
            f"{fh}x{fw} pixels): keep more of the image"
        )
    return masks


MID_GRAY = 128  # what the model sees in place of a removed pixel (uint8)
MISSING_LABELS = "pass --label or an .npz with labels y"


class Completion(NamedTuple):
    """``known``, ``mask`` and ``completed`` hold one tensor per level, top first (a pixel
    prior: the pixels float [N, C, H, W]; a VAE: codes long [N, h, w])."""

    masked: Tensor  # uint8 [N, C, H, W]: removed pixels mid-gray; all the model sees
    samples: Tensor  # uint8 [N, S, C, H, W]
    known: tuple[Tensor, ...]  # what was kept, per level: the masked input's encoding
    mask: tuple[Tensor, ...]  # bool, the shape of ``known`` (True = kept)
    completed: tuple[Tensor, ...]  # what the priors produced, per level: [N * S, ...]


@torch.no_grad()
def complete_images(
    models: Models,
    x8: Tensor,
    keep: str,
    samples: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    labels: Tensor | None = None,
) -> Completion:
    """Complete uint8 images [N, C, H, W] of the model's shape ``samples`` times each.

    Only :attr:`Completion.masked` reaches the model (see the module doc). ``labels``: long
    [N], or a scalar for all (``--label``); checked by :func:`class_labels`."""
    if samples < 1:
        raise ValueError(f"--samples {samples} must be >= 1")
    model, dev = models.model, models.prior.device
    pixel_mask = keep_mask(keep, *x8.shape[-2:])
    cond = _cond(models, labels, len(x8), dev)
    masked = torch.where(pixel_mask, x8, torch.full_like(x8, MID_GRAY))
    known = model.encode(uint8_to_float(masked).to(dev))  # every level, top first
    masks = level_masks(keep, pixel_mask, [(k.shape[-2], k.shape[-1]) for k in known])
    masks = [m.to(dev).expand_as(k) for m, k in zip(masks, known, strict=True)]

    def rep(t: Tensor) -> Tensor:
        return t.repeat_interleave(samples, 0)

    out = model.sample(
        len(x8) * samples,
        cond=None if cond is None else rep(cond),
        known=[rep(k) for k in known],
        mask=[rep(m) for m in masks],
        temperature=temperature,
        generator=sampling_generator(seed),
    )
    done = float_to_uint8(model.decode(out).cpu()).view(len(x8), samples, *x8.shape[1:])
    return Completion(
        masked,
        done,
        tuple(k.cpu() for k in known),
        tuple(m.cpu() for m in masks),
        tuple(o.cpu() for o in out),
    )


def _cond(models: Models, labels: Tensor | None, n: int, dev: torch.device) -> Tensor | None:
    scalar = labels is not None and labels.dim() == 0
    cond = class_labels(
        models.model.num_classes,
        n,
        label=int(labels) if labels is not None and scalar else None,
        data=None if scalar else labels,
        missing=MISSING_LABELS,
    )
    return None if cond is None else cond.to(dev)


def complete(
    prior_dir: str | Path,
    images: str | Path,
    keep: str,
    out: str | Path = "completions.png",
    vae_dir: str | Path | None = None,
    samples: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    label: int | None = None,
    limit: int = 8,
    device: str | None = None,
    bottom_prior_dir: str | Path | None = None,
) -> dict[str, Any]:
    """A PNG grid, one row per image: original, masked input, ``samples`` completions. A
    two-level model is its top prior (``prior_dir``) and bottom prior (``bottom_prior_dir``)."""
    if limit < 1:
        raise ValueError(f"--limit {limit} must be >= 1")
    models = load_models(prior_dir, vae_dir, device, bottom_prior_dir)
    check_label(models.model.num_classes, label)
    found = read_images(images)
    x8 = fit_images(found, *models.image_shape)[:limit]
    labels = found.labels[:limit] if found.labels is not None else None
    if label is not None:
        labels = torch.tensor(label)
    result = complete_images(models, x8, keep, samples, seed, temperature, labels)
    rows = torch.cat([x8[:, None], result.masked[:, None], result.samples], dim=1)
    grid = uint8_to_float(rows.flatten(0, 1))
    save_image_grid(out, grid, nrow=samples + 2)
    return {
        "png": str(out),
        "num_images": len(x8),
        "samples": samples,
        "grid_cols": samples + 2,
        "levels": list(models.model.names),
        "kept_elements": {
            name: int(m[0].sum()) for name, m in zip(models.model.names, result.mask, strict=True)
        },
    }
