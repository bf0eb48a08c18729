"""Image completion: keep part of each image (or of its code map), sample the rest.

Keep specs: ``top:N`` keeps the top N rows, ``left:N`` the left N columns, and
``box:r0,c0,r1,c1`` *removes* the box (rows r0..r1-1, columns c0..c1-1) and keeps the rest.
Coordinates are in image pixels. Elements are sampled in raster order, each given everything
before it (:meth:`PixelCNN.sample` with ``known``/``mask``): exact for a kept prefix (top, or
left on the first rows); a kept element after a removed one cannot condition it. On a codes
prior the image is encoded, the mask shrinks to the code grid (a code is kept when all of its
pixels are), the codes are completed and decoded.
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
from vqprior.uses.models import Models, load_models


def keep_mask(spec: str, height: int, width: int) -> Tensor:
    """Parse a keep spec (see the module doc) -> bool [height, width], True = kept."""
    kind, _, arg = spec.partition(":")
    try:
        nums = [int(v) for v in arg.split(",")] if arg else []
    except ValueError:
        nums = []
    mask = torch.zeros(height, width, dtype=torch.bool)
    if kind in ("top", "left") and len(nums) == 1 and nums[0] >= 0:
        if kind == "top":
            mask[: nums[0]] = True
        else:
            mask[:, : nums[0]] = True
        return mask
    if kind == "box" and len(nums) == 4:
        r0, c0, r1, c1 = nums
        if 0 <= r0 < r1 <= height and 0 <= c0 < c1 <= width:
            mask[:] = True
            mask[r0:r1, c0:c1] = False
            return mask
        raise ValueError(f"--keep {spec}: the box must lie inside the {height}x{width} image")
    raise ValueError(
        f"--keep {spec!r} is not top:N, left:N or box:r0,c0,r1,c1 (box = the removed part)"
    )


def code_mask(pixel_mask: Tensor, downsample: int) -> Tensor:
    """Pixel keep mask [H, W] -> code keep mask [H/ds, W/ds]: kept when all its pixels are."""
    m = pixel_mask[None, None].float()
    return (-F.max_pool2d(-m, downsample))[0, 0] > 0.5


class Completion(NamedTuple):
    masked: Tensor  # uint8 [N, C, H, W]: removed pixels mid-gray
    samples: Tensor  # uint8 [N, S, C, H, W]
    known: Tensor  # what was kept: pixels float [N, C, H, W] or codes long [N, h, w]
    mask: Tensor  # bool, the shape of ``known`` (True = kept)
    completed: Tensor  # what the prior produced: [N * S, ...] pixels or codes


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
    """Complete uint8 images [N, C, H, W] of the model's shape ``samples`` times each."""
    if samples < 1:
        raise ValueError(f"--samples {samples} must be >= 1")
    n, _, h, w = x8.shape
    dev = next(models.prior.parameters()).device
    pixel_mask = keep_mask(keep, h, w)
    x = uint8_to_float(x8).to(dev)
    if models.vae is None:
        known = x.to(models.prior.head_dtype())
        mask = pixel_mask.to(dev).expand_as(known)
    else:
        known = models.vae.encode(x)
        mask = code_mask(pixel_mask, models.vae.config.downsample).to(dev).expand_as(known)
    cond = _cond(models, labels, n, dev)
    rep = [known.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)]
    cond_rep = None if cond is None else cond.repeat_interleave(samples, 0)
    gen = sampling_generator(seed)
    out = models.prior.sample(
        n * samples,
        cond=cond_rep,
        temperature=temperature,
        generator=gen,
        known=rep[0],
        mask=rep[1],
    )
    images = out if models.vae is None else models.vae.decode(out)
    masked = torch.where(pixel_mask, x8, torch.full_like(x8, 128))
    done = float_to_uint8(images.cpu()).view(n, samples, *x8.shape[1:])
    return Completion(masked, done, known.cpu(), mask.cpu(), out.cpu())


def _cond(models: Models, labels: Tensor | None, n: int, dev: torch.device) -> Tensor | None:
    k = models.prior.config.num_classes
    if not k:
        return None
    if labels is None:
        raise ValueError(
            f"this prior is class-conditional ({k} classes): pass --label or an .npz with y"
        )
    return labels.long().to(dev).expand(n) if labels.dim() == 0 else labels.long().to(dev)


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
) -> dict[str, Any]:
    """A PNG grid, one row per image: original, masked input, ``samples`` completions."""
    models = load_models(prior_dir, vae_dir, device)
    found = read_images(images)
    x8 = fit_images(found, *models.image_shape)[:limit]
    labels = found.labels[:limit] if found.labels is not None else None
    if label is not None:
        labels = torch.tensor(label)
    result = complete_images(models, x8, keep, samples, seed, temperature, labels)
    rows = torch.cat([x8[:, None], result.masked[:, None], result.samples], dim=1)
    grid = uint8_to_float(rows.flatten(0, 1))
    save_image_grid(out, grid, nrow=samples + 2)
    return {"png": str(out), "num_images": len(x8), "samples": samples, "grid_cols": samples + 2}
